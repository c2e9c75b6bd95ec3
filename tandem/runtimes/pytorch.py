"""PyTorch: the checkpoint kept in an FP16 artifact, in fp16 or bf16 with SDPA attention.

This is the GPU path where onnxruntime-gpu is absent, and it runs on the CPU too (in fp32),
which is how CI tests it. A CPU server never gets here unless asked: torch is imported only
when this runtime is opened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from tandem.artifact import Manifest
from tandem.devices import Backend, DeviceSpec, TorchDtype
from tandem.runtimes import RuntimeUnavailable
from tandem.tokens import TokenBatch

# On a GPU every new (rows, width) shape pays once for choosing and loading its kernels: on
# an H200 a shape's first run took 20x a known one's (71.5 against 3.6 ms, RESULTS), and a
# budget's small, varied batches met new shapes all the time. So a GPU run is padded up
# to one of a few shapes, which the server runs once at start-up: widths in steps of 64
# tokens, rows in steps of half a power of two (at most half as many rows again).
WIDTH_STEP = 64


def bucket_rows(rows: int) -> int:
    power = 1 << max(rows - 1, 0).bit_length()
    half_step = power * 3 // 4
    return half_step if rows <= half_step and power >= 4 else power


def bucket_width(width: int) -> int:
    return -(-width // WIDTH_STEP) * WIDTH_STEP


def bucket_shapes(max_rows: int, max_width: int, max_tokens: int) -> list[tuple[int, int]]:
    """Every bucketed shape a batch within these caps can take. The caps hold before the
    padding: a batch of 1,008 pairs of 65 tokens fits 65,536 and runs as 1,024 x 128."""
    shapes = set()
    for width in range(WIDTH_STEP, bucket_width(max_width) + 1, WIDTH_STEP):
        narrowest = width - WIDTH_STEP + 1
        for rows in range(1, min(max_rows, max_tokens // narrowest) + 1):
            shapes.add((bucket_rows(rows), width))
    return sorted(shapes)


def _padded(array: NDArray[np.int64], rows: int, width: int) -> NDArray[np.int64]:
    """``array`` grown to ``rows`` x ``width``: new columns are 0 (padding, masked out); new
    rows repeat the first row, so no row of the batch is all padding (NaN under SDPA)."""
    grown = np.zeros((rows, width), dtype=array.dtype)
    grown[: array.shape[0], : array.shape[1]] = array
    grown[array.shape[0] :, : array.shape[1]] = array[0]
    return grown


class TorchRuntime:
    backend: Backend = "torch"

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        *,
        device: DeviceSpec,
        threads: int,
        dtype: TorchDtype = "auto",
    ) -> None:
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification

        if manifest.checkpoint is None:
            raise RuntimeUnavailable(f"{folder} keeps no checkpoint for PyTorch")
        if device.is_gpu and not torch.cuda.is_available():
            raise RuntimeUnavailable(f"PyTorch sees no GPU here, so it cannot run on {device}")
        if not device.is_gpu:
            torch.set_num_threads(threads)
        # fp16 on a CPU is several times slower than fp32, so "auto" means fp32 there.
        chosen = dtype if dtype != "auto" else ("float16" if device.is_gpu else "float32")
        self.dtype = getattr(torch, chosen)
        self.torch_device = torch.device(str(device))
        loader = AutoModel if manifest.kind == "bi-encoder" else AutoModelForSequenceClassification
        model = loader.from_pretrained(
            str(folder / manifest.checkpoint), dtype=self.dtype, attn_implementation="sdpa"
        )
        self.model = model.to(self.torch_device).eval()
        self.kind = manifest.kind
        self.device = device
        self.input_names = manifest.inputs
        self._width = (
            int(model.config.hidden_size)
            if self.kind == "bi-encoder"
            else int(model.config.num_labels)
        )

    @property
    def output_width(self) -> int:
        return self._width

    def run(self, batch: TokenBatch) -> NDArray[np.float32]:
        import torch

        rows, width = batch.input_ids.shape
        arrays = batch.feed(self.input_names)
        if self.device.is_gpu:
            shape = bucket_rows(rows), bucket_width(width)
            arrays = {name: _padded(array, *shape) for name, array in arrays.items()}
        with torch.inference_mode():
            feed = {
                name: torch.from_numpy(array).to(self.torch_device, non_blocking=True)
                for name, array in arrays.items()
            }
            output = self.model(**feed)
            values = output.last_hidden_state if self.kind == "bi-encoder" else output.logits
            values = values[:rows, :width] if self.kind == "bi-encoder" else values[:rows]
            return np.asarray(values.float().cpu().numpy(), dtype=np.float32)
