"""How many latency-bound calls the server lets run at once, learned from their lateness.

A fixed in-flight cap cannot hold a latency target: the number of calls that finish in time
depends on the CPU, the document lengths, the budget asked for and whatever else shares the
cores. So the limit adapts, AIMD as in Envoy's adaptive concurrency filter and Netflix's
concurrency-limits: a call that meets its target raises the limit by ``1 / limit`` (about +1
per round of calls), and one that misses it cuts the limit by ``backoff``. Only calls with a
target feed it: a Search or Rerank with a rerank budget (target: budget + slack) and a
retrieve-only Search (target: 10 ms). Calls without a deadline are bulk work and say nothing
about latency.

As in Netflix's ``AIMDLimit``, the limit rises only while at least half of it is in use: an
on-time call at light load says nothing about how many calls could run at once, and a limit
that had drifted up to its maximum through a quiet spell would let a sudden burst in whole.
For the same reason the server starts at ``INITIAL_LIMIT``, not at its maximum; a busy
server raises it by about one per round of calls.

A limit is only as current as the calls that set it. Calls without a target still count
against it but never move it, so after an overload a server doing only such work
(unbudgeted Searches and Reranks, a query's Embeds) would keep refusing at the cut limit
for good, idle cores and all. So once no call with a target has ended for ``QUIET_S``, a limit
below ``INITIAL_LIMIT`` goes back to it, as if the server had just started: the next
latency-bound calls measure it afresh.

The controller is deliberately pure (no clock, no I/O) so tests can drive it call by call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from tandem.server.engine.batcher import Overloaded, TooShallow
from tandem.server.engine.engine import Call
from tandem.server.engine.errors import Retryable
from tandem.server.settings import Settings

log = logging.getLogger(__name__)
Reply = TypeVar("Reply")

# Calls in flight when 2 cores run at capacity: ~130-190 QPS x a 100 ms budget (RESULTS).
INITIAL_LIMIT = 16
# A hundred budgets: long past any burst that cut the limit, short against a bulk job's run.
QUIET_S = 10.0


@dataclass
class AdaptiveLimit:
    limit: float
    minimum: float = 2.0
    maximum: float = 64.0
    backoff: float = 0.9

    def admits(self, running: int) -> bool:
        return running < int(self.limit)

    def observe(self, *, late: bool, running: int) -> None:
        """``running``: the calls in flight when this one was admitted, itself included."""
        if late:
            self.limit = max(self.minimum, self.limit * self.backoff)
        elif 2 * running >= self.limit:
            self.limit = min(self.maximum, self.limit + 1.0 / self.limit)

    def restore(self, to: float) -> bool:
        """Raises a limit below ``to`` (at most ``maximum``) back to it (evidence gone stale);
        whether it moved."""
        restored = min(self.maximum, to)
        if self.limit >= restored:
            return False
        self.limit = restored
        return True


class LoopLag:
    """How late the event loop runs its callbacks, as a newly arrived call would feel it.

    The handler's own clock starts only when the loop gets to the call, and its reply waits
    for the loop again; under load both waits grow, unseen by the handler. A ticker that asks
    to wake every ``tick`` seconds measures that wait as its overshoot (EWMA).
    """

    def __init__(
        self, tick: float = 0.005, on_sample: Callable[[float], None] | None = None
    ) -> None:
        self.tick = tick
        self.seconds = 0.0
        self.on_sample = on_sample

    async def watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.tick)
            lag = max(0.0, time.perf_counter() - before - self.tick)
            self.seconds += 0.2 * (lag - self.seconds)
            if self.on_sample is not None:
                self.on_sample(lag)


class ShedLog:
    """One warning per ``every`` seconds while calls are being refused, with counts by
    reason: a line per refused call would add to the overload it reports."""

    def __init__(self, log: Callable[[dict[str, int]], None], *, every: float = 10.0) -> None:
        self.log = log
        self.every = every
        self.counts: dict[str, int] = {}
        self.last = -math.inf

    def refused(self, reason: str, now: float) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if now - self.last >= self.every:
            self.log(self.counts)
            self.counts = {}
            self.last = now


# How an admitted call ended, as far as the adaptive limit cares.
Outcome = Literal["ok", "overloaded", "failed"]


class Refused(Overloaded):
    """Admission said no; ``reason`` names the check (for metrics and the shedding log)."""

    def __init__(self, message: str, *, reason: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.reason = reason


@dataclass(frozen=True)
class Admitted:
    """A call let in: whether it queues for the engine's threads, and how many such calls
    were running with it (itself included), which the adaptive limit learns from."""

    queued: bool
    running: int


class Gate:
    """Admission, the same for every transport. Three checks, cheapest first: the
    ``max_in_flight`` cap; the adaptive limit on calls that queue for the threads a search
    waits on (Search, Rerank, a query's Embed: "queued"); and the wait those threads
    predict for a newcomer. An indexing job's Embed, like an Upsert, meets only the cap.

    Only the event loop's thread calls it, so its counters need no lock."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_limit: Callable[[float], None] | None = None,
        loop_lag: LoopLag | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_limit = on_limit  # the adaptive limit after each change, for metrics
        self.on_refused = on_refused  # each refusal's reason, for metrics
        self.shed_log = ShedLog(
            lambda counts: log.warning("shedding load: calls refused", extra={"refused": counts})
        )
        self.loop_lag = loop_lag or LoopLag()
        self.in_flight = 0
        self.queued_in_flight = 0
        self.limit = AdaptiveLimit(
            limit=min(INITIAL_LIMIT, settings.max_in_flight), maximum=settings.max_in_flight
        )
        self.observed_at = time.perf_counter()  # when a call with a target last ended

    def admit(self, *, queued: bool, expected_wait_s: float, now: float) -> Admitted:
        """Lets the call in, or raises ``Refused``; an admitted call must be ``release``d.
        ``now``: ``time.perf_counter()`` at the call's arrival."""
        settings = self.settings
        if queued and now - self.observed_at >= QUIET_S:
            self._restore_stale_limit(quiet_s=now - self.observed_at)
        if self.in_flight >= settings.max_in_flight:
            raise Refused(
                f"{self.in_flight} calls are in flight, the limit is {settings.max_in_flight}; "
                "retry with backoff",
                reason="in_flight",
                retry_after_s=BACKOFF_S,
            )
        if queued and settings.adaptive_limit and not self.limit.admits(self.queued_in_flight):
            raise Refused(
                f"the server is overloaded: {self.queued_in_flight} calls are running, as "
                f"many as it now admits (the limit, {int(self.limit.limit)}, rises while "
                "calls finish on time and falls when they finish late); retry with backoff",
                reason="concurrency_limit",
                retry_after_s=BACKOFF_S,
            )
        if queued and expected_wait_s * 1000 > settings.max_queue_wait_ms:
            raise Refused(
                f"the server is overloaded: a call now would wait ~{expected_wait_s * 1000:.0f} "
                f"ms before any work (limit {settings.max_queue_wait_ms} ms); retry with backoff",
                reason="queue_wait",
                retry_after_s=max(BACKOFF_S, expected_wait_s),
            )
        self.in_flight += 1
        self.queued_in_flight += queued
        return Admitted(queued, self.queued_in_flight)

    async def run(
        self,
        call: Call,
        work: Callable[[Call], Awaitable[Reply]],
        *,
        queued: bool,
        expected_wait_s: float,
    ) -> Reply:
        """Admits the call (or raises ``Refused``), runs it, and releases it with how it
        ended, which the adaptive limit learns from. Every transport runs calls through here."""
        try:
            admitted = self.admit(queued=queued, expected_wait_s=expected_wait_s, now=call.arrived)
        except Refused as refusal:
            self._refused(refusal.reason, call.arrived)
            raise
        outcome: Outcome = "ok"
        try:
            return await work(call)
        except asyncio.CancelledError:
            outcome = "failed"
            raise
        except Exception as error:
            outcome = "overloaded" if isinstance(error, Retryable) else "failed"
            if isinstance(error, Overloaded):  # the reranker's queue is full
                self._refused("queue_full", call.arrived)
            elif isinstance(error, TooShallow):  # min_rerank could not be met in time
                self._refused("too_shallow", call.arrived)
            raise
        finally:
            self.release(
                admitted,
                arrived=call.arrived,
                now=time.perf_counter(),
                target_s=call.latency_target_s,
                outcome=outcome,
            )

    def _refused(self, reason: str, now: float) -> None:
        self.shed_log.refused(reason, now)
        if self.on_refused is not None:
            self.on_refused(reason)

    def release(
        self,
        admitted: Admitted,
        *,
        arrived: float,
        now: float,
        target_s: float | None,
        outcome: Outcome,
    ) -> None:
        """The call that arrived at ``arrived`` is over at ``now`` (``time.perf_counter()``).
        ``outcome``: "ok" (it was answered), "overloaded" (the engine refused it for
        overload: as late as a call can be), or "failed" (any other error, which says
        nothing about latency)."""
        self.in_flight -= 1
        self.queued_in_flight -= admitted.queued
        if target_s is None or outcome == "failed":
            return
        # The loop's lag stands for the waits the handler cannot see: before it ran, and
        # for the reply to be sent.
        late = outcome == "overloaded" or now - arrived + 2 * self.loop_lag.seconds > target_s
        self.limit.observe(late=late, running=admitted.running)
        self.observed_at = now
        self._limit_changed()

    def _restore_stale_limit(self, *, quiet_s: float) -> None:
        before = self.limit.limit
        if self.limit.restore(INITIAL_LIMIT):
            log.info(
                "adaptive limit back from %d to %d: no call with a latency target has "
                "ended for %.0f s",
                before, self.limit.limit, quiet_s,
            )  # fmt: skip
            self._limit_changed()

    def _limit_changed(self) -> None:
        if self.on_limit is not None:
            self.on_limit(self.limit.limit)


# What a refused client is told to wait: about one budget, the time in-flight calls take to
# finish and free their places.
BACKOFF_S = 0.1
