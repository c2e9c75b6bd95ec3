"""Keeps the checkpoint inside a GPU artifact, so the PyTorch backend can serve it.

onnxruntime-gpu is not always installable where the GPU is, while PyTorch usually is. The
weights are stored in fp16 safetensors (the artifact's precision) with their config; the
tokenizer is the artifact's own, so both backends read the same token ids.
"""

from __future__ import annotations

from pathlib import Path

from tandem.artifact import Kind
from tandem.export.source import ModelSource


def keep_checkpoint(source: ModelSource, kind: Kind, folder: Path) -> None:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    loader = AutoModel if kind == "bi-encoder" else AutoModelForSequenceClassification
    model = loader.from_pretrained(str(source.path), dtype=torch.float32)
    model.half().save_pretrained(str(folder), safe_serialization=True)
