"""The adaptive concurrency limit and the shedding log, driven call by call (no clock, no I/O)."""

from __future__ import annotations

import asyncio

from tandem.server.admission import AdaptiveLimit, LoopLag, ShedLog


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
