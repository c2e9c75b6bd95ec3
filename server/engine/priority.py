"""Lower CPU priority for the reranker's threads: its work is elastic, the rest is not.

Under a budget the reranker scores what time allows, while the event loop, the store and
the query encoder sit on every call's critical path. At equal priority, an overloaded server
gave the reranker two thirds of the cores for a third of a pair per call, and admitted calls
waited behind it. Niced, the reranker still gets every core nothing else wants (an idle
server reranks as fast as before) and overload shows up as fewer pairs reranked rather than
as late replies. Linux per-thread priorities; elsewhere a no-op.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def thread_ids() -> set[int]:
    try:
        return {int(name) for name in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def lower(thread_ids: Iterable[int], increment: int) -> None:
    for tid in thread_ids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
        except OSError as error:  # not Linux, or a thread that has gone
            log.debug("cannot lower thread priority", extra={"tid": tid, "error": str(error)})


def lower_this_thread(increment: int) -> None:
    lower([threading.get_native_id()], increment)


def with_threads_lowered(create: Callable[[], T], increment: int) -> T:
    """Calls ``create`` and lowers the priority of every thread it started (onnxruntime
    starts a session's intra-op pool in its constructor)."""
    before = thread_ids()
    created = create()
    if increment:
        lower(thread_ids() - before, increment)
    return created
