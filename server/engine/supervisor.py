"""Background tasks under watch: a crash is logged, reported, and restarted where safe.

An unsupervised asyncio task that raises dies silently: its exception waits in the task
object until someone looks, and nobody does. Here each task runs inside a loop that logs the
traceback, marks the task down (health turns NOT_SERVING through ``on_change``), lets the
task's owner fail the calls waiting on it (``on_crash``), and restarts it after a backoff
that doubles with each crash. A task that keeps crashing stays down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """How a crashed task comes back. More than ``max_crashes`` within ``window_s`` seconds
    means it will only crash again: it stays down, and health stays NOT_SERVING."""

    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_crashes: int = 5
    window_s: float = 60.0


class Supervisor:
    def __init__(
        self,
        *,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.on_change = on_change  # called with healthy=False/True as tasks go down and up
        self.policy = policy or RestartPolicy()
        self.down: dict[str, str] = {}  # task name -> why it is down
        self.tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def healthy(self) -> bool:
        return not self.down

    def spawn(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        *,
        on_crash: Callable[[BaseException], None] | None = None,
        restart: bool = True,
    ) -> None:
        """Runs ``run()`` as the task ``name``; ``on_crash`` gets each exception it raises."""
        self.tasks[name] = asyncio.create_task(self._keep(name, run, on_crash, restart), name=name)

    def replace(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        *,
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> asyncio.Task[None] | None:
        """Runs ``run()`` as the task ``name`` from now on and returns the task it replaces,
        still running, for the caller to stop once it has finished its work."""
        old = self.tasks.get(name)
        self.spawn(name, run, on_crash=on_crash)
        return old

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()

    async def _keep(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        on_crash: Callable[[BaseException], None] | None,
        restart: bool,
    ) -> None:
        crashes: deque[float] = deque()
        while True:
            try:
                await run()
                return
            except Exception as error:
                log.error("background task crashed", extra={"task": name}, exc_info=error)
                self.down[name] = f"{type(error).__name__}: {error}"
                if on_crash is not None:
                    on_crash(error)
                await self._changed()
                now = time.monotonic()
                crashes.append(now)
                while crashes and now - crashes[0] > self.policy.window_s:
                    crashes.popleft()
                if not restart or len(crashes) > self.policy.max_crashes:
                    log.error(
                        "background task stays down: the server needs attention",
                        extra={"task": name, "crashes": len(crashes)},
                    )
                    return
                delay = self.policy.backoff_s * 2 ** (len(crashes) - 1)
                await asyncio.sleep(min(delay, self.policy.max_backoff_s))
                del self.down[name]
                log.warning("background task restarted", extra={"task": name})
                await self._changed()

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change(self.healthy)
