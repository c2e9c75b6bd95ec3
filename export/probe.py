"""The parity probe: verification text and its FP32 reference outputs, kept in the artifact.

Export measures parity once, on the CPU that exported. A server on another CPU can run the
same graph another way (OpenVINO's bf16 hint, fast on AMX tiles); with the probe it measures
that variant against the same FP32 reference at start-up, without torch or the RAG24 data,
and keeps it only where it clears the bars the artifact was held to and runs faster.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from tandem.artifact import ArtifactError, Kind, Manifest
from tandem.devices import CPU_PRECISIONS, CpuPrecision
from tandem.durable import write_text_atomically
from tandem.encoders import BiEncoder, CrossEncoder, Encoder
from tandem.export.parity import (
    Thresholds,
    embedding_metrics,
    embedding_passes,
    ranking_metrics,
    ranking_passes,
)
from tandem.export.precision_cache import PrecisionCache
from tandem.export.texts import RerankCase
from tandem.runtimes import RuntimeFit
from tandem.runtimes.openvino import OpenVinoRuntime, bf16_capable

log = logging.getLogger(__name__)

PROBE_NAME = "parity_probe.json"
# The probe is the whole verification sample (20 topics x 50 candidates, or 256 passages):
# on a slice of it the verified graph itself can miss the bars (4 topics: top-10 overlap 0.80
# against 0.90 over all 20), so a variant is held to them on the same texts as the graph was.
# Variants are timed on the first topic's candidates, or the first passages.
TIMED_PAIRS = 50
TIMED_TEXTS = 32
# A variant must run the probe this much faster to replace the verified f32 one: two runs on
# a shared machine differ by a few percent with nothing changed.
FASTER_BY = 0.10

E = TypeVar("E", bound=Encoder)
THRESHOLD_NAMES = frozenset(field.name for field in fields(Thresholds))


class PrecisionRefused(ArtifactError):
    """A pinned precision misses the artifact's parity bars on this CPU."""


@dataclass(frozen=True)
class Probe:
    kind: Kind
    texts: tuple[str, ...] = ()  # bi-encoder inputs
    cases: tuple[RerankCase, ...] = ()  # cross-encoder inputs
    reference: tuple[NDArray[np.float32], ...] = ()  # FP32 embeddings (one array), or scores


def embedding_probe(texts: Sequence[str], reference: NDArray[np.float32]) -> Probe:
    return Probe("bi-encoder", texts=tuple(texts), reference=(reference,))


def ranking_probe(cases: Sequence[RerankCase], reference: Sequence[NDArray[np.float32]]) -> Probe:
    return Probe("cross-encoder", cases=tuple(cases), reference=tuple(reference))


def write_probe(folder: Path, probe: Probe) -> None:
    raw = {
        "kind": probe.kind,
        "texts": list(probe.texts),
        "cases": [{"query": case.query, "documents": list(case.documents)} for case in probe.cases],
        "reference": [np.round(array, 6).tolist() for array in probe.reference],
    }
    write_text_atomically(folder / PROBE_NAME, json.dumps(raw) + "\n")


def read_probe(folder: Path) -> Probe | None:
    """The artifact's probe, or None for one exported before probes were kept."""
    path = folder / PROBE_NAME
    if not path.is_file():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    return Probe(
        kind=raw["kind"],
        texts=tuple(raw["texts"]),
        cases=tuple(RerankCase(case["query"], tuple(case["documents"])) for case in raw["cases"]),
        reference=tuple(np.asarray(values, dtype=np.float32) for values in raw["reference"]),
    )


def bars_of(manifest: Manifest) -> Thresholds:
    """The bars the artifact's own verification was held to (the defaults if none recorded)."""
    recorded = {} if manifest.parity is None else manifest.parity.thresholds
    overrides: dict[str, Any] = {}
    for name, value in recorded.items():
        if name.startswith("min_top") and name.endswith("_overlap"):
            topk = int(name.removeprefix("min_top").removesuffix("_overlap"))
            overrides.update(min_topk_overlap=value, topk=topk)
        elif name in THRESHOLD_NAMES:
            overrides[name] = value
    return replace(Thresholds(), **overrides)


def probe_parity(encoder: Encoder, probe: Probe, bars: Thresholds) -> tuple[dict[str, float], bool]:
    """``encoder``'s agreement with the probe's FP32 reference, and whether it clears ``bars``."""
    if isinstance(encoder, BiEncoder):
        vectors = encoder.embed(list(probe.texts), prompt=encoder.prompt(role="document"))
        metrics = embedding_metrics(vectors, probe.reference[0])
        return _rounded(metrics), embedding_passes(metrics, bars)
    assert isinstance(encoder, CrossEncoder)
    got = [encoder.score(case.query, case.documents) for case in probe.cases]
    metrics = ranking_metrics(got, list(probe.reference), k=bars.topk)
    return _rounded(metrics), ranking_passes(metrics, bars)


def probe_seconds(encoder: Encoder, probe: Probe) -> float:
    """Seconds to run the probe's first passages (or pairs) once."""
    started = time.perf_counter()
    if isinstance(encoder, BiEncoder):
        encoder.embed(list(probe.texts[:TIMED_TEXTS]))
    else:
        assert isinstance(encoder, CrossEncoder)
        case = probe.cases[0]
        encoder.score(case.query, case.documents[:TIMED_PAIRS])
    return time.perf_counter() - started


