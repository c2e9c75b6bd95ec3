"""OpenVINO graphs: FP32 converted from the exported ONNX, and static INT8 calibrated with NNCF.

Static INT8 quantizes activations with scales fixed on real calibration text, so no per-batch
range is computed at run time; on 2-core x86 CPUs this ran 1.45-1.65x faster than
onnxruntime's dynamic INT8 at better parity (benchmarks/RESULTS.md). The conversion reads the
plain ONNX export, not onnxruntime's fused graph: its contrib ops are not standard ONNX.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tandem.artifact import OPENVINO_BIN, OPENVINO_XML

NumpyFeed = Mapping[str, NDArray[np.int64]]


def save_fp32(onnx_path: Path, folder: Path, name: str = OPENVINO_XML) -> None:
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(folder / name), compress_to_fp16=False)


def quantize_static(
    onnx_path: Path,
    folder: Path,
    feeds: Sequence[NumpyFeed],
    *,
    exclude: Sequence[str],
    options: Mapping[str, Any] | None = None,
) -> None:
    """Writes the INT8 graph; ``exclude`` names weight MatMuls (ONNX node names) kept in FP32.
    ``options``: more keyword arguments for ``nncf.quantize`` (the recipes of
    ``tandem bench quantization``)."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    settings: dict[str, Any] = {}
    if exclude:
        names = _graph_names(model, exclude)
        settings["ignored_scope"] = nncf.IgnoredScope(names=names, validate=False)
    quantized = nncf.quantize(
        model,
        nncf.Dataset(list(feeds)),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
        **{**settings, **(options or {})},
    )
    (folder / OPENVINO_BIN).unlink(missing_ok=True)
    ov.save_model(quantized, str(folder / OPENVINO_XML), compress_to_fp16=False)


def _graph_names(model: object, onnx_names: Sequence[str]) -> list[str]:
    """OpenVINO keeps ONNX node names, except that a Gemm's MatMul gets "/WithoutBiases"."""
    names = {op.get_friendly_name() for op in model.get_ops()}  # type: ignore[attr-defined]
    return [name if name in names else f"{name}/WithoutBiases" for name in onnx_names]
