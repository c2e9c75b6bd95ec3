"""Where a model runs and on what, as plain names: light enough for settings and --help.

The runtimes themselves (and numpy, torch, openvino) live in ``tandem.runtimes``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

Backend = Literal["onnxruntime", "openvino", "torch"]
BackendChoice = Literal["auto", "onnxruntime", "openvino", "torch"]
BACKEND_CHOICES: tuple[BackendChoice, ...] = ("auto", "onnxruntime", "openvino", "torch")
DEVICE_PATTERN = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
TorchDtype = Literal["auto", "float16", "bfloat16", "float32"]
TORCH_DTYPES: tuple[TorchDtype, ...] = ("auto", "float16", "bfloat16", "float32")
# What OpenVINO runs on a CPU: the artifact's INT8 graph with its unquantized ops in f32 or
# bf16, or (bf16-unquantized) the unquantized graph kept beside it, all in bf16. On AMX tiles
# the last ran as fast as INT8 at parity close to FP32's (benchmarks/RESULTS.md, "AMX").
CpuPrecision = Literal["f32", "bf16", "bf16-unquantized"]
CPU_PRECISIONS: tuple[CpuPrecision, ...] = ("f32", "bf16", "bf16-unquantized")
UNQUANTIZED: CpuPrecision = "bf16-unquantized"


@dataclass(frozen=True)
class DeviceSpec:
    """``cpu``, or ``cuda[:N]`` (GPU N, default 0)."""

    type: Literal["cpu", "cuda"] = "cpu"
    index: int = 0

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        match = DEVICE_PATTERN.match(text.strip().lower())
        if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
            raise ValueError(f"device {text!r} is not cpu, cuda or cuda:N")
        kind = cast(Literal["cpu", "cuda"], match.group(1))
        return cls(kind, int(match.group(2) or 0))

    @property
    def is_gpu(self) -> bool:
        return self.type == "cuda"

    def __str__(self) -> str:
        return "cpu" if self.type == "cpu" else f"cuda:{self.index}"
