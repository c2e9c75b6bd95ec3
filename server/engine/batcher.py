"""Cross-request rerank batching with deadlines: every (query, document) pair is one queue entry.

Three parts, as in Ray Serve's batcher and TEI's queue:
- ``build_batch``: pure. Takes the earliest-deadline entry, then fills a batch from a small
  window of the queue (in EDF order under a deadline; closest in length without one), while
  ``max_len * (n + 1) <= max_batch_tokens``, padding stays within ``max_padding`` of the
  real tokens (or costs less than another run would), and the predicted run still ends
  before the earliest deadline in the batch.
  Entries that cannot finish in time even alone expire.
- ``RerankBatcher.run`` (the mover): an asyncio task that wakes on an event (never polls or
  sleeps), builds a batch and hands it to the runner. The server runs it under its
  supervisor; if it dies, ``fail_waiting`` fails every call it held.
- the runner: the session call, in one worker thread, so the event loop and the other
  threads go on while it runs.

Cost is a fixed cost per run (a GPU's, timed at start-up) plus seconds per padded token,
learned online as an EWMA. A request's pairs share one deadline and are ordered by stage-1
rank, so under a budget the best stage-1 candidates are scored first and the rest come back
unscored.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from tandem.server.engine.errors import Internal, RequestError, Retryable
from tandem.server.engine.pairs import JoinedPair, PairIds

Runner = Callable[[Sequence[PairIds]], NDArray[np.float32]]


class Overloaded(Retryable):
    """The pair queue is full, or admission refused the call: the caller should back off."""


class TooShallow(Retryable):
    """Fewer than the call's ``min_rerank`` candidates would be scored within its budget:
    refused before any of its pairs queue, rather than answered in stage-1 order."""


class RunnerFailed(Internal):
    """The model run for a batch holding this request's pairs failed."""


@dataclass(frozen=True)
class BatchLimits:
    """Batch shape. Tokens cap activation memory and the length of one run.

    1024 padded tokens: on 2 cores, served RAG24 pairs (~300 tokens) ran 15% faster than at
    2048 (and 50% faster than at 8192), and shorter runs let a budget stop nearer its
    deadline; 113-token pairs lose ~5% against their best batch of 16.
    """

    max_batch_tokens: int = 1024  # padded tokens per session run
    max_batch_pairs: int = 32
    # Padding a batch may add, as a share of its real tokens. Under a deadline a batch takes
    # candidates in stage-1 order, whatever their lengths: RAG24's first 12 candidates of 30
    # topics (~260 tokens, mixed) padded 15% in batches of up to 1,024 tokens, 6% with this
    # cap, and ran 12% faster (in process, OpenVINO INT8, 2 cores; served, the gain was
    # within the noise). The next candidate leads the next batch instead.
    max_padding: float = 0.15
    window: int = 64  # entries looked at per batch to find similar lengths
    # Pairs waiting at once. 4096 pairs is ~25 s of INT8 work on 2 cores: past that, waiting
    # callers would miss any sane deadline, so admission refuses instead.
    max_queued_pairs: int = 4096


@dataclass(eq=False)
class Ticket:
    """One request's share of the queue: its scores fill in as its pairs' batches finish.

    One future per request, not per pair: a call's 100 pairs would otherwise cost the event
    loop 100 futures, their callbacks and their cancellations, most never scored under a
    budget.
    """

    scores: NDArray[np.float32]  # NaN until scored
    done: asyncio.Future[None] | None = None
    waiting: int = 0  # pairs neither scored nor expired
    first_run: float | None = None  # when the first batch holding one of its pairs began

    @property
    def open(self) -> bool:
        return self.done is None or not self.done.done()

    def settle(self, position: int, value: float | None) -> None:
        if value is not None:
            self.scores[position] = value
        self.waiting -= 1
        if self.waiting <= 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def fail(self, error: BaseException) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(error)


@dataclass(eq=False)
class Entry:
    """One pair waiting to be scored, and the ticket of the request it belongs to."""

    pair: JoinedPair
    deadline: float  # time.monotonic() seconds; math.inf for no deadline
    order: tuple[int, int]  # (request arrival, stage-1 position): EDF tiebreak
    ticket: Ticket | None = None

    @property
    def length(self) -> int:
        return len(self.pair)

    @property
    def wanted(self) -> bool:
        return self.ticket is None or self.ticket.open

    def sort_key(self) -> tuple[float, int, int]:
        return (self.deadline, *self.order)


