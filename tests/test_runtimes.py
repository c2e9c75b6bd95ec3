"""Choosing a runtime for an artifact and a device, and learning a GPU's batch cap.

The models themselves run in test_export_real (each backend against the PyTorch reference);
here is the arithmetic and the refusals, which need no weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from test_artifact import make_manifest

from tandem.artifact import ArtifactError, check_files, hash_folder
from tandem.cpu import cpu_flags, cpu_identity, cpu_model_name
from tandem.devices import DeviceSpec
from tandem.export.pipeline import default_runtime
from tandem.runtimes import RuntimeUnavailable, choose_backend, slower_here, unread_files
from tandem.runtimes.capacity import choose_cap, learn_batch_profile
from tandem.tokens import TokenBatch
from tandem.training.fit import bf16_supported

CPU = DeviceSpec()
GPU = DeviceSpec("cuda", 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpu", CPU),
        ("cuda", GPU),
        ("cuda:3", DeviceSpec("cuda", 3)),
        (" CUDA:1 ", DeviceSpec("cuda", 1)),
    ],
)
def test_devices_parse(text: str, expected: DeviceSpec) -> None:
    assert DeviceSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["gpu", "cpu:0", "cuda:", "cuda:x", "mps"])
def test_bad_devices_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not cpu, cuda or cuda:N"):
        DeviceSpec.parse(text)


OPENVINO_INT8 = dataclasses.replace(make_manifest({}), runtime="openvino")
ONNX_INT8 = make_manifest({})
ONNX_FP16 = dataclasses.replace(make_manifest({}), precision="fp16", checkpoint="checkpoint")


@pytest.mark.parametrize(
    ("manifest", "choice", "device", "cuda_ep", "expected"),
    [
        (OPENVINO_INT8, "auto", CPU, False, "openvino"),
        (ONNX_INT8, "auto", CPU, False, "onnxruntime"),
        (ONNX_FP16, "auto", CPU, False, "onnxruntime"),
        (ONNX_FP16, "torch", CPU, False, "torch"),
        (ONNX_FP16, "auto", GPU, True, "onnxruntime"),
        (ONNX_FP16, "auto", GPU, False, "torch"),
        (ONNX_FP16, "torch", GPU, True, "torch"),
        (ONNX_INT8, "onnxruntime", GPU, True, "onnxruntime"),
    ],
)
def test_backend_follows_the_artifact_and_the_device(
    monkeypatch, manifest, choice, device, cuda_ep: bool, expected: str
) -> None:
    monkeypatch.setattr("tandem.runtimes.cuda_provider_available", lambda: cuda_ep)
    assert choose_backend(manifest, choice, device) == expected


@pytest.mark.parametrize(
    ("manifest", "choice", "device", "message"),
    [
        (ONNX_INT8, "torch", CPU, "keeps no checkpoint"),
        (ONNX_INT8, "openvino", CPU, "export with --runtime openvino"),
        (OPENVINO_INT8, "onnxruntime", CPU, "export with --runtime onnxruntime"),
        (OPENVINO_INT8, "auto", GPU, "runs on the CPU only"),
        (ONNX_INT8, "auto", GPU, "an INT8 artifact is for CPUs"),
        (ONNX_FP16, "onnxruntime", GPU, "no CUDA execution provider"),
    ],
)
def test_impossible_combinations_say_what_to_do(
    monkeypatch, manifest, choice, device, message: str
) -> None:
    monkeypatch.setattr("tandem.runtimes.cuda_provider_available", lambda: False)
    with pytest.raises(RuntimeUnavailable, match=message):
        choose_backend(manifest, choice, device)


def test_a_backend_hashes_only_the_files_it_reads(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"weights")
    manifest = dataclasses.replace(ONNX_FP16, files=hash_folder(tmp_path))
    # The checkpoint alone travels to a GPU machine: PyTorch needs no graph.
    (tmp_path / "model.onnx").unlink()
    check_files(tmp_path, manifest, unread=unread_files(manifest, "torch"))
    with pytest.raises(ArtifactError, match="missing"):
        check_files(tmp_path, manifest, unread=unread_files(manifest, "onnxruntime"))
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"altered")
    with pytest.raises(ArtifactError, match="does not match"):
        check_files(tmp_path, manifest, unread=unread_files(manifest, "torch"))


def test_the_cap_is_the_smallest_batch_near_the_best_rate() -> None:
    rates = {1024: 50.0, 2048: 80.0, 4096: 95.0, 8192: 100.0, 16384: 99.0}
    assert choose_cap(rates, fallback=7) == 4096
    assert choose_cap({}, fallback=7) == 7


class TimedRuntime:
    """A device whose run time is a known function of the batch: fixed launch cost plus
    per-token work, running out of memory past ``memory_tokens``."""

    def __init__(self, clock: list[float], *, launch: float, per_token: float, memory_tokens: int):
        self.clock, self.launch, self.per_token = clock, launch, per_token
        self.memory_tokens = memory_tokens
        self.shapes: list[tuple[int, int]] = []

    def run(self, batch: TokenBatch) -> NDArray[np.float32]:
        rows, width = batch.input_ids.shape
        self.shapes.append((rows, width))
        if rows * width > self.memory_tokens:
            raise RuntimeError("CUDA out of memory")
        self.clock[0] += self.launch + self.per_token * rows * width
        return np.zeros((rows, 1), dtype=np.float32)


def test_learning_stops_where_launch_costs_stop_mattering() -> None:
    clock = [0.0]
    # 1 ms per launch and 1 us per token: the best probed rate is at 65,536 tokens (985k/s);
    # 8,192 tokens reach 891k/s (90.5% of it), 4,096 only 804k/s (81.6%).
    device = TimedRuntime(clock, launch=1e-3, per_token=1e-6, memory_tokens=1 << 30)
    profile = learn_batch_profile(device, ceiling=65_536, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert profile.max_batch_tokens == 8192
    assert max(rows * width for rows, width in device.shapes) == 65_536
    # Each probed size's seconds a run, from which the batcher's cost model starts.
    assert profile.seconds == pytest.approx({t: 1e-3 + 1e-6 * t for t in profile.seconds})
    assert sorted(profile.seconds) == [1024 * 2**i for i in range(7)]


def test_learning_stops_at_the_first_out_of_memory() -> None:
    clock = [0.0]
    device = TimedRuntime(clock, launch=1e-3, per_token=1e-6, memory_tokens=4096)
    profile = learn_batch_profile(device, ceiling=65_536, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert profile.max_batch_tokens == 4096
    assert device.shapes[-1] == (32, 256)


AVX2_ONLY = "flags\t\t: fpu sse2 avx fma avx2 f16c\n"
VNNI = "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
AMX = "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile\n"


@pytest.mark.parametrize(
    ("cpuinfo", "int8_runtime", "openvino_is_slower"),
    [(AVX2_ONLY, "onnxruntime", True), (VNNI, "openvino", False), (AMX, "openvino", False)],
)
def test_the_default_int8_runtime_follows_the_cpu(
    monkeypatch: pytest.MonkeyPatch, cpuinfo: str, int8_runtime: str, openvino_is_slower: bool
) -> None:
    monkeypatch.setattr("tandem.cpu.platform.machine", lambda: "x86_64")
    flags = cpu_flags(cpuinfo)
    assert default_runtime("int8", flags) == int8_runtime
    assert default_runtime("fp16", flags) == "onnxruntime"
    assert (slower_here("openvino", CPU, flags) is not None) is openvino_is_slower
    assert slower_here("onnxruntime", CPU, flags) is None


def test_arm_exports_onnxruntime_whatever_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tandem.cpu.platform.machine", lambda: "aarch64")
    assert default_runtime("int8", cpu_flags("Features\t: fp asimd asimddp\n")) == "onnxruntime"


def test_bf16_training_needs_amx_or_avx512_bf16() -> None:
    assert bf16_supported(AMX)
    assert bf16_supported(VNNI)
    assert not bf16_supported(AVX2_ONLY)
    assert cpu_flags("no flags here") == frozenset()


def test_a_cpu_is_told_apart_by_family_and_model_where_its_name_is_masked() -> None:
    block = "vendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: AMD EPYC\n"
    zen4 = "processor\t: 0\n" + block.format(25, 17) + "stepping\t: 1\n" + VNNI
    zen5 = "processor\t: 0\n" + block.format(26, 2) + "stepping\t: 1\n" + VNNI
    # The second processor's fields never leak into the first's.
    zen5 += "\nprocessor\t: 1\nvendor_id\t: GenuineIntel\nmodel\t\t: 143\n"
    assert cpu_model_name(zen4) == cpu_model_name(zen5) == "AMD EPYC"
    assert cpu_flags(zen4) == cpu_flags(zen5)
    assert cpu_identity(zen4) == "AuthenticAMD 25 17 1"
    assert cpu_identity(zen5) == "AuthenticAMD 26 2 1"
    assert cpu_identity("no fields here") == ""
