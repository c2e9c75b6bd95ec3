"""The start-up choice of OpenVINO's CPU precision, on real exports of the stand-in reranker.

On a CPU without bf16 matmuls (AVX2, or AVX-512 without AMX or avx512_bf16) f32 is the only
choice; the gate that keeps a faster variant only at parity is tested here with real
variants, and on a CPU with bf16 matmuls (AMX, or avx512_bf16 where OpenVINO reports BF16)
the same tests see bf16 and the unquantized graph tried for real, and the choice kept for
the next start. Which variant wins at given timings is tested with those timings fixed.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tandem.artifact import (
    OPENVINO_UNQUANTIZED_BIN,
    OPENVINO_UNQUANTIZED_XML,
    read_manifest,
    write_manifest,
)
from tandem.devices import UNQUANTIZED, CpuPrecision
from tandem.durable import sha256_file
from tandem.encoders import BiEncoder, CrossEncoder
from tandem.export import precision_cache
from tandem.export import probe as probe_module
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
from tandem.runtimes import RuntimeFit, RuntimeUnavailable
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
        # Each bf16 variant was tried: timed always, held to the bars only where the choice
        # turns on it.
        assert set(fit.seconds) == {"f32", "bf16", UNQUANTIZED}, fit.reason
        if fit.precision != "f32":
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
        f32, {"bf16": variant}, reversed_probe, folder=ce_openvino, pinned=False,
        faster_by=-math.inf,
    )  # fmt: skip
    assert chosen is f32
    assert fit.precision == "f32"
    assert "misses the parity bars" in fit.reason
    assert fit.parity["mean_spearman"] < 0
    with pytest.raises(PrecisionRefused, match="--allow-unverified"):
        choose_variant(f32, {"bf16": variant}, reversed_probe, folder=ce_openvino, pinned=True)
    chosen, fit = choose_variant(
        f32, {"bf16": variant}, reversed_probe, folder=ce_openvino, pinned=True,
        allow_unverified=True,
    )  # fmt: skip
    assert chosen is variant
    assert "misses the parity bars" in fit.reason


def test_a_variant_at_parity_is_kept_only_if_faster(ce_openvino) -> None:
    probe = read_probe(ce_openvino)
    assert probe is not None
    f32 = CrossEncoder(ce_openvino)
    variant = CrossEncoder(ce_openvino, cpu_precision="bf16")
    case = probe.cases[0]
    # Held to its own scores, the variant is at parity on any CPU (on one topic, bf16 can
    # miss the bars against the verified graph's scores: two swaps in the top 10).
    own = first_case(probe, variant.score(case.query, case.documents))
    chosen, fit = choose_variant(
        f32, {"bf16": variant}, own, folder=ce_openvino, pinned=False, rounds=2
    )
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
        f32, {"bf16": variant}, own, folder=ce_openvino, pinned=False, rounds=1,
        faster_by=-math.inf,
    )  # fmt: skip
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


def test_an_openvino_int8_export_keeps_its_unquantized_graph_at_parity(ce_openvino) -> None:
    manifest = read_manifest(ce_openvino)
    assert manifest.has_unquantized_graph
    for name in (OPENVINO_UNQUANTIZED_XML, OPENVINO_UNQUANTIZED_BIN):
        assert manifest.files[name] == sha256_file(ce_openvino / name)
    # What a collection records as its model stays the INT8 graph's weights.
    assert manifest.weights_sha256 == manifest.files["openvino_model.bin"]
    unquantized = CrossEncoder(ce_openvino, cpu_precision=UNQUANTIZED)
    # Where OpenVINO runs no bf16 it runs the graph in f32, and says so.
    expected = UNQUANTIZED if bf16_capable() else "f32-unquantized"
    assert unquantized.runtime.precision == expected  # type: ignore[attr-defined]
    probe = read_probe(ce_openvino)
    assert probe is not None
    assert manifest.parity is not None
    metrics, passed = probe_parity(unquantized, probe, bars_of(manifest))
    assert passed, metrics
    # Closer to the FP32 reference than the verified INT8 graph: why it is kept.
    assert metrics["mean_spearman"] > manifest.parity.metrics["mean_spearman"]


FAST_UNQUANTIZED = {UNQUANTIZED: 0.70, "f32": 0.94, "bf16": 0.76}  # as measured on AMX


@pytest.mark.parametrize(
    ("seconds", "failing", "chosen", "measured"),
    [
        # Fastest and most faithful (AMX): kept, after its own parity alone.
        (FAST_UNQUANTIZED, set(), UNQUANTIZED, [UNQUANTIZED]),
        # Within 10% of a faster one, the more faithful variant still wins.
        ({UNQUANTIZED: 0.80, "f32": 0.94, "bf16": 0.76}, set(), UNQUANTIZED, [UNQUANTIZED]),
        # Slower than the INT8 graph (avx512_bf16 without AMX): the INT8 graph in bf16.
        ({UNQUANTIZED: 1.05, "f32": 0.80, "bf16": 0.70}, set(), "bf16", ["bf16"]),
        # Nothing 10% faster than the verified graph: it stays, and no parity is measured.
        ({UNQUANTIZED: 1.05, "f32": 0.80, "bf16": 0.75}, set(), "f32", []),
        # Fastest but below the bars: the next one that clears them.
        (FAST_UNQUANTIZED, {UNQUANTIZED}, "bf16", [UNQUANTIZED, "bf16"]),
        (FAST_UNQUANTIZED, {UNQUANTIZED, "bf16"}, "f32", [UNQUANTIZED, "bf16"]),
    ],
)
def test_the_most_faithful_variant_at_parity_wins_unless_one_runs_10_percent_faster(
    ce_openvino, monkeypatch, seconds, failing, chosen, measured
) -> None:
    f32 = CrossEncoder(ce_openvino)
    # Stand-ins for the compiled variants: the timings and parity outcomes are fixed here,
    # so that the rule is tested on every CPU (the real ones are measured above).
    variants = {name: object() for name in seconds if name != "f32"}
    names = {id(encoder): name for name, encoder in variants.items()}
    asked: list[str] = []

    def parity(encoder, probe, bars):  # type: ignore[no-untyped-def]
        name = names[id(encoder)]
        asked.append(name)
        return {"mean_spearman": 0.5 if name in failing else 0.99}, name not in failing

    monkeypatch.setattr(probe_module, "_time_all", lambda encoders, probe, rounds: seconds)
    monkeypatch.setattr(probe_module, "probe_parity", parity)
    probe = read_probe(ce_openvino)
    assert probe is not None
    got, fit = choose_variant(f32, variants, probe, folder=ce_openvino, pinned=False)
    assert fit.precision == chosen
    assert got is (f32 if chosen == "f32" else variants[chosen])
    assert asked == measured
    assert fit.seconds == seconds
    for name in failing:
        assert f"{name} misses the parity bars" in fit.reason
    if not measured:
        assert "parity was not measured" in fit.reason


def test_an_export_without_the_unquantized_graph_runs_without_it(ce_openvino, tmp_path) -> None:
    old = tmp_path / "exported-before-it-was-kept"
    shutil.copytree(ce_openvino, old)
    manifest = read_manifest(old)
    kept = (OPENVINO_UNQUANTIZED_XML, OPENVINO_UNQUANTIZED_BIN)
    for name in kept:
        (old / name).unlink()
    files = {name: sha for name, sha in manifest.files.items() if name not in kept}
    write_manifest(old, replace(manifest, files=files))
    asked: list[str] = []

    def opener_of(folder: Path):  # type: ignore[no-untyped-def]
        def open_encoder(precision: CpuPrecision) -> CrossEncoder:
            asked.append(precision)
            return CrossEncoder(folder, cpu_precision=precision)

        return open_encoder

    # Timings that keep the verified graph (the unquantized one slowest, bf16 no faster), so
    # that no parity run (35 s) is needed to see what was asked for.
    def slow_unquantized(encoders, probe, rounds):  # type: ignore[no-untyped-def]
        return {name: 2.0 if name == UNQUANTIZED else 1.0 for name in encoders}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probe_module, "_time_all", slow_unquantized)
        for folder, tried in ((old, ["bf16"]), (ce_openvino, ["bf16", UNQUANTIZED])):
            asked.clear()
            _, fit = fit_cpu_precision(opener_of(folder), folder, bf16_here=lambda: True)
            assert asked == ["f32", *tried]
            assert fit.precision == "f32"
    # Pinned, it says to re-export.
    with pytest.raises(RuntimeUnavailable, match="re-export"):
        fit_cpu_precision(opener_of(old), old, UNQUANTIZED)