@dataclass
class CostModel:
    """A batch's seconds: a fixed cost per run plus seconds per padded token.

    The fixed cost (kernel launches, copies to and from the device, the framework's own work)
    is measured once, where it matters: a GPU's start-up probe times clean runs of several
    sizes (``from_runs``). There most of a small run is fixed cost (2-2.7 ms a run beside
    12k tokens a ms on an H200, where 100 RAG24 pairs took 8-10 ms), and a rate alone,
    learned from the small runs a budget makes, predicted that 0-2 of 890 candidates fit
    100 ms (RESULTS). On a CPU it is left at 0: there the rate is nearly all of a run.

    The rate is an exponentially weighted moving average of each run's seconds past the
    fixed cost, so it follows a slow spell within a few runs. Predictions carry
    ``headroom``: runs vary by a fifth on shared cores, and attention grows faster than
    linearly with width, so a batch planned to end just inside a deadline often ends outside
    it, and then every score in it arrives too late to use.
    """

    seconds_per_token: float
    seconds_per_run: float = 0.0
    weight: float = 0.2
    headroom: float = 1.25
    # The estimate only moves when a batch runs. After a slow spell (cores taken by other
    # work) it can predict that no pair fits any budget, so none would ever run again and
    # it would never come down: past this long without a run, one pair runs as a probe.
    stale_after: float = 1.0
    observed_at: float = -math.inf

    @classmethod
    def from_runs(cls, seconds: dict[int, float]) -> CostModel:
        """The least-squares line through timed runs (seconds by padded tokens): its
        intercept is the fixed cost (within [0, the shortest run]), its slope the rate."""
        sizes = sorted(seconds)
        tokens = np.array(sizes, dtype=np.float64)
        runs = np.array([seconds[size] for size in sizes])
        if len(tokens) < 2:
            return cls(seconds_per_token=float(runs.sum() / max(tokens.sum(), 1.0)))
        slope, intercept = np.polyfit(tokens, runs, 1)
        fixed = min(max(float(intercept), 0.0), float(runs.min()))
        rate = max(float(slope), float((runs - fixed).max() / tokens.max()), 1e-12)
        return cls(seconds_per_token=rate, seconds_per_run=fixed)

    def predict(self, pairs: int, width: int, *, runs: int = 1) -> float:
        fixed = self.seconds_per_run * runs
        return (fixed + self.seconds_per_token * pairs * width) * self.headroom

    def observe(self, pairs: int, width: int, seconds: float, *, now: float) -> None:
        sample = max(seconds - self.seconds_per_run, 0.0) / max(pairs * width, 1)
        self.seconds_per_token += self.weight * (sample - self.seconds_per_token)
        self.observed_at = now

    def padding_pays(self, padding: int) -> bool:
        """Whether a pair that adds ``padding`` padded tokens to a run (beyond its own) costs
        less there than in a run of its own."""
        return self.seconds_per_token * padding < self.seconds_per_run

    def stale(self, now: float) -> bool:
        return now - self.observed_at > self.stale_after


@dataclass
class EdfQueue:
    """Entries ordered by (deadline, request arrival, stage-1 position)."""

    heap: list[tuple[tuple[float, int, int], int, Entry]] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return len(self.heap)

    def push(self, entry: Entry) -> None:
        heapq.heappush(self.heap, (entry.sort_key(), next(self.counter), entry))

    def pop(self) -> Entry:
        return heapq.heappop(self.heap)[2]

    def discard_unwanted(self) -> None:
        """Drops entries whose caller has gone; O(n), and n is bounded by admission."""
        self.heap = [item for item in self.heap if item[2].wanted]
        heapq.heapify(self.heap)


# How many times over the window's predicted work a deadline must leave for the window to be
# batched as bulk work: the head's deadline is the earliest, so every entry in it then
# finishes in time whatever order the batches take.
BULK_SLACK = 2.0


def _bulk(head: Entry, window: list[Entry], cost: CostModel, *, now: float) -> bool:
    if math.isinf(head.deadline):
        return True
    if cost.seconds_per_token <= 0:  # no estimate yet: nothing says the window fits
        return False
    width = max([head.length, *(entry.length for entry in window)])
    return now + BULK_SLACK * cost.predict(len(window) + 1, width) <= head.deadline


