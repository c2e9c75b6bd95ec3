"""The threads blocking work runs on, so the event loop only moves messages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

from tandem.server.engine.priority import lower_this_thread

T = TypeVar("T")

# - query: the bi-encoder for queries and Embed calls;
# - pairs: the reranker's tokenizer for client texts and joining (query, document) ids, apart
#   from ``query`` so tokenizing a 1,000-document Rerank never holds a search's embedding back;
# - ingest: the bi-encoder and tokenizer for upserts, apart from both so a large upsert never
#   holds a search back;
# - store: the document store and the vector index. Neither is thread-safe, so one thread
#   owns both; its calls are short (an index probe, a commit);
# - listing: Get's pages, through a store connection of its own, so that an export reading
#   pages back to back never queues a search's reads (a page of 500 takes 3 ms).
LANE_NAMES = ("query", "pairs", "ingest", "store", "listing")
# The lanes every Search, Rerank and Embed queues on: admission predicts their wait.
CALL_LANES = ("query", "pairs", "store")


class Lanes:
    """One single-thread executor per lane. Without executors (``Lanes()``) everything runs
    inline, as the library tests want."""

    def __init__(self, executors: Mapping[str, Executor] | None = None) -> None:
        self.executors = dict(executors or {})
        self.pending = dict.fromkeys(LANE_NAMES, 0)  # calls waiting or running, per lane
        # Seconds per call, per lane (EWMA), so admission can predict a newcomer's wait.
        self.service_seconds = dict.fromkeys(LANE_NAMES, 0.0)

    @classmethod
    def threaded(cls, lowered: Mapping[str, int] | None = None) -> Lanes:
        """One thread per lane; ``lowered`` names lanes whose thread runs that much lower in
        CPU priority (a nice increment)."""
        lowered = lowered or {}
        return cls(
            {
                name: ThreadPoolExecutor(
                    1,
                    thread_name_prefix=name,
                    initializer=lower_this_thread,
                    initargs=(lowered.get(name, 0),),
                )
                for name in LANE_NAMES
            }
        )

    async def run(self, lane: str, function: Callable[..., T], *args: Any) -> T:
        executor = self.executors.get(lane)
        if executor is None:
            return function(*args)
        self.pending[lane] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, self._timed, lane, function, *args
            )
        finally:
            self.pending[lane] -= 1

    def _timed(self, lane: str, function: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            seconds = time.perf_counter() - started
            self.service_seconds[lane] += 0.1 * (seconds - self.service_seconds[lane])

    def expected_wait(self) -> float:
        """Seconds a call arriving now would queue before its query, pair and store work ran."""
        return sum(self.pending[lane] * self.service_seconds[lane] for lane in CALL_LANES)

    def shutdown(self) -> None:
        for executor in self.executors.values():
            executor.shutdown(wait=True)
