"""The start-up choice of OpenVINO's CPU precision, on real exports of the stand-in reranker.

On a CPU without bf16 matmuls (AVX2, or AVX-512 without AMX or avx512_bf16) f32 is the only
choice; the gate that keeps a faster variant only at parity is tested here with real
variants, and on a CPU with bf16 matmuls (AMX, or avx512_bf16 where OpenVINO reports BF16)
the same tests see bf16 tried for real, and the choice kept for the next start.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tandem.artifact import read_manifest
from tandem.devices import CpuPrecision
from tandem.durable import sha256_file
from tandem.encoders import BiEncoder, CrossEncoder
from tandem.export import precision_cache
from tandem.export.precision_cache import PrecisionCache
from tandem.export.probe import (
    FASTER_BY,
    PROBE_NAME,
    PrecisionRefused,
    Probe,
    bars_of,
    choose_variant,
    fit_cpu_precision,
    probe_parity,
    read_probe,
)
from tandem.runtimes import RuntimeFit
from tandem.runtimes.openvino import bf16_capable

pytestmark = [pytest.mark.slow, pytest.mark.reranker]


@pytest.fixture(scope="module")
def ce_openvino(ce_int8, ce_other) -> Path:
    """The OpenVINO export among this CPU's two INT8 rerankers."""
    for folder, manifest in (ce_int8, ce_other):
        if manifest.runtime == "openvino":
            return Path(folder)
    raise AssertionError("neither INT8 reranker export is OpenVINO's")


def opener(folder: Path):  # type: ignore[no-untyped-def]
    def open_encoder(precision: CpuPrecision) -> CrossEncoder:
        return CrossEncoder(folder, cpu_precision=precision)

    return open_encoder


def test_export_keeps_its_verification_as_a_hashed_probe(ce_openvino, bi_int8) -> None:
    for folder, encoder in ((ce_openvino, CrossEncoder), (Path(bi_int8[0]), BiEncoder)):
        manifest = read_manifest(folder)
        assert manifest.parity is not None
        assert manifest.files[PROBE_NAME] == sha256_file(folder / PROBE_NAME)
        probe = read_probe(folder)
        assert probe is not None
        assert probe.kind == manifest.kind
        if manifest.kind == "cross-encoder":
            assert len(probe.cases) == len(probe.reference) == manifest.parity.n_queries
            assert sum(len(c.documents) for c in probe.cases) == manifest.parity.n_texts
        else:
            assert len(probe.texts) == probe.reference[0].shape[0] == manifest.parity.n_texts
        # The verified graph measured on the probe is the parity its manifest records.
        metrics, passed = probe_parity(encoder(folder), probe, bars_of(manifest))
        assert passed, metrics
        for name, value in manifest.parity.metrics.items():
            assert metrics[name] == pytest.approx(value, abs=2e-3), name


def test_auto_runs_f32_where_this_cpu_has_no_bf16_and_says_why(
    ce_openvino, ce_int8, tmp_path
) -> None:
    cache = PrecisionCache(tmp_path, ce_openvino, threads=2)
    encoder, fit = fit_cpu_precision(opener(ce_openvino), ce_openvino, cache=cache)
    assert fit.backend == "openvino"
    assert encoder.runtime.precision == fit.precision  # type: ignore[attr-defined]
    if not bf16_capable():
        assert fit.precision == "f32"
        assert "no bf16 matmul" in fit.reason
    else:
        # bf16 was tried: timed always, held to the bars only when fast enough to keep.
        assert set(fit.seconds) == {"f32", "bf16"}, fit.reason
        if fit.precision == "bf16":
            assert fit.parity["mean_spearman"] >= bars_of(encoder.manifest).min_mean_spearman
        # What was measured is kept, and the next start reuses it without measuring.
        again, kept = fit_cpu_precision(opener(ce_openvino), ce_openvino, cache=cache)
        assert (kept.precision, kept.parity, kept.seconds) == (
            fit.precision,
            fit.parity,
            fit.seconds,
        )
        assert again.runtime.precision == fit.precision  # type: ignore[attr-defined]
        assert kept.reason.startswith(fit.reason)
        assert str(cache.path) in kept.reason
    if read_manifest(ce_int8[0]).runtime == "onnxruntime":
        _, ort_fit = fit_cpu_precision(opener(Path(ce_int8[0])), Path(ce_int8[0]))
        assert (ort_fit.backend, ort_fit.precision) == ("onnxruntime", "")


def test_pinned_bf16_reports_what_openvino_really_runs(ce_openvino) -> None:
    encoder, fit = fit_cpu_precision(opener(ce_openvino), ce_openvino, "bf16")
    assert encoder.runtime.precision == fit.precision  # type: ignore[attr-defined]
    if not bf16_capable():
        assert fit.precision == "f32"
        assert "runs f32 on this CPU" in fit.reason


def first_case(probe: Probe, reference: np.ndarray) -> Probe:
    """The probe's first topic alone, held to ``reference`` instead of its FP32 scores."""
    return replace(probe, cases=probe.cases[:1], reference=(reference.astype(np.float32),))


