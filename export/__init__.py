"""Export: Hugging Face checkpoints to verified ONNX artifacts (needs the export extra)."""
