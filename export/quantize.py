"""Turns an FP32 ONNX graph into INT8 (dynamic, s8 per-channel, mixed precision) or FP16.

Plain dynamic INT8 misses the parity bars on MiniLM-class encoders: the feed-forward MatMuls
of the first layers see activation outliers that one per-tensor scale cannot hold. So INT8
here is mixed precision. Each weight MatMul is ranked by the error that quantizing it alone
adds to its own output (emulated in numpy on calibration inputs), and the worst are kept in
FP32, as few as the measured end-to-end parity allows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from tandem.cpu import cpu_flags

log = logging.getLogger(__name__)

NumpyFeed = dict[str, NDArray[np.int64]]
# Ops whose second input, when it is a constant, is a weight that dynamic quantization turns
# into s8. `Attention` is the transformer optimizer's fused QKV projection.
WEIGHT_OPS = ("MatMul", "Gemm", "Attention")


@dataclass(frozen=True)
class Preset:
    """How dynamic INT8 is laid out for one CPU family."""

    name: str
    per_channel: bool
    reduce_range: bool
    description: str


# s8 weights with u8 activations. reduce_range (7-bit weights) exists for CPUs whose u8*s8
# multiply-add (vpmaddubsw) can saturate: AVX2 and AVX-512 without VNNI. VNNI and Arm's
# dot-product instructions accumulate in 32 bits, so the full range is safe there.
PRESETS = {
    "avx2": Preset("avx2", True, True, "AVX2 without VNNI: s8 per-channel, 7-bit weights"),
    "avx512": Preset("avx512", True, True, "AVX-512 without VNNI: s8 per-channel, 7-bit"),
    "avx512_vnni": Preset("avx512_vnni", True, False, "AVX-512 VNNI: s8 per-channel"),
    "arm64": Preset("arm64", True, False, "Arm64 dot-product: s8 per-channel"),
}


def detect_preset(cpuinfo: str | None = None) -> str:
    """Picks the preset for this CPU from its flags (``/proc/cpuinfo`` on Linux)."""
    import platform

    flags = cpu_flags(cpuinfo)
    arm = platform.machine().lower() in ("aarch64", "arm64")
    if arm and not any(flag.startswith("avx") for flag in flags):
        return "arm64"
    if "avx512f" in flags and ("avx512_vnni" in flags or "avx512vnni" in flags):
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    if "asimddp" in flags or "asimd" in flags:
        return "arm64"
    return "avx2"


def weight_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of nodes that multiply by a constant weight, in graph order."""
    constants = {initializer.name for initializer in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in constants
    ]


class _DropPreprocessAdvice(logging.Filter):
    """The quantizer advises shape pre-processing on every call; DefaultTensorType covers it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "consider to run pre-processing" not in record.getMessage()


def quantize_int8(source: Path, target: Path, *, preset: Preset, exclude: Sequence[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    advice = _DropPreprocessAdvice()
    logging.getLogger().addFilter(advice)  # the quantizer logs on the root logger
    try:
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=preset.per_channel,
            reduce_range=preset.reduce_range,
            nodes_to_exclude=list(exclude),
            # The transformer optimizer's fused ops defeat ONNX shape inference; their outputs
            # are float32, which is what this tells the quantizer.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
        )
    finally:
        logging.getLogger().removeFilter(advice)


def convert_fp16(source: Path, target: Path) -> None:
    """FP16 weights and compute for the GPU; inputs and outputs keep their FP32/int64 types."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(source)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(target))


def local_errors(
    model_path: Path, feeds: Sequence[NumpyFeed], *, preset: Preset
) -> dict[str, float]:
    """Relative output error of each weight node when it alone is quantized, on ``feeds``.

    Runs the FP32 graph once per feed with every weight node's input exposed, then emulates
    dynamic INT8 (u8 asymmetric per-tensor activations, s8 symmetric per-channel weights).
    """
    model = onnx.load(str(model_path))
    initializers = {init.name: init for init in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    names = weight_nodes(model)
    exposed = sorted({nodes[name].input[0] for name in names})
    existing = {output.name for output in model.graph.output}
    for tensor in exposed:
        if tensor not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    options = ort.SessionOptions()
    # Fusions would hide the intermediate tensors asked for above.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_names = [node.name for node in session.get_inputs()]
    squared_error = dict.fromkeys(names, 0.0)
    squared_norm = dict.fromkeys(names, 0.0)
    for feed in feeds:
        values = session.run(exposed, {name: feed[name] for name in input_names})
        activations = dict(zip(exposed, values, strict=True))
        for name in names:
            node = nodes[name]
            weight = onnx.numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
            if node.op_type == "Gemm" and any(
                attr.name == "transB" and attr.i == 1 for attr in node.attribute
            ):
                weight = weight.T
            inputs = np.asarray(activations[node.input[0]], dtype=np.float32)
            inputs = inputs.reshape(-1, inputs.shape[-1])
            exact = inputs @ weight
            approx = _fake_quant_activation(inputs) @ _fake_quant_weight(
                weight, reduce_range=preset.reduce_range
            )
            squared_error[name] += float(np.square(approx - exact).sum())
            squared_norm[name] += float(np.square(exact).sum())
    return {name: (squared_error[name] / max(squared_norm[name], 1e-30)) ** 0.5 for name in names}


def _fake_quant_activation(values: NDArray[np.float32]) -> NDArray[np.float32]:
    low = min(float(values.min()), 0.0)
    high = max(float(values.max()), 0.0)
    scale = (high - low) / 255.0 or 1.0
    zero_point = np.round(-low / scale)
    quantized = np.clip(np.round(values / scale) + zero_point, 0, 255)
    return np.asarray((quantized - zero_point) * scale, dtype=np.float32)


def _fake_quant_weight(weight: NDArray[np.float32], *, reduce_range: bool) -> NDArray[np.float32]:
    limit = 63.0 if reduce_range else 127.0
    scale = np.abs(weight).max(axis=0, keepdims=True) / limit
    scale = np.where(scale == 0, 1.0, scale)
    return (np.clip(np.round(weight / scale), -limit, limit) * scale).astype(np.float32)


def choose_exclusions(
    ranked: Sequence[str],
    passes: Callable[[Sequence[str]], bool],
    *,
    max_excluded: int,
) -> tuple[list[str], bool]:
    """Finds the fewest of the worst-ranked nodes to keep in FP32 so that ``passes`` holds.

    Parity falls roughly monotonically as more nodes stay in FP32, so this bisects on how many
    of ``ranked`` (worst first) to exclude. Returns the exclusions and whether they passed.
    """
    if passes([]):
        return [], True
    low, high = 0, min(max_excluded, len(ranked))
    if not passes(ranked[:high]):
        return list(ranked[:high]), False
    while high - low > 1:
        middle = (low + high) // 2
        if passes(ranked[:middle]):
            high = middle
        else:
            low = middle
    return list(ranked[:high]), True
