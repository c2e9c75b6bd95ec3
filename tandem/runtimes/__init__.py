"""What runs an artifact's model: onnxruntime, OpenVINO, or PyTorch from the kept checkpoint.

An encoder tokenizes and pools; a runtime only maps a ``TokenBatch`` to the model's first
output (token states for a bi-encoder, logits for a cross-encoder). Which one runs is chosen
from the artifact and the device: a CPU runs the artifact's own graph; a GPU runs an FP16
ONNX graph on onnxruntime's CUDA provider where onnxruntime-gpu is installed, else the
checkpoint on PyTorch. torch and openvino are imported only by the runtime that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from tandem.artifact import ArtifactError, Manifest
from tandem.cpu import has_int8_dot_product
from tandem.devices import (
    Backend,
    BackendChoice,
    CpuPrecision,
    DeviceSpec,
    TorchDtype,
)
from tandem.tokens import TokenBatch


@dataclass(frozen=True)
class RuntimeFit:
    """How an artifact runs on the machine it found, and why: what Info and the log report."""

    backend: str
    precision: str  # what the unquantized ops run in: "f32", "bf16"; "" where not OpenVINO's
    reason: str
    parity: dict[str, float] = field(default_factory=dict)  # a tried variant's, on the probe
    seconds: dict[str, float] = field(default_factory=dict)  # each variant's probe time


class RuntimeUnavailable(ArtifactError):
    """The artifact cannot run on the asked backend or device here; the message says why."""


class Runtime(Protocol):
    """One loaded model. ``run`` may be called from several threads at once."""

    backend: Backend
    device: DeviceSpec
    input_names: tuple[str, ...]

    @property
    def output_width(self) -> int:
        """The last dimension of the output: the embedding size, or 1 for a reranker."""
        ...

    def run(self, batch: TokenBatch) -> NDArray[np.float32]: ...


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose_backend(manifest: Manifest, choice: BackendChoice, device: DeviceSpec) -> Backend:
    """The backend that will run ``manifest``'s artifact on ``device``, or a clear refusal."""
    checkpoint_hint = (
        "export with --precision fp16, which keeps the checkpoint for the PyTorch backend"
    )
    if choice == "torch":
        if manifest.checkpoint is None:
            raise RuntimeUnavailable(
                f"this artifact keeps no checkpoint for PyTorch; {checkpoint_hint}"
            )
        return "torch"
    if choice == "openvino" and manifest.runtime != "openvino":
        raise RuntimeUnavailable(
            "this artifact holds an onnxruntime graph; export with --runtime openvino for OpenVINO"
        )
    if choice == "onnxruntime" and manifest.runtime != "onnxruntime":
        raise RuntimeUnavailable(
            "this artifact holds an OpenVINO graph; export with --runtime onnxruntime for it"
        )
    if not device.is_gpu:
        return manifest.runtime
    if choice == "openvino" or manifest.runtime == "openvino":
        if manifest.checkpoint is not None and choice == "auto":
            return "torch"
        raise RuntimeUnavailable(
            f"an OpenVINO graph runs on the CPU only; for {device}, {checkpoint_hint}"
        )
    if manifest.precision == "int8" and choice == "auto":
        raise RuntimeUnavailable(
            f"an INT8 artifact is for CPUs (dynamic INT8 runs on the CPU even under CUDA); for "
            f"{device}, {checkpoint_hint}"
        )
    if cuda_provider_available():
        return "onnxruntime"
    if choice == "auto" and manifest.checkpoint is not None:
        return "torch"
    raise RuntimeUnavailable(
        "onnxruntime here has no CUDA execution provider: install onnxruntime-gpu, or use "
        f"--backend torch ({checkpoint_hint})"
    )


def slower_here(backend: Backend, device: DeviceSpec, flags: frozenset[str]) -> str | None:
    """Why ``backend`` is the slower INT8 runtime on this CPU, or None where it is not."""
    if backend != "openvino" or device.is_gpu or has_int8_dot_product(flags):
        return None
    return (
        "OpenVINO's static INT8 ran at 0.55-0.57x of onnxruntime's dynamic INT8 on a CPU "
        "without VNNI or AMX (benchmarks/RESULTS.md); re-export with --runtime onnxruntime "
        "(the default on this CPU) to serve faster"
    )


def unread_files(manifest: Manifest, backend: Backend) -> tuple[str, ...]:
    """Files of the artifact that ``backend`` never opens (they need not travel with it)."""
    checkpoint = () if manifest.checkpoint is None else (manifest.checkpoint + "/",)
    if backend == "torch":
        return manifest.graph_files
    return checkpoint


def open_runtime(
    folder: Path,
    manifest: Manifest,
    backend: Backend,
    *,
    device: DeviceSpec,
    threads: int,
    spinning: bool,
    torch_dtype: TorchDtype = "auto",
    cpu_precision: CpuPrecision = "f32",
) -> Runtime:
    if backend == "onnxruntime":
        from tandem.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(folder, manifest, device=device, threads=threads, spinning=spinning)
    if backend == "openvino":
        from tandem.runtimes.openvino import OpenVinoRuntime

        return OpenVinoRuntime(folder, device=device, threads=threads, precision=cpu_precision)
    from tandem.runtimes.pytorch import TorchRuntime

    return TorchRuntime(folder, manifest, device=device, threads=threads, dtype=torch_dtype)
