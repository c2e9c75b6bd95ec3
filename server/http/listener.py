"""Runs the HTTP app with uvicorn on the gRPC server's own event loop.

One loop serves both doors: the engine's awaitables (its lanes, the batcher's futures) belong
to it, the admission gate is single-threaded by design, and a request crosses no thread to
reach the engine. The loop only moves messages (models run on the engine's threads), so
HTTP adds parsing and no waits. Uvicorn's own signal handling is left out: ``tandem serve``
owns SIGTERM and drains both servers together.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Generator
from pathlib import Path

import uvicorn
from fastapi.dependencies import models as fastapi_dependencies
from starlette.types import ASGIApp

CLASSIFICATION_CACHES = (
    "_is_gen_callable_cached",
    "_is_async_gen_callable_cached",
    "_is_coroutine_callable_cached",
)


def forget_endpoints() -> None:
    """FastAPI (0.165) keeps every endpoint it has classified in module-level LRU caches of
    4,096 entries, and our endpoints close over the engine: a process that stops a server
    and starts another (the test suite does, hundreds of times) would keep each stopped
    server's models in memory, about 400 MiB apiece. Clearing costs the next request one
    inspection of its endpoint."""
    for name in CLASSIFICATION_CACHES:
        cached = getattr(fastapi_dependencies, name, None)
        if cached is not None:
            cached.cache_clear()


class _Embedded(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpListener:
    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str,
        port: int,
        drain_seconds: float,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, not left 0: asyncio turns Nagle off (TCP_NODELAY) only on
        # sockets whose proto says TCP, and accepted ones inherit it. With Nagle on, a reply's
        # body waited behind its headers for the client's delayed ACK: 40 ms on every call.
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as error:
            self.socket.close()
            raise OSError(
                f"the HTTP port {host}:{port} cannot be bound ({error.strerror}): choose "
                "another with --http-port, or -1 to turn HTTP off"
            ) from error
        self.port: int = self.socket.getsockname()[1]
        self.tls = tls_cert is not None
        config = uvicorn.Config(
            app,
            log_config=None,  # Tandem's JSON log; each call is logged by the app itself
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(math.ceil(drain_seconds), 1),
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
            server_header=False,
        )
        self.server = _Embedded(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve([self.socket]), name="http")
        while not self.server.started:
            if self.task.done():
                await self.task  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops accepting, lets requests in flight finish (up to ``grace_s``, else the drain
        time), closes."""
        try:
            if self.task is None:
                self.socket.close()
                return
            if grace_s is not None:
                self.server.config.timeout_graceful_shutdown = max(math.ceil(grace_s), 1)
            self.server.should_exit = True
            await asyncio.gather(self.task, return_exceptions=True)
        finally:
            forget_endpoints()
