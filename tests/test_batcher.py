"""The rerank batcher, deterministically: exact sizes, huge timeouts, a gated runner, no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from tandem.server.engine.batcher import (
    BatchLimits,
    CostModel,
    EdfQueue,
    Entry,
    Overloaded,
    RerankBatcher,
    RunnerFailed,
    Ticket,
    TooShallow,
    build_batch,
)
from tandem.server.engine.pairs import JoinedPair, PairIds, PairTemplate, _Segment

HOUR = 3600.0
# No special tokens: a pair's ids are its query's then its document's.
BARE = PairTemplate(_Segment((), ()), _Segment((), ()), _Segment((), ()), 0, 1, 10_000)


def pair(tag: int, length: int = 10) -> JoinedPair:
    """A pair whose first id carries ``tag``, so a runner can tell which pair it scores."""
    return BARE.join(np.array([tag], dtype=np.int32), np.full(length - 1, 7, dtype=np.int32))


def entry(tag: int, length: int = 10, deadline: float = math.inf, order=(0, 0)) -> Entry:
    return Entry(pair(tag, length), deadline, order)


def queue_of(*entries: Entry) -> EdfQueue:
    queue = EdfQueue()
    for item in entries:
        queue.push(item)
    return queue


FREE = CostModel(seconds_per_token=0.0, weight=0.0)


def test_batch_respects_the_padded_token_budget() -> None:
    queue = queue_of(*(entry(i, 100, order=(0, i)) for i in range(10)))
    batch, expired = build_batch(queue, BatchLimits(max_batch_tokens=450), FREE, now=0.0)
    assert [e.pair.input_ids[0] for e in batch] == [0, 1, 2, 3]
    assert expired == []
    assert len(queue) == 6


def test_batch_respects_the_pair_cap() -> None:
    queue = queue_of(*(entry(i, order=(0, i)) for i in range(10)))
    batch, _ = build_batch(queue, BatchLimits(max_batch_pairs=3), FREE, now=0.0)
    assert len(batch) == 3


def test_window_prefers_lengths_close_to_the_head() -> None:
    queue = queue_of(
        entry(0, 10, order=(0, 0)), entry(1, 100, order=(0, 1)), entry(2, 12, order=(0, 2)),
        entry(3, 50, order=(0, 3)),
    )  # fmt: skip
    batch, _ = build_batch(queue, BatchLimits(max_batch_tokens=40), FREE, now=0.0)
    assert [e.pair.input_ids[0] for e in batch] == [0, 2]


def test_under_a_deadline_stage_one_order_beats_length() -> None:
    queue = queue_of(
        entry(0, 10, 9.0, order=(0, 0)), entry(1, 100, 9.0, order=(0, 1)),
        entry(2, 12, 9.0, order=(0, 2)),
    )  # fmt: skip
    any_padding = BatchLimits(max_batch_tokens=400, max_padding=math.inf)
    batch, _ = build_batch(queue, any_padding, FREE, now=0.0)
    assert [e.pair.input_ids[0] for e in batch] == [0, 1, 2]
    queue = queue_of(*(entry(i, 10 + 90 * (i % 2), 9.0, order=(0, i)) for i in range(6)))
    any_padding = BatchLimits(max_batch_tokens=250, max_padding=math.inf)
    batch, _ = build_batch(queue, any_padding, FREE, now=0.0)
    assert [e.pair.input_ids[0] for e in batch] == [0, 1]  # not the short 2 and 4


def test_a_batch_closes_before_padding_passes_its_cap_and_the_next_candidate_leads() -> None:
    queue = queue_of(
        entry(0, 100, 9.0, order=(0, 0)), entry(1, 110, 9.0, order=(0, 1)),
        entry(2, 200, 9.0, order=(0, 2)), entry(3, 100, 9.0, order=(0, 3)),
    )  # fmt: skip
    limits = BatchLimits(max_batch_tokens=1000, max_padding=0.15)
    # 0 and 1 pad 10 tokens of 210; adding 2 would pad 190 of 410.
    batch, _ = build_batch(queue, limits, FREE, now=0.0)
    assert [e.pair.input_ids[0] for e in batch] == [0, 1]
    batch, _ = build_batch(queue, limits, FREE, now=0.0)
    assert [e.pair.input_ids[0] for e in batch] == [2]  # stage-1 order kept: 3 waits


def test_a_deadline_the_window_meets_with_room_to_spare_is_batched_as_bulk() -> None:
    # A client deadline of minutes on a few seconds of work: ordering by deadline would only
    # add padding, so lengths are grouped as for calls with no deadline.
    cost = CostModel(seconds_per_token=0.001, weight=0.0, headroom=1.0, observed_at=0.0)
    lengths = [10 + 90 * (i % 2) for i in range(6)]  # 10, 100, 10, 100, 10, 100

    def first_batch(deadline: float) -> list[int]:
        queue = queue_of(*(entry(i, n, deadline, order=(0, i)) for i, n in enumerate(lengths)))
        limits = BatchLimits(max_batch_tokens=250, max_padding=math.inf)
        batch, _ = build_batch(queue, limits, cost, now=0.0)
        return [int(e.pair.input_ids[0]) for e in batch]

    # The window is 6 pairs of width 100 at 1 ms a token: 0.6 s, twice that is 1.2 s.
    assert first_batch(120.0) == [0, 2, 4]  # the short ones together
    assert first_batch(1.0) == [0, 1]  # a deadline it might miss: stage-one order


@pytest.mark.parametrize(("fixed", "rate"), [(5e-3, 6.4e-8), (2e-4, 1e-5), (0.0, 1e-5)])
def test_a_cost_model_starts_from_timed_runs_as_a_fixed_part_and_a_rate(fixed, rate) -> None:
    # The start-up probe's doubling sizes: an H200 in fp16 (5 ms a run, 15.5k tokens/ms),
    # 2 CPU cores (0.2 ms, 100 tokens/ms), and a device with no fixed cost at all.
    runs = {1024 * 2**i: fixed + rate * 1024 * 2**i for i in range(7)}
    cost = CostModel.from_runs(runs)
    assert cost.seconds_per_run == pytest.approx(fixed, rel=0.01, abs=1e-9)
    assert cost.seconds_per_token == pytest.approx(rate, rel=0.01)
    assert cost.weight == CostModel.weight  # from there it learns online as any model does
    assert CostModel.from_runs({4096: 0.01}).seconds_per_token == pytest.approx(0.01 / 4096)


def test_the_rate_is_learned_online_past_the_fixed_cost() -> None:
    cost = CostModel(seconds_per_token=1e-4, seconds_per_run=5e-3)  # a CPU's rate at first
    for now in range(80):
        tokens = 256 * (1 + now % 8)
        cost.observe(tokens, 1, 5e-3 + 6.4e-8 * tokens, now=float(now))
    assert cost.seconds_per_token == pytest.approx(6.4e-8, rel=0.01)
    assert cost.seconds_per_run == 5e-3
    # 890 pairs of 256 tokens in 4 runs: 20 ms of fixed cost and 14.6 ms of tokens.
    assert cost.predict(890, 256, runs=4) == pytest.approx((0.02 + 0.0146) * 1.25, rel=0.01)


def test_padding_that_costs_less_than_a_run_of_its_own_joins_the_batch() -> None:
    # Under a 4 ms deadline, stage-1 order: 100, 300, 100 tokens. On a GPU (2 ms a run) padding
    # the first pair to 300 tokens costs 32 us, so all three run at once; on a CPU with no
    # fixed cost the 15% padding cap closes the batch after the first.
    lengths = (100, 300, 100)

    def first_batch(cost: CostModel) -> list[int]:
        queue = queue_of(*(entry(i, n, 0.004, order=(0, i)) for i, n in enumerate(lengths)))
        batch, _ = build_batch(queue, BatchLimits(max_batch_tokens=4096), cost, now=0.0)
        return [int(e.pair.input_ids[0]) for e in batch]

    gpu = CostModel(seconds_per_token=1.6e-7, seconds_per_run=2e-3, observed_at=0.0)
    cpu = CostModel(seconds_per_token=1e-5, observed_at=0.0)
    assert first_batch(gpu) == [0, 1, 2]
    assert first_batch(cpu) == [0]


def test_the_depth_a_budget_buys_counts_one_fixed_cost_per_run() -> None:
    async def predicted(cost: CostModel) -> int:
        batcher = RerankBatcher(lambda pairs: np.zeros(len(pairs), dtype=np.float32),
                                limits=BatchLimits(max_batch_tokens=1000), cost=cost)  # fmt: skip
        return batcher.predict_scored([pair(i, 100) for i in range(50)], 0.05, ahead_s=0.0)

    # 10 ms a run of up to 1,000 tokens (10 pairs), 10 us a token: a pair a millisecond,
    # plus 10 ms every 10 pairs. 50 ms buy 20 pairs (2 runs), not the 40 a rate alone says.
    fixed = CostModel(seconds_per_token=1e-5, seconds_per_run=0.01, headroom=1.0)
    assert asyncio.run(predicted(fixed)) == 20
    assert asyncio.run(predicted(CostModel(seconds_per_token=1e-5, headroom=1.0))) == 50


def test_earliest_deadline_leads_the_batch() -> None:
    queue = queue_of(entry(0, deadline=50.0, order=(0, 0)), entry(1, deadline=5.0, order=(1, 0)))
    batch, _ = build_batch(queue, BatchLimits(max_batch_pairs=1), FREE, now=0.0)
    assert batch[0].pair.input_ids[0] == 1


def test_entries_that_cannot_finish_in_time_expire() -> None:
    # 0.1 s for a 10-token pair, measured just now
    cost = CostModel(seconds_per_token=0.01, weight=0.0, headroom=1.0, observed_at=0.0)
    queue = queue_of(
        entry(0, deadline=0.05, order=(0, 0)),
        *(entry(i, deadline=0.25, order=(1, i)) for i in (1, 2, 3)),
    )
    batch, expired = build_batch(queue, BatchLimits(), cost, now=0.0)
    assert [e.pair.input_ids[0] for e in expired] == [0]
    # Two pairs are predicted to take 0.2 s; a third would end after the 0.25 s deadline.
    assert [e.pair.input_ids[0] for e in batch] == [1, 2]


def test_departed_callers_are_dropped() -> None:
    loop = asyncio.new_event_loop()
    try:
        gone = entry(0, order=(0, 0))
        gone.ticket = Ticket(np.zeros(1, dtype=np.float32), loop.create_future())
        assert gone.ticket.done is not None
        gone.ticket.done.cancel()
        queue = queue_of(gone, entry(1, order=(1, 0)))
        batch, expired = build_batch(queue, BatchLimits(), FREE, now=0.0)
        assert [e.pair.input_ids[0] for e in batch] == [1]
        assert expired == []
    finally:
        loop.close()


class GatedRunner:
    """Scores pair ``tag`` as ``tag``; blocks each run until the test opens the gate."""

    def __init__(self, *, gated: bool = True, clock: list[float] | None = None) -> None:
        self.calls: list[list[int]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.clock = clock
        self.poison: int | None = None

    def __call__(self, pairs: Sequence[PairIds]) -> np.ndarray:
        tags = [int(p.input_ids[0]) for p in pairs]
        self.calls.append(tags)
        self.started.set()
        assert self.gate.wait(HOUR)
        if self.clock is not None:
            self.clock[0] += len(pairs)  # one fake second per pair
        if self.poison in tags:
            raise ValueError("model exploded")
        return np.array(tags, dtype=np.float32)


async def wait_started(runner: GatedRunner) -> None:
    await asyncio.get_running_loop().run_in_executor(None, runner.started.wait, HOUR)
    runner.started.clear()


def test_pairs_from_concurrent_requests_share_batches() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher = RerankBatcher(runner, limits=BatchLimits(max_batch_pairs=64), cost=FREE)
        await batcher.start()
        first = asyncio.create_task(batcher.score([pair(100)], budget=HOUR))
        await wait_started(runner)
        others = [
            asyncio.create_task(batcher.score([pair(10 * r + i) for i in range(5)], budget=HOUR))
            for r in range(1, 4)
        ]
        while batcher.queued < 15:
            await asyncio.sleep(0)  # yield to the tasks being scheduled; no wall-clock wait
        runner.gate.set()
        results = await asyncio.gather(first, *others)
        assert runner.calls[0] == [100]
        assert sorted(runner.calls[1]) == sorted(10 * r + i for r in range(1, 4) for i in range(5))
        assert results[2].scores.tolist() == [20, 21, 22, 23, 24]
        assert all(result.scored.all() for result in results)
        await batcher.stop()

    asyncio.run(scenario())


def test_failure_reaches_only_the_failing_batch() -> None:
    async def scenario() -> None:
        runner = GatedRunner(gated=False)
        runner.poison = 66
        batcher = RerankBatcher(runner, cost=FREE)
        await batcher.start()
        with pytest.raises(RunnerFailed, match="model exploded"):
            await batcher.score([pair(65), pair(66)], budget=HOUR)
        healthy = await batcher.score([pair(5), pair(6)], budget=HOUR)
        assert healthy.scores.tolist() == [5, 6]
        await batcher.stop()

    asyncio.run(scenario())


def test_cancelled_request_leaves_the_queue() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher = RerankBatcher(runner, cost=FREE)
        await batcher.start()
        blocker = asyncio.create_task(batcher.score([pair(1)], budget=HOUR))
        await wait_started(runner)
        doomed = asyncio.create_task(batcher.score([pair(2), pair(3)], budget=HOUR))
        kept = asyncio.create_task(batcher.score([pair(4)], budget=HOUR))
        while batcher.queued < 3:
            await asyncio.sleep(0)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert batcher.queued == 1  # the cancelled pairs left the queue at once
        runner.gate.set()
        await asyncio.gather(blocker, kept)
        assert runner.calls == [[1], [4]]
        await batcher.stop()

    asyncio.run(scenario())


def test_earliest_deadline_first_across_requests() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher = RerankBatcher(runner, limits=BatchLimits(max_batch_pairs=1), cost=FREE)
        await batcher.start()
        blocker = asyncio.create_task(batcher.score([pair(1)], budget=HOUR))
        await wait_started(runner)
        late = asyncio.create_task(batcher.score([pair(30), pair(31)], budget=3 * HOUR))
        early = asyncio.create_task(batcher.score([pair(20), pair(21)], budget=2 * HOUR))
        while batcher.queued < 4:
            await asyncio.sleep(0)
        runner.gate.set()
        await asyncio.gather(blocker, late, early)
        assert runner.calls == [[1], [20], [21], [30], [31]]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_stale_estimate_is_probed_rather_than_expiring_every_pair_forever() -> None:
    # After a slow spell the estimate says a 10-token pair takes 1 s: nothing fits 0.3 s.
    cost = CostModel(seconds_per_token=0.1, weight=1.0, headroom=1.0, observed_at=0.0)
    queue = queue_of(entry(0, deadline=0.5, order=(0, 0)), entry(1, deadline=0.5, order=(0, 1)))
    batch, expired = build_batch(queue, BatchLimits(), cost, now=0.2)
    assert batch == []
    assert [e.pair.input_ids[0] for e in expired] == [0, 1]
    # With no run for stale_after seconds, one pair runs anyway, so the estimate can recover.
    queue = queue_of(entry(2, deadline=5.5, order=(1, 0)), entry(3, deadline=5.5, order=(1, 1)))
    batch, expired = build_batch(queue, BatchLimits(), cost, now=5.0)
    assert [e.pair.input_ids[0] for e in batch] == [2]
    assert expired == []
    cost.observe(1, 10, 0.01, now=5.01)  # the probe was fast: the cores are free again
    assert cost.predict(1, 10) < 0.5
    assert not cost.stale(5.02)


def test_budget_scores_stage_one_order_first_and_reports_the_rest_unscored() -> None:
    async def scenario() -> None:
        clock = [0.0]
        runner = GatedRunner(gated=False, clock=clock)
        batcher = RerankBatcher(
            runner,
            limits=BatchLimits(max_batch_pairs=1),
            cost=CostModel(seconds_per_token=0.1, weight=0.0),  # 1 fake second per 10-token pair
            clock=lambda: clock[0],
        )
        await batcher.start()
        outcome = await batcher.score([pair(i) for i in range(10)], budget=3.5)
        assert runner.calls == [[0], [1], [2]]
        assert outcome.scored.tolist() == [True] * 3 + [False] * 7
        assert outcome.scores[:3].tolist() == [0, 1, 2]
        await batcher.stop()

    asyncio.run(scenario())


def test_admission_refuses_past_the_queue_bound() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher = RerankBatcher(runner, limits=BatchLimits(max_queued_pairs=4), cost=FREE)
        await batcher.start()
        blocker = asyncio.create_task(batcher.score([pair(1)], budget=HOUR))
        await wait_started(runner)
        waiting = asyncio.create_task(batcher.score([pair(i) for i in range(3)], budget=HOUR))
        while batcher.queued < 3:
            await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="limit of 4"):
            await batcher.score([pair(9), pair(9)], budget=HOUR)
        runner.gate.set()
        await asyncio.gather(blocker, waiting)
        await batcher.stop()

    asyncio.run(scenario())


def test_min_scored_refuses_a_call_the_budget_cannot_serve_before_it_queues() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        # 0.01 s a token: a 10-token pair is 0.1 s of work.
        cost = CostModel(seconds_per_token=0.01, weight=0.0, headroom=1.0)
        batcher = RerankBatcher(runner, cost=cost)
        await batcher.start()
        blocker = asyncio.create_task(batcher.score([pair(1)], budget=HOUR))
        await wait_started(runner)
        ahead = asyncio.create_task(batcher.score([pair(i) for i in range(5)], budget=HOUR))
        while batcher.queued < 5:
            await asyncio.sleep(0)
        # 0.6 s of work is ahead (the running pair and five queued); 1.0 s leaves room for 4.
        assert batcher.queued_seconds() == pytest.approx(0.6)
        candidates = [pair(20 + i) for i in range(10)]
        assert batcher.predict_scored(candidates, 1.0) == 4
        with pytest.raises(TooShallow, match="about 4 of 10 pairs") as refused:
            await batcher.score(candidates, budget=1.0, min_scored=5)
        assert refused.value.retry_after_s == pytest.approx(0.6)
        assert batcher.queued == 5  # nothing of the refused call was queued
        # Met, not asked for, or with no budget: the call queues as before.
        for kwargs in ({"min_scored": 4}, {"min_scored": 0}, {}):
            task = asyncio.create_task(batcher.score(candidates[:1], budget=HOUR, **kwargs))
            await asyncio.sleep(0)
            assert not task.done()  # queued and waiting, not refused
            assert batcher.queued == 6
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        unbounded = asyncio.create_task(batcher.score(candidates[:2], budget=None, min_scored=9))
        runner.gate.set()
        await asyncio.gather(blocker, ahead, unbounded)
        await batcher.stop()

    asyncio.run(scenario())
