"""OpenVINO: the statically quantized INT8 graph (NNCF), on CPUs.

Unquantized ops run in FP32: OpenVINO's default on CPUs with avx512_bf16 but no AMX is bf16,
which ran 2x slower than FP32 there and moves scores away from the verified ones.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tandem.artifact import OPENVINO_XML
from tandem.devices import Backend, DeviceSpec
from tandem.runtimes import RuntimeUnavailable
from tandem.tokens import TokenBatch

# OpenVINO prepares each new input shape on its first run, at about twice the cost of a
# repeat, and keeps it: batch widths rounded up to a multiple of this repeat far more often,
# for a few padding tokens per row.
WIDTH_STEP = 8


def compile_config(threads: int) -> dict[str, Any]:
    return {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        # Pinned workers would keep their cores from the event loop and the other model.
        "ENABLE_CPU_PINNING": False,
    }


class OpenVinoRuntime:
    backend: Backend = "openvino"

    def __init__(self, folder: Path, *, device: DeviceSpec, threads: int) -> None:
        if device.is_gpu:
            raise RuntimeUnavailable("the OpenVINO graph runs on the CPU only")
        import openvino as ov

        self.device = device
        self.compiled = ov.Core().compile_model(
            str(folder / OPENVINO_XML), "CPU", compile_config(threads)
        )
        self.input_names = tuple(port.get_any_name() for port in self.compiled.inputs)
        self._local = threading.local()

    @property
    def output_width(self) -> int:
        return int(self.compiled.outputs[0].get_partial_shape()[-1].get_length())

    def run(self, batch: TokenBatch) -> NDArray[np.float32]:
        # An infer request serves one call at a time; each calling thread gets its own.
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        width = batch.input_ids.shape[1]
        request.infer(
            {name: pad_width(array) for name, array in batch.feed(self.input_names).items()}
        )
        output = request.get_output_tensor(0).data
        # Token states come back as wide as the padded batch; the caller pools over its own.
        return np.array(output[:, :width] if output.ndim == 3 else output, dtype=np.float32)


def pad_width(array: NDArray[np.int64]) -> NDArray[np.int64]:
    """Pads to a multiple of ``WIDTH_STEP`` columns with zeros (masked out: the attention
    mask is zero there, so no real token sees them)."""
    width = array.shape[1]
    extra = -width % WIDTH_STEP
    return np.pad(array, ((0, 0), (0, extra))) if extra else array
