"""Checks an artifact against the FP32 PyTorch reference on real RAG24 text; records it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from tandem.artifact import (
    ArtifactError,
    Manifest,
    Parity,
    check_files,
    read_manifest,
    write_manifest,
)
from tandem.devices import BackendChoice, DeviceSpec
from tandem.durable import sha256_file
from tandem.encoders import BiEncoder, CrossEncoder
from tandem.export import reference
from tandem.export.errors import InvalidSource, ParityFailure
from tandem.export.parity import (
    Thresholds,
    embedding_metrics,
    embedding_passes,
    ranking_metrics,
    ranking_passes,
)
from tandem.export.probe import PROBE_NAME, Probe, embedding_probe, ranking_probe, write_probe
from tandem.export.source import ModelSource, resolve
from tandem.export.texts import passages, rerank_cases
from tandem.rag24 import Rag24
from tandem.runtimes import choose_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """How much real text a verification uses; the defaults meet the issue's minimums."""

    texts: int = 256
    queries: int = 20
    candidates: int = 50


def measure(
    folder: Path,
    source: ModelSource,
    data: Rag24,
    *,
    bars: Thresholds,
    sample: Sample,
    threads: int = 2,
    device: str = "cpu",
    backend: BackendChoice = "auto",
) -> tuple[Parity, Probe]:
    """The artifact's parity, and the probe (a slice of the same text and reference) that a
    server on another CPU checks a faster variant against."""
    manifest = read_manifest(folder)
    if manifest.kind == "bi-encoder":
        texts = passages(data, count=sample.texts, part="verify")
        encoder = BiEncoder(folder, threads=threads, device=device, backend=backend)
        # Passages, so with the document prompt the server stores them with.
        prompt = encoder.prompt(role="document")
        got = encoder.embed(texts, prompt=prompt)
        want = reference.embed(
            source.path, texts, max_length=manifest.max_length, threads=threads, prompt=prompt
        )
        metrics = embedding_metrics(got, want)
        passed = embedding_passes(metrics, bars)
        thresholds = {"min_mean_cosine": bars.min_mean_cosine, "min_cosine": bars.min_cosine}
        n_texts, n_queries = len(texts), 0
        reference_name = "sentence_transformers.SentenceTransformer.encode, torch fp32"
        probe = embedding_probe(texts, want)
    else:
        cases = rerank_cases(
            data, queries=sample.queries, candidates=sample.candidates, part="verify"
        )
        scorer = CrossEncoder(folder, threads=threads, device=device, backend=backend)
        got_scores = [scorer.score(case.query, case.documents) for case in cases]
        want_scores = reference.score(
            source.path,
            [(case.query, case.documents) for case in cases],
            max_length=manifest.max_length,
            threads=threads,
        )
        metrics = ranking_metrics(got_scores, want_scores, k=bars.topk)
        passed = ranking_passes(metrics, bars)
        thresholds = {
            "min_mean_spearman": bars.min_mean_spearman,
            f"min_top{bars.topk}_overlap": bars.min_topk_overlap,
        }
        n_texts = sum(len(case.documents) for case in cases)
        n_queries = len(cases)
        reference_name = "sentence_transformers.CrossEncoder.predict (raw logits), torch fp32"
        probe = ranking_probe(cases, want_scores)
    parity = Parity(
        passed=passed,
        metrics={name: round(value, 6) for name, value in metrics.items()},
        thresholds=thresholds,
        reference=reference_name,
        texts="TREC RAG 2024 (ir_axioms==1.2.5 sdist), verification split",
        n_texts=n_texts,
        n_queries=n_queries,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return parity, probe


def verify_folder(
    folder: Path,
    data: Rag24,
    *,
    bars: Thresholds,
    sample: Sample,
    model: str | None = None,
    threads: int = 2,
    device: str = "cpu",
    backend: BackendChoice = "auto",
) -> Manifest:
    """Measures parity, writes it into the manifest, and raises if the thresholds are missed.

    A failed check is written too (``passed: false``), so the manifest never claims more than
    was measured last.
    """
    try:
        manifest = read_manifest(folder)
        check_files(folder, manifest, unread=manifest.graph_files if backend == "torch" else ())
    except ArtifactError as exc:
        raise InvalidSource(str(exc)) from exc
    source = resolve(model or manifest.source)
    parity, probe = measure(
        folder, source, data, bars=bars, sample=sample, threads=threads, device=device,
        backend=backend,
    )  # fmt: skip
    chosen = choose_backend(manifest, backend, DeviceSpec.parse(device))
    if chosen == "torch":
        # The manifest's parity is the graph's; the checkpoint's is reported, not recorded.
        if not parity.passed:
            raise ParityFailure(
                f"{folder} on PyTorch ({device}): parity {parity.metrics} below {parity.thresholds}"
            )
        return manifest.with_parity(parity)
    write_probe(folder, probe)
    files = {**manifest.files, PROBE_NAME: sha256_file(folder / PROBE_NAME)}
    updated = replace(manifest.with_parity(parity), files=files)
    write_manifest(folder, updated)
    if not parity.passed:
        raise ParityFailure(
            f"{folder}: parity below thresholds: {parity.metrics} (need {parity.thresholds}); "
            "the artifact is marked unverified"
        )
    return updated
