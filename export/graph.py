"""Produces the FP32 ONNX graph of a checkpoint and applies the transformer optimizer to it."""

from __future__ import annotations

import logging
from pathlib import Path

from tandem.artifact import Kind
from tandem.export.errors import UnsupportedModel
from tandem.export.source import ModelSource

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
TASKS: dict[Kind, str] = {
    "bi-encoder": "feature-extraction",
    "cross-encoder": "text-classification",
}


def export_fp32(source: ModelSource, kind: Kind, folder: Path, *, opset: int) -> Path:
    """Exports with optimum into ``folder``; returns the path of the ONNX file.

    optimum knows each family's inputs: BERT keeps token_type_ids, RoBERTa/XLM-R have none.
    """
    import torch
    from optimum.exporters.onnx import main_export

    try:
        main_export(
            str(source.path),
            output=folder,
            task=TASKS[kind],
            opset=opset,
            device="cpu",
            dtype="fp32",
            do_validation=False,
            library_name="transformers",
        )
    except (ValueError, KeyError, NotImplementedError, torch.onnx.errors.OnnxExporterError) as exc:
        raise UnsupportedModel(
            f"{source.spec}: the ONNX export failed ({type(exc).__name__}: {exc}); "
            "this architecture is not supported"
        ) from exc
    return folder / "model.onnx"


def optimize(model_path: Path, target: Path, source: ModelSource) -> dict[str, int]:
    """Fuses attention, LayerNorm and GELU with onnxruntime's transformer optimizer.

    Returns the fused-operator counts, recorded in the manifest. All supported families are
    BERT-shaped encoders, which the optimizer's "bert" type matches by graph pattern.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(model_path),
        model_type="bert",
        num_heads=int(source.config.get("num_attention_heads", 0)),
        hidden_size=int(source.config.get("hidden_size", 0)),
        opt_level=1,
    )
    optimized.save_model_to_file(str(target))
    counts = optimized.get_fused_operator_statistics()
    return {name: int(count) for name, count in counts.items() if count}