def build_batch(
    queue: EdfQueue, limits: BatchLimits, cost: CostModel, *, now: float
) -> tuple[list[Entry], list[Entry]]:
    """Returns (batch, expired). Entries whose caller has gone are dropped silently."""
    expired: list[Entry] = []
    head: Entry | None = None
    while queue and head is None:
        candidate = queue.pop()
        if not candidate.wanted:
            continue
        if now + cost.predict(1, candidate.length) > candidate.deadline:
            if now < candidate.deadline and cost.stale(now):
                return [candidate], expired  # a probe (see CostModel.stale_after)
            expired.append(candidate)
            continue
        head = candidate
    if head is None:
        return [], expired
    window: list[Entry] = []
    while queue and len(window) < limits.window - 1:
        candidate = queue.pop()
        if candidate.wanted:
            window.append(candidate)
    if _bulk(head, window, cost, now=now):
        # No deadline, or one the whole window meets with room to spare: pick similar
        # lengths, since padding is wasted compute.
        window.sort(key=lambda entry: (abs(entry.length - head.length), entry.sort_key()))
    # Under a deadline the window cannot all meet, it stays in EDF order, which within a
    # request is stage-1 order: the best stage-1 candidates must be the ones that get
    # scored, even at the cost of some padding.
    batch, width, tokens = [head], head.length, head.length
    for index, candidate in enumerate(window):
        grown = max(width, candidate.length)
        padded = grown * (len(batch) + 1)
        fits = (
            len(batch) < limits.max_batch_pairs
            and padded <= limits.max_batch_tokens
            and (
                padded <= (tokens + candidate.length) * (1 + limits.max_padding)
                or cost.padding_pays(padded - width * len(batch) - candidate.length)
            )
            and now + cost.predict(len(batch) + 1, grown) <= head.deadline
        )
        if not fits:
            for rest in window[index:]:
                queue.push(rest)
            break
        batch.append(candidate)
        width, tokens = grown, tokens + candidate.length
    return batch, expired


@dataclass(frozen=True)
class Outcome:
    """Scores in the request's order; NaN where a pair was not scored in time.

    ``queue_seconds`` runs from submission to the start of the first batch holding one of
    the request's pairs (all of it if none ran); ``run_seconds`` from there to the end.
    """

    scores: NDArray[np.float32]
    queue_seconds: float
    run_seconds: float
    batches: int

    @property
    def scored(self) -> NDArray[np.bool_]:
        return np.asarray(~np.isnan(self.scores), dtype=np.bool_)


