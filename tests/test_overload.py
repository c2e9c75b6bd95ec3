"""Overload and soak, in CI's short form (10 s per overload level, a 40 s soak); the 60 s
runs and the 5-minute soak are `tandem bench overload`."""

from __future__ import annotations

import pytest
from serving import fill_collection
from test_reliability import ServerProcess, model_args

from tandem.benchmarks import overload
from tandem.benchmarks.load import topic_queries

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, bi_int8, ce_int8, data):
    folder = tmp_path_factory.mktemp("overload")
    fill_collection(folder, bi_int8[0], ce_int8[0], data.segments[:300])
    process = ServerProcess("--collection", str(folder), *model_args(bi_int8, ce_int8))
    yield process
    assert process.finish() == 0, process.log  # it still drains cleanly afterwards


@pytest.fixture(scope="module")
def capacity_qps(server) -> float:
    assert server.port is not None, server.log
    # 10 s probes, as `tandem bench overload` uses: in 5 s one stall of the shared cores is
    # 1% of the calls, and the capacity found (so the 5x offered) halves.
    return overload.capacity(server.port, topic_queries(), seconds=10.0)


def test_two_and_five_times_capacity_are_shed_and_recovered_from(server, capacity_qps):
    report = shed_and_recover(server, capacity_qps)
    if late_levels(report):
        # One stall of CI's shared cores makes every call then in flight late (CI once saw a
        # p99 of 243 ms at 5x, with a 377 ms maximum, from a server whose other runs met
        # 150 ms): measure again once. A gate that admits more than it can serve misses both.
        report = shed_and_recover(server, capacity_qps)
    assert not late_levels(report), late_levels(report)


def shed_and_recover(server, capacity_qps: float) -> overload.OverloadReport:
    """Offers 2x and 5x capacity, then one caller; asserts what no stall excuses."""
    report = overload.overload(
        server.port, topic_queries(), capacity_qps=capacity_qps, factors=(2.0, 5.0),
        seconds=10.0, alive=lambda: server.process.poll() is None,
    )  # fmt: skip
    assert report.alive
    for level in report.levels:
        assert set(level["errors"]) <= {"RESOURCE_EXHAUSTED"}, level["errors"]
        assert level["ok"] > 0
    assert report.levels[-1]["errors"].get("RESOURCE_EXHAUSTED", 0) > 0  # 5x is shed
    assert report.recovery["errors"] == {}  # and the very next calls are served normally
    return report


def late_levels(report: overload.OverloadReport) -> list[dict[str, object]]:
    """The levels (and the recovery) whose admitted calls' p99 missed the SLO."""
    return [
        level
        for level in [*report.levels, report.recovery]
        if level["latency_ms"]["p99"] > overload.ADMITTED_P99_LIMIT_MS
    ]


def test_soak_at_70_percent_of_capacity_keeps_memory_flat(server, capacity_qps):
    result = overload.soak(
        server.port, server.process.pid, topic_queries(), qps=0.7 * capacity_qps,
        seconds=40.0, warm_up_s=10.0, sample_s=5.0,
    )  # fmt: skip
    assert result["ok"] > 0
    assert result["growth"] < overload.SOAK_MAX_GROWTH, result["samples"]
    assert result["p99_ms_worst_window"] <= overload.ADMITTED_P99_LIMIT_MS, result
