"""OpenVINO: the statically quantized INT8 graph (NNCF), on CPUs, or the unquantized graph
kept beside it.

Unquantized ops run in FP32 unless bf16 is asked for. OpenVINO's own default where the CPU
has bf16 matmuls (AMX, avx512_bf16) is bf16, which moves scores away from the verified ones
and is not always faster: once measured 2x slower on an avx512_bf16 CPU without AMX, 9% faster
on an AVX-512 EPYC (benchmarks/RESULTS.md). So the server tries it at start-up and keeps it
only at parity and faster (``tandem.export.probe``). On AMX the unquantized graph in bf16 ran
as fast as the INT8 one at parity close to FP32's, so start-up tries it too.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tandem.artifact import OPENVINO_UNQUANTIZED_XML, OPENVINO_XML
from tandem.devices import UNQUANTIZED, Backend, CpuPrecision, DeviceSpec
from tandem.runtimes import RuntimeUnavailable
from tandem.tokens import TokenBatch

# OpenVINO prepares each new input shape on its first run, at about twice the cost of a
# repeat, and keeps it: batch widths rounded up to a multiple of this repeat far more often,
# for a few padding tokens per row.
WIDTH_STEP = 8


def compile_config(threads: int, precision: CpuPrecision = "f32") -> dict[str, Any]:
    return {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == UNQUANTIZED else precision,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        # Pinned workers would keep their cores from the event loop and the other model.
        "ENABLE_CPU_PINNING": False,
    }


class OpenVinoRuntime:
    backend: Backend = "openvino"

    def __init__(
        self, folder: Path, *, device: DeviceSpec, threads: int, precision: CpuPrecision = "f32"
    ) -> None:
        if device.is_gpu:
            raise RuntimeUnavailable("the OpenVINO graph runs on the CPU only")
        import openvino as ov

        self.device = device
        graph = folder / (OPENVINO_UNQUANTIZED_XML if precision == UNQUANTIZED else OPENVINO_XML)
        if precision == UNQUANTIZED and not graph.is_file():
            raise RuntimeUnavailable(
                f"{folder} keeps no unquantized graph (exported before it was kept, or not "
                "as OpenVINO INT8): re-export it to run --cpu-precision bf16-unquantized"
            )
        self.compiled = ov.Core().compile_model(
            str(graph), "CPU", compile_config(threads, precision)
        )
        # Asked bf16 on a CPU without bf16 matmuls, OpenVINO compiles for f32 instead.
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.precision = f"{hint}-unquantized" if precision == UNQUANTIZED else hint
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


def bf16_capable() -> bool:
    """Whether OpenVINO runs bf16 on this CPU (AMX or avx512_bf16), by its own account."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_version() -> str:
    import openvino as ov

    return str(ov.get_version())
