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

        with torch.inference_mode():
            feed = {
                name: torch.from_numpy(array).to(self.torch_device, non_blocking=True)
                for name, array in batch.feed(self.input_names).items()
            }
            output = self.model(**feed)
            values = output.last_hidden_state if self.kind == "bi-encoder" else output.logits
            return np.asarray(values.float().cpu().numpy(), dtype=np.float32)
