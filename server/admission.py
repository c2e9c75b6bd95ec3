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

The controller is deliberately pure (no clock, no I/O) so tests can drive it call by call.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

# Calls in flight when 2 cores run at capacity: ~130-190 QPS x a 100 ms budget (RESULTS).
INITIAL_LIMIT = 16


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
