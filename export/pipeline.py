"""`tandem export`: checkpoint -> FP32 ONNX -> optimized graph -> INT8/FP16 -> verified artifact.

Work happens in a staging folder beside ``--out`` and is renamed into place only when it is
complete, so a failed or interrupted export leaves no partial output behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

import tandem
from tandem.artifact import (
    CHECKPOINT_DIR,
    MODEL_NAME,
    OPENVINO_UNQUANTIZED_XML,
    GraphRuntime,
    Kind,
    Manifest,
    Precision,
    Prompts,
    Role,
    hash_folder,
    write_manifest,
)
from tandem.cpu import cpu_flags, has_int8_dot_product, is_x86
from tandem.encoders import BiEncoder, CrossEncoder, TokenBatch, load_tokenizer
from tandem.export.checkpoint import keep_checkpoint
from tandem.export.errors import OutputConflict, ParityFailure, UsageError
from tandem.export.graph import DEFAULT_OPSET, export_fp32, optimize
from tandem.export.openvino import quantize_static
from tandem.export.openvino import save_fp32 as save_openvino_fp32
from tandem.export.parity import (
    Thresholds,
    embedding_metrics,
    embedding_passes,
    ranking_metrics,
    ranking_passes,
)
from tandem.export.quantize import (
    PRESETS,
    Preset,
    choose_exclusions,
    convert_fp16,
    detect_preset,
    local_errors,
    quantize_int8,
)
from tandem.export.source import (
    ModelSource,
    check_kind,
    default_max_length,
    matryoshka_sizes,
    resolve,
    sentence_transformers_pooling,
    sentence_transformers_prompts,
)
from tandem.export.texts import passages, rerank_cases
from tandem.export.verify import Sample, verify_folder
from tandem.matryoshka import Matryoshka
from tandem.rag24 import Rag24
from tandem.tokens import crowding_prompt

log = logging.getLogger(__name__)

VERSIONED = (
    "torch", "transformers", "sentence-transformers", "optimum", "optimum-onnx", "onnx",
    "onnxruntime", "tokenizers", "openvino", "nncf",
)  # fmt: skip
# Calibration aims a little above the bars, since verification runs on other texts.
CALIBRATION_MARGIN = 0.004
# Static INT8 fixes activation scales on the calibration split's first 5 topics x 50 candidates.
STATIC_CALIBRATION_QUERIES = 5
# ...and a bi-encoder's on 128 passages and this many queries (the calibration split's).
STATIC_QUERIES = 64


@dataclass(frozen=True)
class ExportRequest:
    kind: Kind
    model: str
    out: Path
    precision: Precision = "int8"
    preset: str | None = None
    max_length: int | None = None
    force: bool = False
    opset: int = DEFAULT_OPSET
    bars: Thresholds = field(default_factory=Thresholds)
    sample: Sample = field(default_factory=Sample)
    threads: int = 2
    runtime: GraphRuntime | None = None  # None: default_runtime(precision)
    # A bi-encoder's prompts by name, over the checkpoint's own, and the one used by default.
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # The prefix sizes the model was trained to be cut to, over its config.json's.
    matryoshka: Matryoshka | None = None


def default_runtime(precision: Precision, flags: frozenset[str] | None = None) -> GraphRuntime:
    """OpenVINO's static INT8 for x86 CPUs with an INT8 dot-product instruction (VNNI, AMX),
    where it ran 1.4-1.5x faster than onnxruntime's dynamic INT8 at parity; onnxruntime
    elsewhere: on AVX2 alone OpenVINO's ran at 0.55-0.57x of it (benchmarks/RESULTS.md, "CPU
    runtimes"), and for GPUs (FP16), Arm, and FP32."""
    if precision != "int8" or not is_x86():
        return "onnxruntime"
    return (
        "openvino"
        if has_int8_dot_product(cpu_flags() if flags is None else flags)
        else "onnxruntime"
    )


