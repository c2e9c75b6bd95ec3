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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from tandem.artifact import ArtifactError, Kind, Manifest
from tandem.devices import CPU_PRECISIONS, UNQUANTIZED, CpuPrecision
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
# Most faithful to the FP32 reference first: on AMX the unquantized graph in bf16 kept top-5
# overlap with FP32 at 0.99, the INT8 graph at 0.92 in either precision (benchmarks/RESULTS.md,
# "AMX"); the INT8 graph's verified f32 comes before its bf16. A less faithful variant
# replaces a more faithful one only where it runs FASTER_BY faster at parity.
FIDELITY: tuple[CpuPrecision, ...] = (UNQUANTIZED, "f32", "bf16")

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
    """Opens the artifact in the most faithful variant that runs here at parity and that no
    other at parity runs ``FASTER_BY`` faster than.

    ``pinned`` (one of ``CPU_PRECISIONS``) is the user's choice; "auto" tries the bf16
    variants where this CPU runs bf16 (the INT8 graph's unquantized ops in bf16, and the
    unquantized graph where the artifact keeps one), and ``choose_variant`` keeps the most
    faithful one at parity that no other beats by ``FASTER_BY``. With a ``cache``, what
    "auto" measured is kept there and a later start on the same CPU reuses it.
    """
    encoder = open_encoder("f32")
    backend = encoder.runtime.backend
    if backend != "openvino":
        return encoder, RuntimeFit(backend, "", f"{backend} runs the graph as it was exported")
    if pinned == "f32":
        return encoder, RuntimeFit(backend, "f32", "pinned: --cpu-precision f32")
    if pinned not in ("auto", *CPU_PRECISIONS):
        raise ValueError(
            f"cpu precision {pinned!r} is not one of auto, {', '.join(CPU_PRECISIONS)}"
        )
    if pinned == "auto" and not bf16_here():
        return encoder, RuntimeFit(
            backend, "f32", "this CPU has no bf16 matmul (AMX or avx512_bf16): f32"
        )
    remembered = cache.recall() if cache is not None and pinned == "auto" else None
    if remembered is not None and remembered.precision == "f32":
        return encoder, remembered
    candidates, fallbacks = _open_variants(
        open_encoder, _wanted(encoder.manifest, pinned, remembered)
    )
    if not candidates:
        return encoder, RuntimeFit(backend, "f32", "; ".join(fallbacks))
    if remembered is not None and remembered.precision in candidates:
        return candidates[remembered.precision], remembered
    probe = read_probe(folder)
    if probe is None:
        why = "the artifact has no parity probe (exported before probes were kept)"
        if pinned != "auto":
            return candidates[cast(CpuPrecision, pinned)], RuntimeFit(
                backend, pinned, f"pinned: --cpu-precision {pinned}; {why}"
            )
        return encoder, RuntimeFit(backend, "f32", f"{why}: re-export to let start-up try bf16")
    chosen, fit = choose_variant(
        encoder,
        candidates,
        probe,
        folder=folder,
        pinned=pinned != "auto",
        allow_unverified=allow_unverified,
        rounds=rounds,
    )
    if cache is not None and pinned == "auto":
        cache.keep(fit)
    return chosen, fit


def _wanted(
    manifest: Manifest, pinned: str, remembered: RuntimeFit | None
) -> tuple[CpuPrecision, ...]:
    """The variants to open: the pinned one, the one kept, or every bf16 one the artifact
    can run (the unquantized graph only where the export kept it)."""
    if pinned != "auto":
        return (cast(CpuPrecision, pinned),)
    if remembered is not None:
        return (cast(CpuPrecision, remembered.precision),)
    return tuple(
        precision
        for precision in CPU_PRECISIONS
        if precision != "f32" and (precision != UNQUANTIZED or manifest.has_unquantized_graph)
    )


def _open_variants(
    open_encoder: Callable[[CpuPrecision], E], wanted: Sequence[CpuPrecision]
) -> tuple[dict[CpuPrecision, E], list[str]]:
    """Each wanted variant that OpenVINO really runs as asked, and why any other is not."""
    opened: dict[CpuPrecision, E] = {}
    refused: list[str] = []
    for precision in wanted:
        candidate = open_encoder(precision)
        runtime = candidate.runtime
        if isinstance(runtime, OpenVinoRuntime) and runtime.precision == precision:
            opened[precision] = candidate
        else:
            refused.append(
                f"{precision} asked for, but OpenVINO runs f32 on this CPU (no bf16 matmul)"
            )
    return opened, refused


