"""Server lifecycle: load, bind, warm up, serve, drain.

``create_server(settings)`` loads the models and the collection, binds the port (0 picks a
free one, for tests) and starts answering. Health says NOT_SERVING until a warm-up search
has run through every stage, then SERVING. ``serve(settings)`` is ``tandem serve``: it runs
until SIGTERM or SIGINT, then stops taking calls, lets the ones in flight finish (up to
``drain_seconds``), saves the index and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.batcher import BatchLimits, RerankBatcher
from server.collection import Collection
from server.follow import Follower
from server.index import IndexSettings
from server.metrics import Metrics, MetricsEndpoint
from server.pairs import PairTokenizer
from server.priority import lower_this_thread, with_threads_lowered
from server.publish import current_version, is_published_root, version_folder
from server.search import Lanes, Searcher, make_runner
from server.service import Context, Models, RetrievalService, add_to_server
from server.settings import Settings, is_loopback
from server.status import Unauthenticated, describe
from tandem.encoders import BiEncoder, CrossEncoder
from tandem.v1 import tandem_pb2

log = logging.getLogger(__name__)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
SERVICE_NAME: str = tandem_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name
HEALTH_PREFIX = "/grpc.health.v1.Health/"
WARM_UP_QUERY = "what is two-stage retrieval"


class TokenAuth(grpc.aio.ServerInterceptor):
    """Every RPC but health must send ``authorization: Bearer <token>``.

    The comparison is constant-time (``hmac.compare_digest``); the token is never logged.
    """

    def __init__(self, token: str, *, on_reject: Callable[[str], None]) -> None:
        self.expected = f"Bearer {token}".encode()
        self.on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        sent = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                sent = value
        if hmac.compare_digest(sent.encode("utf-8", "replace"), self.expected):
            return await continuation(details)
        self.on_reject(details.method)
        handler = await continuation(details)
        reason = "a bearer token is required" if not sent else "the bearer token is wrong"
        return _denied(handler, f"{reason}: send metadata 'authorization: Bearer <token>'")


def _denied(handler: Handler | None, message: str) -> Handler:
    code, text = describe(Unauthenticated(message))

    async def deny(request: Any, context: Context) -> None:
        await context.abort(code, text)

    if handler is None or not handler.request_streaming:
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.stream_unary_rpc_method_handler(deny)


@dataclass
class Running:
    """A started server and everything it owns, in the order they are released."""

    server: grpc.aio.Server
    port: int
    settings: Settings
    searcher: Searcher
    health: health.aio.HealthServicer
    metrics: Metrics
    metrics_endpoint: MetricsEndpoint | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    dirty: asyncio.Event = field(default_factory=asyncio.Event)

    async def warm_up(self) -> None:
        await _warm_up(self.searcher)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_endpoint is None else self.metrics_endpoint.port

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets those in flight finish within ``grace``, saves, releases."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.drain_seconds if grace is None else grace)
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.searcher.batcher is not None:
            await self.searcher.batcher.stop()
        collection = self.searcher.collection
        try:
            await self.searcher.lanes.run("store", collection.checkpoint)
        except (OSError, RuntimeError) as error:
            log.error("final index checkpoint failed (start-up will repair it): %s", error)
        self.searcher.lanes.shutdown()
        collection.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        log.info("stopped", extra={"documents_saved": len(collection.index)})


def is_stand_in(manifest_source: str, setting: bool | None) -> bool:
    if setting is not None:
        return setting
    return "stand-in" in Path(manifest_source).name


def load_searcher(settings: Settings, metrics: Metrics) -> tuple[Searcher, Models, Follower | None]:
    """Opens both models (refusing altered artifacts) and the collection."""
    embedder = BiEncoder(
        settings.bi_encoder, threads=settings.threads, spinning=settings.ort_spinning
    )
    reranker = None
    pairs = None
    batcher = None
    if settings.reranker_enabled:
        assert settings.reranker is not None
        path = settings.reranker
        reranker = with_threads_lowered(
            lambda: CrossEncoder(path, threads=settings.threads, spinning=settings.ort_spinning),
            settings.reranker_nice,
        )
        pairs = PairTokenizer.for_reranker(reranker)
        batcher = RerankBatcher(
            make_runner(reranker),
            limits=BatchLimits(
                max_batch_tokens=settings.max_batch_tokens,
                max_batch_pairs=settings.max_batch_pairs,
                max_queued_pairs=settings.max_queued_pairs,
            ),
            on_batch=metrics.observe_batch,
            worker_setup=functools.partial(lower_this_thread, settings.reranker_nice),
        )

    def open_collection(folder: Path, version: str | None, read_only: bool) -> Collection:
        return Collection(
            folder,
            embedder=embedder,
            pairs=pairs,
            settings=IndexSettings(dtype=settings.index_dtype),  # type: ignore[arg-type]
            read_only=read_only,
            version=version,
        )

    if is_published_root(settings.collection):
        # A replica: the newest published version, read-only (see server.follow).
        version = current_version(settings.collection)
        collection = open_collection(
            version_folder(settings.collection, version), version, read_only=True
        )
    else:
        collection = open_collection(settings.collection, None, read_only=settings.read_only)
    stand_in = reranker is not None and is_stand_in(
        reranker.manifest.source, settings.reranker_stand_in
    )
    models = Models(embedder.manifest, reranker.manifest if reranker else None, stand_in)
    searcher = Searcher(
        collection,
        embedder=embedder,
        reranker=reranker,
        pairs=pairs,
        batcher=batcher,
        cache_size=settings.query_cache,
        lanes=Lanes.threaded(),
    )
    follower = None
    if collection.version is not None:
        follower = Follower(
            settings.collection,
            searcher,
            lambda folder, version: open_collection(folder, version, read_only=True),
            every=settings.follow_seconds,
        )
    return searcher, models, follower


def _announce_models(models: Models, settings: Settings) -> None:
    log.info(
        "bi-encoder loaded",
        extra={"source": models.bi_encoder.source, "precision": models.bi_encoder.precision},
    )
    if models.reranker is None:
        log.warning(
            "NO RERANKER: serving retrieve-only (bi-encoder ranking only)",
            extra={"reranker": str(settings.reranker)},
        )
    elif models.reranker_is_stand_in:
        log.warning(
            "STAND-IN RERANKER: it exercises the mechanics only; its rankings are NOT a quality "
            "reranker's. Export cross-encoder/ms-marco-MiniLM-L-6-v2 for real use.",
            extra={"source": models.reranker.source},
        )
    else:
        log.info("reranker loaded", extra={"source": models.reranker.source})


async def _warm_up(searcher: Searcher) -> None:
    """One call through every stage, so the first client does not pay for lazy init."""
    started = time.perf_counter()
    vector, _ = await searcher.lanes.run("query", searcher.embed_query, WARM_UP_QUERY)
    if searcher.batcher is not None and searcher.pairs is not None:
        await searcher.rerank_texts(WARM_UP_QUERY, [WARM_UP_QUERY], budget_s=None, top_n=1)
    await searcher.lanes.run("store", searcher.collection.index.search, vector, 1)
    log.info("warm-up done", extra={"ms": round((time.perf_counter() - started) * 1000, 1)})


async def _checkpointer(running: Running) -> None:
    """Saves the index after writes, at most every ``checkpoint_seconds``. Writes are durable
    in the store before they are acknowledged; this only shortens start-up repair."""
    collection = running.searcher.collection
    while True:
        await running.dirty.wait()
        await asyncio.sleep(running.settings.checkpoint_seconds)
        running.dirty.clear()
        try:
            await running.searcher.lanes.run("store", collection.checkpoint)
        except (OSError, RuntimeError) as error:
            # A full or read-only disk: the store still holds every acknowledged write, and
            # start-up repairs the index from it; try again after the next write.
            log.error("index checkpoint failed: %s", error)
            continue
        log.debug("index saved", extra={"generation": collection.store.generation})


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
    )


async def create_server(settings: Settings, *, warm: bool = True) -> Running:
    """Loads everything, binds and starts; with ``warm``, returns once warmed up and SERVING.
    (Tests pass ``warm=False`` to see NOT_SERVING, then call ``Running.warm_up``.)"""
    if not is_loopback(settings.host) and settings.token is None:
        log.warning(
            "listening beyond loopback with no token: anyone who can reach the port can read "
            "and write the collection",
            extra={"host": settings.host},
        )
    metrics = Metrics()
    searcher, models, follower = load_searcher(settings, metrics)
    _announce_models(models, settings)
    if searcher.batcher is not None:
        await searcher.batcher.start()
        batcher = searcher.batcher
        metrics.watch_queue(lambda: batcher.queued)
    metrics.watch_documents(lambda: len(searcher.collection.index))

    def rejected(method: str) -> None:
        metrics.rejections.labels("unauthenticated").inc()
        metrics.requests.labels(method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()

    interceptors = [TokenAuth(settings.token, on_reject=rejected)] if settings.token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # gRPC sets SO_REUSEPORT by default, so a second server on a taken port would start
            # and silently share its traffic; without it, the bind fails and says so.
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.host}:{settings.port}"
    credentials = _credentials(settings)
    port = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    running = Running(
        server=server,
        port=port,
        settings=settings,
        searcher=searcher,
        health=health_servicer,
        metrics=metrics,
        metrics_endpoint=None,
    )
    service = RetrievalService(
        searcher, settings=settings, metrics=metrics, models=models, on_write=running.dirty.set
    )
    add_to_server(service, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    await server.start()
    if settings.metrics_port >= 0:
        running.metrics_endpoint = metrics.serve(settings.host, settings.metrics_port)
    running.tasks.append(asyncio.create_task(_checkpointer(running), name="checkpointer"))
    running.tasks.append(asyncio.create_task(service.loop_lag.watch(), name="loop-lag"))
    if follower is not None:
        running.tasks.append(asyncio.create_task(follower.run(), name="follower"))
    if warm:
        await running.warm_up()
    log.info(
        "serving",
        extra={
            "address": f"{settings.host}:{port}",
            "tls": settings.tls,
            "token": settings.token is not None,
            "metrics_port": running.metrics_port,
            "documents": len(searcher.collection.index),
            "reranker": "none" if models.reranker is None else models.reranker.source,
            "reranker_is_stand_in": models.reranker_is_stand_in,
        },
    )
    return running


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM/SIGINT, then drains and exits."""
    running = await create_server(settings)
    # Everything loaded so far (modules, models, the collection) lives as long as the
    # process; frozen, it is skipped by the cyclic collector, whose full passes otherwise
    # walk it all and pause every call in flight.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("draining", extra={"grace_s": settings.drain_seconds})
    await running.stop()