def fit_cpu_precision(
    open_encoder: Callable[[CpuPrecision], E],
    folder: Path,
    pinned: str = "auto",
    *,
    allow_unverified: bool = False,
    bf16_here: Callable[[], bool] = bf16_capable,
    rounds: int = 3,
    cache: PrecisionCache | None = None,
) -> tuple[E, RuntimeFit]:
    """Opens the artifact in the precision that runs it fastest here at parity.

    ``pinned`` ("f32" or "bf16") is the user's choice; "auto" tries bf16 where this CPU runs
    it, keeps it only if it runs at least ``FASTER_BY`` faster than f32 and clears the
    artifact's bars on the probe, and keeps f32 otherwise. With a ``cache``, what "auto"
    measured is kept there and a later start on the same CPU reuses it.
    """
    encoder = open_encoder("f32")
    backend = encoder.runtime.backend
    if backend != "openvino":
        return encoder, RuntimeFit(backend, "", f"{backend} runs the graph as it was exported")
    if pinned == "f32":
        return encoder, RuntimeFit(backend, "f32", "pinned: --cpu-precision f32")
    if pinned not in ("auto", *CPU_PRECISIONS):
        raise ValueError(f"cpu precision {pinned!r} is not one of auto, f32, bf16")
    if pinned == "auto" and not bf16_here():
        return encoder, RuntimeFit(
            backend, "f32", "this CPU has no bf16 matmul (AMX or avx512_bf16): f32"
        )
    remembered = cache.recall() if cache is not None and pinned == "auto" else None
    if remembered is not None and remembered.precision == "f32":
        return encoder, remembered
    candidate = open_encoder("bf16")
    runtime = candidate.runtime
    if not isinstance(runtime, OpenVinoRuntime) or runtime.precision != "bf16":
        return encoder, RuntimeFit(
            backend,
            "f32",
            "bf16 asked for, but OpenVINO runs f32 on this CPU (no bf16 matmul)",
        )
    if remembered is not None:
        return candidate, remembered
    probe = read_probe(folder)
    if probe is None:
        why = "the artifact has no parity probe (exported before probes were kept)"
        if pinned == "bf16":
            return candidate, RuntimeFit(backend, "bf16", f"pinned: --cpu-precision bf16; {why}")
        return encoder, RuntimeFit(backend, "f32", f"{why}: re-export to let start-up try bf16")
    chosen, fit = choose_variant(
        encoder,
        candidate,
        probe,
        folder=folder,
        pinned=pinned == "bf16",
        allow_unverified=allow_unverified,
        rounds=rounds,
    )
    if cache is not None and pinned == "auto":
        cache.keep(fit)
    return chosen, fit


def choose_variant(
    f32: E,
    bf16: E,
    probe: Probe,
    *,
    folder: Path,
    pinned: bool,
    allow_unverified: bool = False,
    rounds: int = 3,
    faster_by: float = FASTER_BY,
) -> tuple[E, RuntimeFit]:
    """``bf16`` where it runs the probe ``faster_by`` faster and clears the artifact's bars on
    it (or where ``pinned``), else the verified ``f32``. A pinned variant below the bars is
    refused unless ``allow_unverified``.

    Timing comes first: it costs a few runs of one topic, parity the whole probe (1,000 pairs
    for a reranker: most of a 35 s start-up on a 2-core EPYC), so a variant too slow to be kept
    is never measured for parity unless it was pinned.
    """
    backend = f32.runtime.backend
    seconds = _time_both(f32, bf16, probe, rounds=rounds)
    timing = f"bf16 ran the probe in {seconds['bf16']:.3f} s, f32 in {seconds['f32']:.3f} s"
    if not pinned and seconds["bf16"] > seconds["f32"] * (1 - faster_by):
        return f32, RuntimeFit(
            backend,
            "f32",
            f"bf16 not {faster_by:.0%} faster ({timing}); its parity was not measured",
            seconds=seconds,
        )
    bars = bars_of(f32.manifest)
    metrics, passed = probe_parity(bf16, probe, bars)
    if not passed:
        missed = f"bf16 misses the parity bars on the probe: {metrics} (need {bars})"
        if pinned and not allow_unverified:
            raise PrecisionRefused(
                f"{folder}: {missed}. Serve f32 (--cpu-precision auto or f32), or pass "
                "--allow-unverified to serve bf16 anyway"
            )
        if pinned:
            log.warning("SERVING BF16 BELOW THE PARITY BARS", extra={"folder": str(folder)})
            return bf16, RuntimeFit(backend, "bf16", f"pinned; {missed}", metrics, seconds)
        return f32, RuntimeFit(backend, "f32", f"{missed}; {timing}", metrics, seconds)
    if pinned:
        return bf16, RuntimeFit(backend, "bf16", f"pinned; {timing}", metrics, seconds)
    return bf16, RuntimeFit(backend, "bf16", f"at parity, {timing}", metrics, seconds)


def _time_both(f32: Encoder, bf16: Encoder, probe: Probe, *, rounds: int) -> dict[str, float]:
    """Each variant's best of ``rounds``, alternating, after one untimed run each (OpenVINO
    prepares a shape on its first run)."""
    variants = {"f32": f32, "bf16": bf16}
    best = dict.fromkeys(variants, float("inf"))
    for encoder in variants.values():
        probe_seconds(encoder, probe)
    for _ in range(rounds):
        for name, encoder in variants.items():
            best[name] = min(best[name], probe_seconds(encoder, probe))
    return {name: round(value, 4) for name, value in best.items()}


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 4) for name, value in metrics.items()}
