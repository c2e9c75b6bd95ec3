"""Preset choice from CPU flags, and the search for the fewest FP32 nodes."""

from __future__ import annotations

import pytest

from tandem.export.quantize import PRESETS, choose_exclusions, detect_preset

ZEN3 = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n"
ZEN4 = "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
SKYLAKE = "flags\t\t: fpu avx2 avx512f avx512bw avx512dq\n"


@pytest.mark.parametrize(
    ("cpuinfo", "preset"), [(ZEN3, "avx2"), (ZEN4, "avx512_vnni"), (SKYLAKE, "avx512")]
)
def test_preset_follows_cpu_flags(cpuinfo: str, preset: str) -> None:
    assert detect_preset(cpuinfo) == preset
    assert preset in PRESETS


def test_reduce_range_only_where_multiply_add_can_saturate() -> None:
    assert PRESETS["avx2"].reduce_range
    assert not PRESETS["avx512_vnni"].reduce_range


def test_exclusions_bisect_to_the_fewest_that_pass() -> None:
    ranked = [f"n{i}" for i in range(20)]
    tried: list[int] = []

    def passes(excluded) -> bool:
        tried.append(len(excluded))
        return len(excluded) >= 7

    chosen, ok = choose_exclusions(ranked, passes, max_excluded=20)
    assert ok
    assert chosen == ranked[:7]
    assert len(tried) <= 7  # 0, 20, then a bisection over 20 candidates


def test_no_exclusions_when_full_int8_passes() -> None:
    assert choose_exclusions(["a", "b"], lambda excluded: True, max_excluded=2) == ([], True)


def test_reports_failure_when_no_plan_passes() -> None:
    chosen, ok = choose_exclusions(["a", "b", "c"], lambda excluded: False, max_excluded=2)
    assert not ok
    assert chosen == ["a", "b"]