def choose_variant(
    f32: E,
    variants: Mapping[CpuPrecision, E],
    probe: Probe,
    *,
    folder: Path,
    pinned: bool,
    allow_unverified: bool = False,
    rounds: int = 3,
    faster_by: float = FASTER_BY,
) -> tuple[E, RuntimeFit]:
    """The most faithful of ``f32`` and ``variants`` (``FIDELITY``) that clears the
    artifact's bars on the probe and that no less faithful one at parity runs ``faster_by``
    faster; with ``pinned``, the one variant given, unless it misses the bars (refused
    unless ``allow_unverified``).

    Timing comes first: it costs a few runs of one topic, parity the whole probe (1,000 pairs
    for a reranker: most of a 35 s start-up on a 2-core EPYC), so a variant is measured for
    parity only where the choice turns on it.
    """
    backend = f32.runtime.backend
    encoders: dict[CpuPrecision, E] = {"f32": f32, **variants}
    seconds = _time_all(encoders, probe, rounds=rounds)
    timing = _timing(seconds)
    bars = bars_of(f32.manifest)
    measured: dict[CpuPrecision, tuple[dict[str, float], bool]] = {}

    def at_parity(name: CpuPrecision) -> bool:
        if name == "f32":
            return True  # the verified graph, as exported
        if name not in measured:
            measured[name] = probe_parity(encoders[name], probe, bars)
        return measured[name][1]

    if pinned:
        ((name, variant),) = variants.items()
        at_parity(name)
        metrics, passed = measured[name]
        if not passed:
            missed = _missed(name, metrics, bars)
            if not allow_unverified:
                raise PrecisionRefused(
                    f"{folder}: {missed}. Serve f32 (--cpu-precision auto or f32), or pass "
                    f"--allow-unverified to serve {name} anyway"
                )
            log.warning("SERVING BELOW THE PARITY BARS", extra={"folder": str(folder)})
            return variant, RuntimeFit(backend, name, f"pinned; {missed}", metrics, seconds)
        return variant, RuntimeFit(backend, name, f"pinned; {timing}", metrics, seconds)
    chosen: CpuPrecision = "f32"
    for name in (name for name in FIDELITY if name in encoders):
        less_faithful = FIDELITY[FIDELITY.index(name) + 1 :]
        # The verified graph first (its parity is known), then the fastest.
        challengers = sorted(
            (other for other in less_faithful if other in encoders),
            key=lambda other: (other != "f32", seconds[other]),
        )
        beaten = any(
            at_parity(other)
            for other in challengers
            if seconds[other] <= seconds[name] * (1 - faster_by)
        )
        if not beaten and at_parity(name):
            chosen = name
            break
    missed = "; ".join(
        _missed(name, metrics, bars) for name, (metrics, passed) in measured.items() if not passed
    )
    if chosen != "f32":
        reason = (
            f"at parity, {chosen}: the most faithful variant that none at parity runs "
            f"{faster_by:.0%} faster than ({timing})" + (f"; {missed}" if missed else "")
        )
        return encoders[chosen], RuntimeFit(backend, chosen, reason, measured[chosen][0], seconds)
    if missed:
        failed = next(metrics for metrics, passed in measured.values() if not passed)
        return f32, RuntimeFit(backend, "f32", f"{missed}; {timing}", failed, seconds)
    return f32, RuntimeFit(
        backend,
        "f32",
        f"{', '.join(variants)} not {faster_by:.0%} faster ({timing}); parity was not measured",
        seconds=seconds,
    )


def _missed(name: str, metrics: dict[str, float], bars: Thresholds) -> str:
    return f"{name} misses the parity bars on the probe: {metrics} (need {bars})"


def _timing(seconds: Mapping[str, float]) -> str:
    """``bf16 ran the probe in 0.704 s, f32 in 0.941 s``: fastest first."""
    (name, value), *rest = sorted(seconds.items(), key=lambda item: item[1])
    others = (f"{other} in {taken:.3f} s" for other, taken in rest)
    return ", ".join([f"{name} ran the probe in {value:.3f} s", *others])


def _time_all(
    encoders: Mapping[CpuPrecision, Encoder], probe: Probe, *, rounds: int
) -> dict[str, float]:
    """Each variant's best of ``rounds``, alternating, after one untimed run each (OpenVINO
    prepares a shape on its first run)."""
    best: dict[str, float] = dict.fromkeys(encoders, float("inf"))
    for encoder in encoders.values():
        probe_seconds(encoder, probe)
    for _ in range(rounds):
        for name, encoder in encoders.items():
            best[name] = min(best[name], probe_seconds(encoder, probe))
    return {name: round(value, 4) for name, value in best.items()}


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 4) for name, value in metrics.items()}