def check_output(out: Path, source: ModelSource, *, force: bool) -> None:
    out_abs, source_abs = out.resolve(), source.path.resolve()
    if out_abs == source_abs or source_abs in out_abs.parents or out_abs in source_abs.parents:
        raise OutputConflict(
            f"--out {out} overlaps the input model folder {source.path}; choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise OutputConflict(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputConflict(f"--out {out} is not empty; pass --force to replace it")


def export_model(request: ExportRequest, data: Rag24) -> Manifest:
    """Runs the whole export and returns the verified manifest; raises ExportError on failure."""
    if request.preset is not None and request.preset not in PRESETS:
        raise UsageError(f"unknown preset {request.preset!r}; use one of {', '.join(PRESETS)}")
    source = resolve(request.model)
    check_kind(source, request.kind)
    check_output(request.out, source, force=request.force)
    prompts = _prompts(request, source)
    matryoshka = _matryoshka(request, source)
    max_length = request.max_length or default_max_length(source, request.kind)
    if not 1 <= max_length <= source.max_positions:
        raise UsageError(
            f"--max-length {max_length} is outside 1..{source.max_positions} for this model"
        )
    _check_prompts_fit(source, prompts, max_length=max_length)
    request.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{request.out.name}.partial-", dir=request.out.parent))
    try:
        _build(
            request, source, staging, data,
            max_length=max_length, prompts=prompts, matryoshka=matryoshka,
        )  # fmt: skip
        _publish(staging / "artifact", request.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        return verify_folder(
            request.out, data, bars=request.bars, sample=request.sample, threads=request.threads
        )
    except ParityFailure:
        log.error("export written to %s but NOT verified", request.out)
        raise


def _prompts(request: ExportRequest, source: ModelSource) -> Prompts:
    if request.kind == "bi-encoder":
        return sentence_transformers_prompts(source, request.prompts, request.default_prompt_name)
    if request.prompts or request.default_prompt_name is not None:
        raise UsageError("prompts are a bi-encoder's; a cross-encoder reads (query, document)")
    return Prompts()


def _matryoshka(request: ExportRequest, source: ModelSource) -> Matryoshka | None:
    if request.kind == "bi-encoder":
        return matryoshka_sizes(source, request.matryoshka)
    if request.matryoshka is not None:
        raise UsageError("Matryoshka sizes are a bi-encoder's; a cross-encoder returns a score")
    return None


def _check_prompts_fit(source: ModelSource, prompts: Prompts, *, max_length: int) -> None:
    """Refuses, before any work, a prompt that would leave no room for text (the server
    would refuse to open the artifact)."""
    whole = load_tokenizer(source.path, max_length=max_length)
    whole.no_truncation()
    crowded = crowding_prompt(whole, prompts.texts, max_length=max_length)
    if crowded is not None:
        name, tokens = crowded
        raise UsageError(
            f"prompt {name!r} takes {tokens} of the {max_length} tokens the model reads, "
            "leaving none for the text: shorten it, or raise --max-length"
        )


def _build(
    request: ExportRequest,
    source: ModelSource,
    staging: Path,
    data: Rag24,
    *,
    max_length: int,
    prompts: Prompts,
    matryoshka: Matryoshka | None,
) -> Manifest:
    raw_dir = staging / "raw"
    log.info("exporting %s (%s) to ONNX, opset %d", source.spec, request.kind, request.opset)
    raw = export_fp32(source, request.kind, raw_dir, opset=request.opset)
    optimized = staging / "optimized.onnx"
    fused = optimize(raw, optimized, source)
    log.info("transformer optimizer fused: %s", fused)

    runtime = request.runtime or default_runtime(request.precision)
    if runtime == "openvino" and request.precision == "fp16":
        raise UsageError(
            "FP16 artifacts are for GPUs, which OpenVINO does not serve here; "
            "use --runtime onnxruntime"
        )
    artifact = staging / "artifact"
    artifact.mkdir()
    for path in raw_dir.iterdir():
        if path.is_file() and path.suffix != ".onnx" and not path.name.endswith(".onnx_data"):
            shutil.copy2(path, artifact / path.name)
    pooling = sentence_transformers_pooling(source) if request.kind == "bi-encoder" else None
    manifest = Manifest(
        kind=request.kind,
        source=source.recorded_name,
        architecture=source.architecture,
        model_type=source.model_type,
        precision=request.precision,
        preset=None,
        max_length=max_length,
        inputs=(),
        opset=request.opset,
        pooling=pooling,
        quantization={"method": "none", "fused_operators": fused},
        versions=_versions(),
        files={},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        extra={"source_revision": source.revision} if source.revision else {},
        runtime=runtime,
        prompts=prompts,
        matryoshka=matryoshka,
    )
    # The FP32 graph is written first: calibration compares INT8 candidates with it.
    if runtime == "openvino":
        save_openvino_fp32(raw, artifact)
    else:
        shutil.copy2(optimized, artifact / MODEL_NAME)
    write_manifest(artifact, manifest)
    if request.precision == "int8" and runtime == "openvino":
        manifest = _quantize_static(manifest, artifact, raw, request, data)
    elif request.precision == "int8":
        preset = PRESETS[request.preset or detect_preset()]
        manifest = _quantize(manifest, artifact, optimized, preset, request, data)
    elif request.precision == "fp16":
        convert_fp16(optimized, artifact / MODEL_NAME)
        manifest = _replace_quantization(manifest, {"method": "fp16", "keep_io_types": True})
        log.info("keeping the checkpoint in fp16 for the PyTorch backend")
        keep_checkpoint(source, request.kind, artifact / CHECKPOINT_DIR)
        manifest = replace(manifest, checkpoint=CHECKPOINT_DIR)
    inputs = _graph_inputs(raw)
    manifest = _with_files(manifest, artifact, inputs)
    write_manifest(artifact, manifest)
    return manifest


def _quantize(
    manifest: Manifest,
    artifact: Path,
    optimized: Path,
    preset: Preset,
    request: ExportRequest,
    data: Rag24,
) -> Manifest:
    calibration = _Calibration(artifact, request, data)
    errors = local_errors(optimized, calibration.feeds(), preset=preset)
    ranked = sorted(errors, key=lambda name: -errors[name])
    candidate = artifact / MODEL_NAME
    trials: list[dict[str, object]] = []

    def passes(excluded: Sequence[str]) -> bool:
        quantize_int8(optimized, candidate, preset=preset, exclude=excluded)
        metrics, ok = calibration.check(margin=CALIBRATION_MARGIN)
        trials.append({"fp32_nodes": len(excluded), "passed": ok, **metrics})
        log.info("INT8 with %d FP32 nodes: %s -> %s", len(excluded), metrics, ok)
        return ok

    excluded, passed = choose_exclusions(ranked, passes, max_excluded=len(ranked))
    # The bisection may end on another candidate; write the chosen one last.
    quantize_int8(optimized, candidate, preset=preset, exclude=excluded)
    if not passed:
        log.warning("no mixed-precision plan met the parity bars on calibration text")
    return _replace_quantization(
        manifest,
        {
            "method": "dynamic",
            "weights": "s8",
            "activations": "u8 (per batch)",
            "per_channel": preset.per_channel,
            "reduce_range": preset.reduce_range,
            "fp32_nodes": excluded,
            "quantized_nodes": len(ranked) - len(excluded),
            "selection": "local INT8 error rank, bisected on calibration parity",
            "calibration_trials": trials,
            "fused_operators": manifest.quantization.get("fused_operators", {}),
        },
        preset=preset.name,
    )


def _quantize_static(
    manifest: Manifest, artifact: Path, raw: Path, request: ExportRequest, data: Rag24
) -> Manifest:
    """NNCF static INT8, with the same mixed-precision search as the dynamic path: the weight
    MatMuls with the worst local INT8 error stay FP32, as few as calibration parity allows."""
    calibration = _Calibration(artifact, request, data)
    static_feeds = calibration.static_feeds()
    errors = local_errors(raw, calibration.feeds(), preset=PRESETS["avx512_vnni"])
    ranked = sorted(errors, key=lambda name: -errors[name])
    trials: list[dict[str, object]] = []

    def passes(excluded: Sequence[str]) -> bool:
        quantize_static(raw, artifact, static_feeds, exclude=excluded)
        metrics, ok = calibration.check(margin=CALIBRATION_MARGIN)
        trials.append({"fp32_nodes": len(excluded), "passed": ok, **metrics})
        log.info("static INT8 with %d FP32 nodes: %s -> %s", len(excluded), metrics, ok)
        return ok

    excluded, passed = choose_exclusions(ranked, passes, max_excluded=len(ranked))
    quantize_static(raw, artifact, static_feeds, exclude=excluded)
    # Kept beside it: on AMX tiles the unquantized graph ran in bf16 as fast as the INT8 one,
    # at parity next to FP32's (benchmarks/RESULTS.md, "AMX"), so a server there may choose
    # it. Its weights stay FP32: stored in FP16 (half the disk), the stand-in in bf16 kept
    # top-10 overlap with FP32 at 0.94 on the parity probe, against 0.985.
    save_openvino_fp32(raw, artifact, OPENVINO_UNQUANTIZED_XML)
    if not passed:
        log.warning("no mixed-precision plan met the parity bars on calibration text")
    return _replace_quantization(
        manifest,
        {
            "method": "static",
            "tool": "nncf",
            "weights": "s8 per channel",
            "activations": "u8/s8, scales fixed on calibration text",
            "calibration_pairs" if request.kind == "cross-encoder" else "calibration_texts": sum(
                len(feed["input_ids"]) for feed in static_feeds
            ),
            # What verification ran. Faster on some CPUs, slower on others: a server tries
            # bf16 at start-up, held to these bars (--cpu-precision).
            "inference_precision": "f32 (verified so; a server may run bf16 where it is "
            "faster at parity: --cpu-precision)",
            "fp32_nodes": excluded,
            "quantized_nodes": len(ranked) - len(excluded),
            "selection": "local INT8 error rank, bisected on calibration parity",
            "calibration_trials": trials,
        },
    )


class _Calibration:
    """Calibration inputs and the FP32 outputs that INT8 candidates must stay close to."""

    def __init__(self, artifact: Path, request: ExportRequest, data: Rag24) -> None:
        self.artifact = artifact
        self.kind = request.kind
        self.bars = request.bars
        self.threads = request.threads
        if self.kind == "bi-encoder":
            self.texts = passages(data, count=128, part="calibrate")
            self.queries = [topic.query for topic in data.topics[1::2][:STATIC_QUERIES]]
            self.reference = [self._embed()]
        else:
            self.cases = rerank_cases(data, queries=8, candidates=50, part="calibrate")
            self.reference = self._score()

    def _embed(self) -> NDArray[np.float32]:
        encoder = BiEncoder(self.artifact, threads=self.threads, check_hashes=False)
        return encoder.embed(self.texts, prompt=encoder.prompt(role="document"))

    def _score(self) -> list[NDArray[np.float32]]:
        scorer = CrossEncoder(self.artifact, threads=self.threads, check_hashes=False)
        return [scorer.score(case.query, case.documents) for case in self.cases]

    def feeds(self) -> list[dict[str, NDArray[np.int64]]]:
        batches: list[TokenBatch]
        if self.kind == "bi-encoder":
            encoder = BiEncoder(self.artifact, threads=self.threads, check_hashes=False)
            prompt = encoder.prompt(role="document")
            batches = [
                encoder.tokenize(self.texts[start : start + 16], prompt=prompt)
                for start in (0, 32, 64, 96)
            ]
            names = encoder.input_names
        else:
            scorer = CrossEncoder(self.artifact, threads=self.threads, check_hashes=False)
            batches = [
                scorer.tokenize_pairs(case.query, case.documents[:16]) for case in self.cases[:4]
            ]
            names = scorer.input_names
        return [batch.feed(names) for batch in batches]

    def static_feeds(self, *, rows: int = 4) -> list[dict[str, NDArray[np.int64]]]:
        """Calibration text (250 pairs, or 128 passages and 64 queries), in small batches: the
        activation ranges that static INT8 fixes come from these."""
        batches: list[TokenBatch]
        if self.kind == "bi-encoder":
            # Queries too: a served bi-encoder embeds short queries far more often than
            # passages, and their activations fall outside ranges fixed on passages alone.
            # Each with the prompt it is served with.
            encoder = BiEncoder(self.artifact, threads=self.threads, check_hashes=False)
            served: list[tuple[list[str], Role]] = [
                (self.texts, "document"),
                (self.queries, "query"),
            ]
            batches = [
                encoder.tokenize(texts[start : start + rows], prompt=encoder.prompt(role=role))
                for texts, role in served
                for start in range(0, len(texts), rows)
            ]
            names = encoder.input_names
        else:
            scorer = CrossEncoder(self.artifact, threads=self.threads, check_hashes=False)
            batches = [
                scorer.tokenize_pairs(case.query, case.documents[start : start + rows])
                for case in self.cases[:STATIC_CALIBRATION_QUERIES]
                for start in range(0, len(case.documents), rows)
            ]
            names = scorer.input_names
        return [batch.feed(names) for batch in batches]

    def check(self, *, margin: float) -> tuple[dict[str, float], bool]:
        if self.kind == "bi-encoder":
            metrics = embedding_metrics(self._embed(), self.reference[0])
            return metrics, embedding_passes(metrics, self.bars, margin=margin)
        metrics = ranking_metrics(self._score(), self.reference, k=self.bars.topk)
        return metrics, ranking_passes(metrics, self.bars, margin=margin)


def _replace_quantization(
    manifest: Manifest, quantization: dict[str, object], *, preset: str | None = None
) -> Manifest:
    return replace(manifest, quantization=quantization, preset=preset)


def _with_files(manifest: Manifest, artifact: Path, inputs: tuple[str, ...]) -> Manifest:
    return replace(manifest, files=hash_folder(artifact), inputs=inputs)


def _graph_inputs(model_path: Path) -> tuple[str, ...]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return tuple(node.name for node in model.graph.input)


def _versions() -> dict[str, str]:
    versions = {"tandem": tandem.__version__}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _publish(artifact: Path, out: Path) -> None:
    """Moves the finished artifact into place; a replaced folder is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    artifact.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
