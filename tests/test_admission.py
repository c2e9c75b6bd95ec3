"""The adaptive concurrency limit, admission and the shedding log, driven call by call (no
clock, no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from tandem.server.admission import (
    INITIAL_LIMIT,
    QUIET_S,
    AdaptiveLimit,
    Admitted,
    Gate,
    LoopLag,
    Refused,
    ShedLog,
)
from tandem.server.settings import Settings


def test_late_calls_cut_the_limit_and_on_time_calls_raise_it_slowly() -> None:
    limit = AdaptiveLimit(limit=64, minimum=2, maximum=64, backoff=0.9)
    assert limit.admits(63)
    assert not limit.admits(64)
    for _ in range(10):
        limit.observe(late=True, running=64)
    assert 64 * 0.9**10 - 1e-9 <= limit.limit <= 64 * 0.9**10 + 1e-9  # ~22.3
    assert limit.admits(21)
    assert not limit.admits(22)
    before = limit.limit
    for _ in range(22):  # one round of calls at this limit, all of it in use
        limit.observe(late=False, running=21)
    assert before + 0.9 < limit.limit < before + 1.1  # about +1 per round


def test_the_limit_rises_only_while_at_least_half_of_it_is_in_use() -> None:
    # At light load every call is on time, yet that says nothing about a burst: a limit left
    # to drift up through a quiet spell would let the next burst in whole.
    limit = AdaptiveLimit(limit=16, minimum=2, maximum=64)
    for _ in range(1000):
        limit.observe(late=False, running=7)  # 7 of 16: under half
    assert limit.limit == 16
    limit.observe(late=False, running=8)  # half of it in use: the window is the constraint
    assert limit.limit == 16 + 1 / 16
    limit.observe(late=True, running=1)  # lateness cuts it whatever the load
    assert limit.limit == (16 + 1 / 16) * 0.9


def test_the_limit_stays_within_its_bounds() -> None:
    limit = AdaptiveLimit(limit=8, minimum=2, maximum=10)
    for _ in range(100):
        limit.observe(late=True, running=8)
    assert limit.limit == 2
    assert limit.admits(1)
    assert not limit.admits(2)
    for _ in range(10_000):
        limit.observe(late=False, running=10)
    assert limit.limit == 10


def _cut_to_minimum(gate: Gate, *, at: float) -> None:
    """An overload: budgeted calls, each 50 ms past its 100 ms target, until the limit
    bottoms out."""
    while gate.limit.limit > gate.limit.minimum:
        call = gate.admit(queued=True, expected_wait_s=0.0, now=at)
        gate.release(call, arrived=at, now=at + 0.15, target_s=0.1, outcome="ok")


def _bulk(gate: Gate, callers: int, *, at: float) -> list[Admitted]:
    """``callers`` calls without a target (an indexing job's Embeds) at once, as far as
    admission lets them in."""
    admitted, refused = [], []
    for _ in range(callers):
        try:
            admitted.append(gate.admit(queued=True, expected_wait_s=0.0, now=at))
        except Refused as refusal:
            refused.append(refusal.reason)
    assert set(refused) <= {"concurrency_limit"}
    return admitted


def _release_bulk(gate: Gate, calls: list[Admitted], *, at: float) -> None:
    for call in calls:
        gate.release(call, arrived=at, now=at + 1.0, target_s=None, outcome="ok")


def test_a_limit_cut_by_an_overload_recovers_under_bulk_work_alone() -> None:
    # Calls without a target never move the limit, so without recovery an indexing job
    # after a spike would be refused at the cut limit for as long as it ran.
    limits: list[float] = []
    gate = Gate(Settings(), on_limit=limits.append)
    assert gate.limit.limit == INITIAL_LIMIT
    _cut_to_minimum(gate, at=0.15)  # the last late call ended at 0.15 + 0.15 = 0.3
    assert gate.limit.limit == 2
    for second in range(1, int(QUIET_S)):  # within the quiet period: still 2 at once
        calls = _bulk(gate, 8, at=0.3 + second - 0.5)
        assert len(calls) == 2
        _release_bulk(gate, calls, at=0.3 + second - 0.5)
    assert gate.limit.limit == 2
    calls = _bulk(gate, 8, at=0.3 + QUIET_S)  # no latency-bound call for QUIET_S
    assert len(calls) == 8
    assert gate.limit.limit == INITIAL_LIMIT
    assert limits[-1] == INITIAL_LIMIT  # the metric follows
    _release_bulk(gate, calls, at=0.3 + QUIET_S)


def test_a_latency_bound_call_keeps_the_cut_limit_current() -> None:
    gate = Gate(Settings())
    _cut_to_minimum(gate, at=0.0)
    for second in range(1, 31):  # one late budgeted call a second, bulk work around it
        at = float(second)
        call = gate.admit(queued=True, expected_wait_s=0.0, now=at)
        gate.release(call, arrived=at, now=at + 0.15, target_s=0.1, outcome="ok")
        calls = _bulk(gate, 8, at=at + 0.5)
        assert len(calls) == 2
        _release_bulk(gate, calls, at=at + 0.5)
    assert gate.limit.limit == 2


@pytest.mark.parametrize(("start", "expected"), [(30.0, 30.0), (INITIAL_LIMIT + 0.5, 16.5)])
def test_recovery_never_lowers_a_limit(start: float, expected: float) -> None:
    limit = AdaptiveLimit(limit=start, maximum=64)
    assert not limit.restore(INITIAL_LIMIT)
    assert limit.limit == expected


def test_shed_log_writes_one_line_per_period_with_counts() -> None:
    lines: list[dict[str, int]] = []
    shed = ShedLog(lines.append, every=10.0)
    shed.refused("queue_wait", now=100.0)  # the first refusal is logged at once
    for second in range(1, 10):
        shed.refused("concurrency_limit", now=100.0 + second)
        shed.refused("queue_wait", now=100.0 + second)
    assert lines == [{"queue_wait": 1}]
    shed.refused("in_flight", now=110.0)
    assert lines[1] == {"concurrency_limit": 9, "queue_wait": 9, "in_flight": 1}


def test_loop_lag_measures_a_blocked_event_loop() -> None:
    import time

    async def scenario() -> float:
        lag = LoopLag(tick=0.002)
        watcher = asyncio.create_task(lag.watch())
        await asyncio.sleep(0.05)
        idle = lag.seconds
        for _ in range(5):
            time.sleep(0.03)  # a handler that blocks the loop
            await asyncio.sleep(0.003)
        watcher.cancel()
        assert idle < 0.01
        return lag.seconds

    assert asyncio.run(scenario()) > 0.005