class RerankBatcher:
    """Scores pairs from many concurrent requests in shared, deadline-ordered batches."""

    def __init__(
        self,
        runner: Runner,
        *,
        limits: BatchLimits | None = None,
        cost: CostModel | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[int, int, float], None] | None = None,
        worker_setup: Callable[[], None] | None = None,
    ) -> None:
        self.runner = runner
        # (pairs, padded tokens, seconds) of each batch that ran, for metrics
        self.on_batch = on_batch
        self.limits = limits or BatchLimits()
        # 1e-4 s per padded token is INT8 MiniLM-L6 on 2 AVX2 cores; the first batches correct it.
        self.cost = cost or CostModel(seconds_per_token=1e-4)
        self.clock = clock
        self.queue = EdfQueue()
        self.arrivals = itertools.count()
        self.wake = asyncio.Event()
        # One thread: onnxruntime already spreads one run over the cores it was given.
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="rerank", initializer=worker_setup
        )
        self.task: asyncio.Task[None] | None = None
        self.batches_run = 0
        # Entries the mover has taken off the queue and not yet resolved: if the mover dies
        # holding them, ``fail_waiting`` must fail them too, or their callers wait forever.
        self.in_hand: list[Entry] = []

    @property
    def queued(self) -> int:
        return len(self.queue)

    async def start(self) -> None:
        """Runs the mover as a plain task (the server runs ``run`` under its supervisor)."""
        self.task = asyncio.create_task(self.run(), name="rerank-mover")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True)

    def queued_seconds(self) -> float:
        """Predicted seconds of work queued or running now, ahead of a newcomer."""
        tokens = sum(item[2].length for item in self.queue.heap if item[2].wanted)
        tokens += sum(entry.length for entry in self.in_hand)
        return self.cost.predict(1, tokens, runs=self._runs(tokens)) if tokens else 0.0

    def tokens_within(self, seconds: float) -> int:
        """The most padded tokens the model could run in ``seconds`` with nothing ahead, no
        fixed cost and no headroom: no call's pairs past these can be scored in that time."""
        if self.cost.seconds_per_token <= 0:  # no estimate yet: nothing bounds it
            return sys.maxsize
        return int(max(seconds, 0.0) / self.cost.seconds_per_token)

    def _runs(self, tokens: int) -> int:
        return -(-tokens // self.limits.max_batch_tokens)

    def predict_scored(
        self, pairs: Sequence[JoinedPair], budget: float, *, ahead_s: float | None = None
    ) -> int:
        """How many of ``pairs``, in order, would be scored within ``budget`` seconds: the work
        queued ahead (``ahead_s``, else ``queued_seconds()``) runs first, since a newcomer's
        deadline is rarely the earliest, then its own."""
        left = budget - (self.queued_seconds() if ahead_s is None else ahead_s)
        used = 0
        for count, pair in enumerate(pairs):
            used += len(pair)
            if self.cost.predict(1, used, runs=self._runs(used)) > left:
                return count
        return len(pairs)

    async def score(
        self, pairs: Sequence[JoinedPair], *, budget: float | None, min_scored: int = 0
    ) -> Outcome:
        """Scores ``pairs`` (in stage-1 order) within ``budget`` seconds; None means no limit.
        Under a budget, a call predicted to get fewer than ``min_scored`` scores is refused
        (``TooShallow``) before its pairs queue."""
        if not pairs:
            return Outcome(np.zeros(0, dtype=np.float32), 0.0, 0.0, 0)
        wanted = min(min_scored, len(pairs))
        if budget is not None and wanted > 0:
            ahead = self.queued_seconds()  # a walk over the queue: once per call
            predicted = self.predict_scored(pairs, budget, ahead_s=ahead)
            if predicted < wanted:
                raise TooShallow(
                    f"within the {budget * 1000:.0f} ms left of its budget about {predicted} "
                    f"of {len(pairs)} pairs (a long document's windows count one each) would be "
                    f"reranked, fewer than min_rerank="
                    f"{min_scored}: retry shortly, or raise rerank_budget_ms",
                    retry_after_s=max(ahead, 0.05),
                )
        if len(self.queue) + len(pairs) > self.limits.max_queued_pairs:
            raise Overloaded(
                f"{len(self.queue)} pairs are queued; {len(pairs)} more would pass the limit of "
                f"{self.limits.max_queued_pairs}; retry with backoff",
                retry_after_s=self.cost.predict(len(self.queue), 256),
            )
        started = self.clock()
        deadline = math.inf if budget is None else started + budget
        arrival = next(self.arrivals)
        ticket = Ticket(
            np.full(len(pairs), np.nan, dtype=np.float32),
            asyncio.get_running_loop().create_future(),
            waiting=len(pairs),
        )
        for position, pair in enumerate(pairs):
            self.queue.push(Entry(pair, deadline, (arrival, position), ticket))
        self.wake.set()
        assert ticket.done is not None
        batches_before = self.batches_run
        try:
            # Past the budget, what was scored by now is the answer (wait() never raises).
            await asyncio.wait([ticket.done], timeout=budget)
        finally:
            if not ticket.done.done():
                # Cancelled callers and expired budgets leave the queue at once.
                ticket.done.cancel()
                self.queue.discard_unwanted()
        if not ticket.done.cancelled() and ticket.done.exception() is not None:
            error = ticket.done.exception()
            if isinstance(error, RequestError):
                raise error
            raise RunnerFailed(str(error)) from error
        ended = self.clock()
        first_run = ended if ticket.first_run is None else ticket.first_run
        return Outcome(
            ticket.scores.copy(), first_run - started, ended - first_run,
            self.batches_run - batches_before,
        )  # fmt: skip

    def fail_waiting(self, error: RequestError) -> int:
        """Fails every request with pairs queued or in hand (the mover has died: nothing
        would score them); returns how many requests were failed."""
        entries = [entry for _, _, entry in self.queue.heap] + self.in_hand
        tickets = {id(entry.ticket): entry.ticket for entry in entries if entry.ticket is not None}
        self.queue = EdfQueue()
        self.in_hand = []
        for ticket in tickets.values():
            ticket.fail(error)
        return len(tickets)

    async def run(self) -> None:
        """The mover: waits for work, builds batches, hands them to the runner, forever."""
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            batch, expired = build_batch(self.queue, self.limits, self.cost, now=self.clock())
            self.in_hand = batch
            for entry in expired:
                _resolve(entry, None)
            if not batch:
                if not self.queue:
                    self.wake.clear()
                continue
            # Assembled here, not in the runner's thread: that thread runs at a lower priority,
            # and holding the GIL there would stall the event loop (priority inversion).
            pairs = [entry.pair.assemble() for entry in batch]
            width = max(len(pair) for pair in pairs)
            started = self.clock()
            for entry in batch:
                if entry.ticket is not None and entry.ticket.first_run is None:
                    entry.ticket.first_run = started
            try:
                scores = await loop.run_in_executor(self.executor, self.runner, pairs)
                if len(scores) != len(batch):
                    raise RuntimeError(f"runner returned {len(scores)} scores for {len(batch)}")
            except Exception as error:  # delivered to this batch's callers only
                for entry in batch:
                    _fail(entry, error)
                continue
            finally:
                self.batches_run += 1
            ended = self.clock()
            self.cost.observe(len(batch), width, ended - started, now=ended)
            if self.on_batch is not None:
                self.on_batch(len(batch), width * len(batch), ended - started)
            for entry, value in zip(batch, scores, strict=True):
                _resolve(entry, float(value))
            self.in_hand = []


def _resolve(entry: Entry, value: float | None) -> None:
    if entry.ticket is not None:
        entry.ticket.settle(entry.order[1], value)


def _fail(entry: Entry, error: BaseException) -> None:
    if entry.ticket is not None:
        entry.ticket.fail(error)