def test_a_variant_below_the_bars_is_never_chosen_and_a_pin_is_refused(ce_openvino) -> None:
    probe = read_probe(ce_openvino)
    assert probe is not None
    # Reversed reference scores: any variant's ranking disagrees with them.
    reversed_probe = first_case(probe, -probe.reference[0])
    f32 = CrossEncoder(ce_openvino)
    variant = CrossEncoder(ce_openvino, cpu_precision="bf16")
    # However fast the variant ran, it is held to the bars before it is kept.
    chosen, fit = choose_variant(
        f32, variant, reversed_probe, folder=ce_openvino, pinned=False, faster_by=-math.inf
    )
    assert chosen is f32
    assert fit.precision == "f32"
    assert "misses the parity bars" in fit.reason
    assert fit.parity["mean_spearman"] < 0
    with pytest.raises(PrecisionRefused, match="--allow-unverified"):
        choose_variant(f32, variant, reversed_probe, folder=ce_openvino, pinned=True)
    chosen, fit = choose_variant(
        f32, variant, reversed_probe, folder=ce_openvino, pinned=True, allow_unverified=True
    )
    assert chosen is variant
    assert "misses the parity bars" in fit.reason


def test_a_variant_at_parity_is_kept_only_if_faster(ce_openvino) -> None:
    probe = read_probe(ce_openvino)
    assert probe is not None
    f32 = CrossEncoder(ce_openvino)
    variant = CrossEncoder(ce_openvino, cpu_precision="bf16")
    case = probe.cases[0]
    # Held to the verified graph's own scores, a variant that runs as it does is at parity.
    own = first_case(probe, f32.score(case.query, case.documents))
    chosen, fit = choose_variant(f32, variant, own, folder=ce_openvino, pinned=False, rounds=2)
    assert set(fit.seconds) == {"f32", "bf16"}
    faster = fit.seconds["bf16"] <= fit.seconds["f32"] * (1 - FASTER_BY)
    assert (chosen is variant) == faster
    assert fit.precision == ("bf16" if faster else "f32")
    if not faster:
        # Too slow to keep: the whole probe's parity run is skipped, and the reason says so.
        assert fit.parity == {}
        assert "parity was not measured" in fit.reason
    # Fast enough (here by fiat): kept, with the parity it was held to.
    chosen, fit = choose_variant(
        f32, variant, own, folder=ce_openvino, pinned=False, rounds=1, faster_by=-math.inf
    )
    assert chosen is variant
    assert fit.precision == "bf16"
    assert fit.reason.startswith("at parity")
    assert fit.parity["mean_spearman"] >= bars_of(f32.manifest).min_mean_spearman


def test_a_kept_choice_is_reused_only_under_its_own_key(ce_openvino, bi_int8, tmp_path) -> None:
    cache = PrecisionCache(tmp_path, ce_openvino, threads=2)
    assert cache.recall() is None
    measured = RuntimeFit("openvino", "f32", "bf16 not 10% faster", {}, {"f32": 1.25, "bf16": 1.5})
    cache.keep(measured)
    # A later start (a new cache object, as a new process makes) finds it.
    kept = PrecisionCache(tmp_path, ce_openvino, threads=2).recall()
    assert kept is not None
    assert (kept.precision, kept.seconds) == ("f32", measured.seconds)
    assert kept.reason.startswith(measured.reason)
    assert str(cache.path) in kept.reason
    # Another thread count, or another artifact, was never measured.
    assert PrecisionCache(tmp_path, ce_openvino, threads=1).recall() is None
    assert PrecisionCache(tmp_path, Path(bi_int8[0]), threads=2).recall() is None
    # Nor was another CPU generation that masks its name and reports the same flags.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision_cache, "cpu_identity", lambda: "AuthenticAMD 25 17 1")
        assert PrecisionCache(tmp_path, ce_openvino, threads=2).recall() is None
    # Reused, the kept f32 opens once and the bf16 variant is never compiled.
    asked: list[str] = []

    def open_encoder(precision: CpuPrecision) -> CrossEncoder:
        asked.append(precision)
        return CrossEncoder(ce_openvino, cpu_precision=precision)

    encoder, fit = fit_cpu_precision(open_encoder, ce_openvino, bf16_here=lambda: True, cache=cache)
    assert asked == ["f32"]
    assert encoder.runtime.precision == "f32"  # type: ignore[attr-defined]
    assert fit == kept
    # Pinned, the cache is neither read nor written.
    _, pinned = fit_cpu_precision(open_encoder, ce_openvino, "f32", cache=cache)
    assert pinned.reason == "pinned: --cpu-precision f32"
    # A damaged file is not trusted: the next start measures again.
    cache.path.write_text("{", encoding="utf-8")
    assert PrecisionCache(tmp_path, ce_openvino, threads=2).recall() is None


def test_a_cache_that_cannot_be_written_costs_only_time(ce_openvino, tmp_path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("", encoding="utf-8")
    cache = PrecisionCache(blocked, ce_openvino, threads=2)
    cache.keep(RuntimeFit("openvino", "f32", "measured"))
    assert cache.recall() is None
