"""The capacity search's arithmetic, with a server whose SLO holds up to a known rate."""

from __future__ import annotations

import pytest

from tandem.benchmarks import overload
from tandem.benchmarks.load import LevelReport


def _server_that_holds_up_to(
    limit_qps: float, monkeypatch, *, depth_at: float = 100.0
) -> list[float]:
    """Within the SLO up to ``limit_qps``; reranks ``depth_at / qps`` candidates on average."""
    offered: list[float] = []

    def run(port, levels, queries, shape):
        qps = levels[0].value
        offered.append(qps)
        p99 = 90.0 if qps <= limit_qps else 400.0
        latency = {"p50": p99 / 2, "p90": p99, "p99": p99, "max": p99}
        report = LevelReport(
            kind="open", value=qps, offered_qps=qps, sent=100, ok=100, seconds=10.0,
            achieved_qps=qps, latency_ms=latency, server_latency_ms=latency,
            errors={}, reranked={"mean": depth_at / qps}, candidates_mean=100.0,
        )  # fmt: skip
        return [report]

    monkeypatch.setattr(overload, "_run", run)
    return offered


def test_capacity_doubles_then_bisects_once(monkeypatch) -> None:
    offered = _server_that_holds_up_to(50.0, monkeypatch)
    assert overload.capacity(0, ["q"], seconds=10.0) == 48.0
    assert offered == [16.0, 32.0, 64.0, 48.0]


def test_capacity_halves_when_the_start_rate_fails(monkeypatch) -> None:
    # On a shared machine one stall can fail the start rate; the search must still find one.
    offered = _server_that_holds_up_to(5.0, monkeypatch)
    assert overload.capacity(0, ["q"], seconds=10.0) == 4.0
    assert offered == [16.0, 8.0, 4.0, 6.0]


def test_capacity_gives_up_below_the_floor(monkeypatch) -> None:
    _server_that_holds_up_to(0.1, monkeypatch)
    with pytest.raises(RuntimeError, match="missed its SLO even at 1 QPS"):
        overload.capacity(0, ["q"], seconds=10.0)


def test_capacity_at_a_depth_floor_is_the_load_that_still_reranks_that_deep(monkeypatch) -> None:
    # Within the SLO up to 50 QPS, but at 100/qps candidates: >= 10 deep up to 10 QPS.
    offered = _server_that_holds_up_to(50.0, monkeypatch, depth_at=100.0)
    assert overload.capacity(0, ["q"], seconds=10.0, depth_floor=10.0) == 8.0
    assert offered == [16.0, 8.0, 12.0]


def test_a_depth_floor_out_of_reach_gives_zero_not_an_error(monkeypatch) -> None:
    _server_that_holds_up_to(50.0, monkeypatch, depth_at=5.0)  # 5 deep even at 1 QPS
    assert overload.capacity(0, ["q"], seconds=10.0, depth_floor=10.0) == 0.0
