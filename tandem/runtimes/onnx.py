"""onnxruntime: the INT8 graph on CPUs, the FP16 graph on CUDA (with onnxruntime-gpu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from tandem.artifact import MODEL_NAME, Manifest
from tandem.devices import Backend, DeviceSpec
from tandem.tokens import TokenBatch


def create_session(
    model_path: Path, *, threads: int, device: DeviceSpec, spinning: bool = True
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One model runs at a time per session; a second inter-op pool would only contend for cores.
    options.inter_op_num_threads = 1
    if not spinning:
        # Idle worker threads spin by default, which wins when a session owns its cores and
        # steals them from the other session, the event loop and the store when it does not.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[str | tuple[str, dict[str, object]]] = ["CPUExecutionProvider"]
    if device.is_gpu:
        providers = [("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(model_path), options, providers=providers)


class OnnxRuntime:
    backend: Backend = "onnxruntime"

    def __init__(
        self, folder: Path, manifest: Manifest, *, device: DeviceSpec, threads: int, spinning: bool
    ) -> None:
        del manifest  # the graph describes its own inputs
        self.device = device
        self.session = create_session(
            folder / MODEL_NAME, threads=threads, device=device, spinning=spinning
        )
        self.input_names = tuple(node.name for node in self.session.get_inputs())
        self.output_name = self.session.get_outputs()[0].name

    @property
    def output_width(self) -> int:
        return int(self.session.get_outputs()[0].shape[-1])

    def run(self, batch: TokenBatch) -> NDArray[np.float32]:
        outputs = self.session.run([self.output_name], batch.feed(self.input_names))
        return np.asarray(outputs[0], dtype=np.float32)
