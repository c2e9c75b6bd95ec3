"""Server lifecycle, and where the layers are put together: load, bind, warm up, serve, drain.

``create_server(settings)`` loads the models (refusing altered or unverified artifacts) and
the collection, builds the engine, puts the gRPC servicer in front of it, binds the port (0
picks a free one, for tests) and starts answering. Health says NOT_SERVING until a warm-up
search has run through every stage, and again whenever a background task is down.
``serve(settings)`` is ``tandem serve``: it runs until SIGTERM or SIGINT, then stops taking
calls, lets the ones in flight finish (up to ``drain_seconds``), saves the index and exits.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.artifact import Manifest
from tandem.cpu import cpu_flags
from tandem.devices import BackendChoice, CpuPrecision, TorchDtype
from tandem.encoders import BiEncoder, CrossEncoder, Encoder
from tandem.export.precision_cache import PrecisionCache
from tandem.export.probe import PrecisionRefused, fit_cpu_precision
from tandem.runtimes import Runtime, RuntimeFit, slower_here
from tandem.runtimes.capacity import learn_batch_profile, warm_gpu_shapes, warm_up
from tandem.server.admission import Gate, LoopLag
from tandem.server.api.auth import TokenAuth
from tandem.server.api.service import RetrievalService, add_to_server
from tandem.server.engine.batcher import BatchLimits, CostModel, RerankBatcher
from tandem.server.engine.collection import Collection
from tandem.server.engine.engine import Engine, Models
from tandem.server.engine.lanes import Lanes
from tandem.server.engine.pairs import PairTokenizer
from tandem.server.engine.priority import lower_this_thread, with_threads_lowered
from tandem.server.engine.search import (
    RerankerSlot,
    Searcher,
    make_runner,
    ms_since,
    reranker_id,
)
from tandem.server.engine.supervisor import Supervisor
from tandem.server.metrics import Metrics, MetricsEndpoint
from tandem.server.replication.follow import Follower
from tandem.server.replication.models import (
    ModelFollower,
    Refused,
    is_models_root,
    measured_worse,
)
from tandem.server.replication.models import current_version as current_reranker
from tandem.server.replication.models import version_folder as reranker_folder
from tandem.server.replication.publish import current_version, is_published_root, version_folder
from tandem.server.settings import Settings, is_loopback
from tandem.v1 import tandem_pb2

if TYPE_CHECKING:
    from tandem.server.http.listener import HttpListener

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Encoder)
SERVICE_NAME: str = tandem_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name
WARM_UP_QUERY = "what is two-stage retrieval"
FOLLOWER = "follower"
RERANKER_FOLLOWER = "reranker-follower"
# A GPU batch holds up to (learned tokens / this) pairs: short pairs should fill it too.
GPU_SHORTEST_PAIR_TOKENS = 64


class Unverified(Exception):
    """An artifact whose parity check failed or never ran, served without --allow-unverified."""


@dataclass
class Running:
    """A started server and everything it owns, in the order they are released."""

    server: grpc.aio.Server
    port: int
    settings: Settings
    engine: Engine
    health: health.aio.HealthServicer
    metrics: Metrics
    metrics_endpoint: MetricsEndpoint | None
    gate: Gate
    http: HttpListener | None = None
    draining: bool = False
    loop_lag: asyncio.Task[None] | None = None
    warm: bool = False

    @property
    def searcher(self) -> Searcher:
        return self.engine.searcher

    async def warm_up(self) -> None:
        await _warm_up(self.engine.searcher)
        self.warm = True
        await self.set_health(self.engine.supervisor.healthy)

    async def set_health(self, healthy: bool) -> None:
        """SERVING once warm and while no background task is down."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy and self.warm
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_endpoint is None else self.metrics_endpoint.port

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    @property
    def serving(self) -> bool:
        return self.warm and self.engine.supervisor.healthy and not self.draining

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets those in flight finish within ``grace``, saves, releases."""
        self.draining = True
        await self.health.enter_graceful_shutdown()
        grace_s = self.settings.drain_seconds if grace is None else grace
        stopping = [self.server.stop(grace_s)]
        if self.http is not None:
            stopping.append(self.http.stop(grace_s))
        await asyncio.gather(*stopping)
        if self.loop_lag is not None:
            self.loop_lag.cancel()
            await asyncio.gather(self.loop_lag, return_exceptions=True)
        await self.engine.stop()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        log.info("stopped", extra={"documents_saved": self.engine.collection.index.documents})


def is_stand_in(manifest_source: str, setting: bool | None) -> bool:
    if setting is not None:
        return setting
    return "stand-in" in Path(manifest_source).name


def _check_verified(manifest: Manifest, folder: Path, settings: Settings) -> None:
    if manifest.verified:
        return
    measured = (
        "its parity check never ran" if manifest.parity is None
        else f"its parity check failed ({manifest.parity.metrics} against "
             f"{manifest.parity.thresholds})"
    )  # fmt: skip
    if not settings.allow_unverified:
        raise Unverified(
            f"{folder}: {measured}. Re-export it (tandem export), or pass --allow-unverified "
            "to serve it anyway"
        )
    log.warning("SERVING AN UNVERIFIED ARTIFACT", extra={"folder": str(folder), "why": measured})


def _check_fits_cpu(folder: Path, runtime: Runtime) -> None:
    why = slower_here(runtime.backend, runtime.device, cpu_flags())
    if why is not None:
        log.warning(
            "artifact runs slower here than it could", extra={"folder": str(folder), "why": why}
        )


def warmed(chosen: tuple[CrossEncoder, RuntimeFit]) -> tuple[CrossEncoder, RuntimeFit]:
    warm_up(chosen[0].runtime)
    return chosen


def batch_plan(
    settings: Settings, runtime: Runtime, max_width: int
) -> tuple[BatchLimits, CostModel | None]:
    """The settings' batch caps and, on a GPU, the cost model to start from. Caps left at 0
    are the CPU defaults, or on a GPU a cap learned from the device (GPU batches are far
    larger: thousands of padded tokens), whose timed runs also start the batcher's cost
    model (a CPU's rate would first predict that almost nothing fits a budget there)."""
    tokens, pairs = settings.max_batch_tokens, settings.max_batch_pairs
    cost = None
    if runtime.device.is_gpu:
        profile = learn_batch_profile(runtime)
        tokens = tokens or profile.max_batch_tokens
        pairs = pairs or max(BatchLimits.max_batch_pairs, tokens // GPU_SHORTEST_PAIR_TOKENS)
        cost = CostModel.from_runs(profile.seconds)
    limits = BatchLimits(
        max_batch_tokens=tokens or BatchLimits.max_batch_tokens,
        max_batch_pairs=pairs or BatchLimits.max_batch_pairs,
        window=max(BatchLimits.window, pairs),
        max_queued_pairs=settings.max_queued_pairs,
    )
    warm_gpu_shapes(
        runtime,
        max_rows=limits.max_batch_pairs,
        max_width=max_width,
        max_tokens=limits.max_batch_tokens,
    )
    log.info(
        "reranker batches",
        extra={
            "backend": runtime.backend,
            "device": str(runtime.device),
            "max_batch_tokens": limits.max_batch_tokens,
            "max_batch_pairs": limits.max_batch_pairs,
            **(
                {}
                if cost is None
                else {
                    "ms_per_run": round(cost.seconds_per_run * 1000, 3),
                    "tokens_per_ms": round(1e-3 / max(cost.seconds_per_token, 1e-12)),
                }
            ),
        },
    )
    return limits, cost


def load_engine(settings: Settings, metrics: Metrics, supervisor: Supervisor) -> Engine:
    """Opens both models (refusing altered or unverified artifacts) and the collection."""
    embedder, embedder_fit = fitted(
        settings.bi_encoder,
        settings,
        lambda precision: BiEncoder(
            settings.bi_encoder,
            threads=settings.threads,
            spinning=settings.ort_spinning,
            device=settings.bi_encoder_device or settings.device,
            backend=cast(BackendChoice, settings.backend),
            torch_dtype=cast(TorchDtype, settings.torch_dtype),
            cpu_precision=precision,
        ),
    )
    _check_verified(embedder.manifest, settings.bi_encoder, settings)
    _check_fits_cpu(settings.bi_encoder, embedder.runtime)
    reranker = None
    reranker_fit = None
    slot = None
    reranker_version = ""
    if settings.reranker is not None:
        path = settings.reranker
        if is_models_root(path):
            reranker_version = current_reranker(path)
            path = reranker_folder(path, reranker_version)
        reranker, reranker_fit = load_reranker(settings, path)
        slot = reranker_slot(settings, metrics, reranker)
    pairs = None if slot is None else slot.pairs

    warm_up(embedder.runtime)
    warm_gpu_shapes(  # queries: one row each
        embedder.runtime,
        max_rows=1,
        max_width=embedder.manifest.max_length,
        max_tokens=embedder.manifest.max_length,
    )

    def open_collection(folder: Path, version: str | None, read_only: bool) -> Collection:
        return Collection(
            folder,
            embedder=embedder,
            pairs=pairs,
            settings=settings.index_settings,
            read_only=read_only,
            version=version,
        )

    if is_published_root(settings.collection):
        # A replica: the newest published version, read-only (see replication.follow).
        version = current_version(settings.collection)
        collection = open_collection(
            version_folder(settings.collection, version), version, read_only=True
        )
    else:
        collection = open_collection(settings.collection, None, read_only=settings.read_only)
    models = Models(
        embedder.manifest,
        reranker.manifest if reranker else None,
        reranker is not None and is_stand_in(reranker.manifest.source, settings.reranker_stand_in),
        reranker_since=now_utc() if reranker else "",
        reranker_version=reranker_version,
        bi_encoder_fit=embedder_fit,
        reranker_fit=reranker_fit,
    )
    searcher = Searcher(
        collection,
        embedder=embedder,
        reranker=reranker,
        pairs=pairs,
        batcher=None if slot is None else slot.batcher,
        cache_size=settings.query_cache,
        lanes=Lanes.threaded({"ingest": settings.ingest_nice, "listing": settings.ingest_nice}),
    )
    engine = Engine(
        searcher,
        settings=settings,
        models=models,
        supervisor=supervisor,
        on_search=metrics.observe_search,
    )
    if collection.version is not None:
        follower = Follower(
            settings.collection,
            searcher,
            lambda folder, version: open_collection(folder, version, read_only=True),
            every=settings.follow_seconds,
        )
        supervisor.spawn(FOLLOWER, follower.run)
    if reranker_version:
        assert settings.reranker is not None
        models_root = settings.reranker

        async def swap_in(folder: Path, version: str) -> None:
            await publish_reranker_to(engine, settings, metrics, folder, version)

        model_follower = ModelFollower(
            models_root, swap_in, serving=reranker_version, every=settings.follow_seconds
        )
        engine.reload_models = model_follower.wake.set
        supervisor.spawn(RERANKER_FOLLOWER, model_follower.run)
    return engine


def load_reranker(settings: Settings, path: Path) -> tuple[CrossEncoder, RuntimeFit]:
    """Opens, warms and checks a reranker artifact (refusing altered or unverified ones)."""

    def opened(precision: CpuPrecision) -> CrossEncoder:
        return CrossEncoder(
            path,
            threads=settings.threads,
            spinning=settings.ort_spinning,
            device=settings.device,
            backend=cast(BackendChoice, settings.backend),
            torch_dtype=cast(TorchDtype, settings.torch_dtype),
            cpu_precision=precision,
        )

    # Warmed inside too: OpenVINO starts its worker threads on the first run, not when
    # the model is compiled. Before the bi-encoder's first run, so that the workers
    # the two models share start lowered; the query path keeps its calling thread.
    reranker, fit = with_threads_lowered(
        lambda: warmed(fitted(path, settings, opened)), settings.reranker_nice
    )
    _check_verified(reranker.manifest, path, settings)
    _check_fits_cpu(path, reranker.runtime)
    lead = measured_worse(reranker.manifest)
    if lead is not None:
        log.warning(
            "this reranker ranks worse than %s alone (%s): Search would answer better "
            "retrieve-only or with another reranker",
            lead.first_stage,
            lead.sentence(),
            extra={"folder": str(path)},
        )
    return reranker, fit


def fitted(
    folder: Path, settings: Settings, open_encoder: Callable[[CpuPrecision], E]
) -> tuple[E, RuntimeFit]:
    """The artifact opened in the precision that fits this CPU (tandem.export.probe)."""
    try:
        encoder, fit = fit_cpu_precision(
            open_encoder,
            folder,
            settings.cpu_precision,
            allow_unverified=settings.allow_unverified,
            cache=None
            if settings.cache_dir is None
            else PrecisionCache(settings.cache_dir, folder, threads=settings.threads),
        )
    except PrecisionRefused as error:
        raise Unverified(str(error)) from error
    log.info(
        "runtime chosen",
        extra={
            "folder": str(folder),
            "runtime": fit.backend,
            "precision": fit.precision,
            "why": fit.reason,
        },
    )
    return encoder, fit


def reranker_slot(settings: Settings, metrics: Metrics, reranker: CrossEncoder) -> RerankerSlot:
    """The reranker with its pair tokenizer and its own batcher (not started)."""
    limits, cost = batch_plan(settings, reranker.runtime, reranker.manifest.max_length)
    batcher = RerankBatcher(
        make_runner(reranker),
        limits=limits,
        cost=cost,
        on_batch=metrics.observe_batch,
        worker_setup=functools.partial(lower_this_thread, settings.reranker_nice),
    )
    return RerankerSlot(
        reranker, PairTokenizer.for_reranker(reranker), batcher, reranker_id(reranker)
    )


async def publish_reranker_to(
    engine: Engine, settings: Settings, metrics: Metrics, folder: Path, version: str
) -> None:
    """Loads the reranker in ``folder`` beside the serving one (off the event loop, so calls
    go on) and swaps it in; raises, leaving the old one serving, where it is refused."""
    started = time.perf_counter()
    try:
        reranker, fit = await asyncio.to_thread(load_reranker, settings, folder)
    except Unverified as error:
        raise Refused(str(error)) from error
    slot = reranker_slot(settings, metrics, reranker)
    models = replace(
        engine.models,
        reranker=reranker.manifest,
        reranker_is_stand_in=is_stand_in(reranker.manifest.source, settings.reranker_stand_in),
        reranker_since=now_utc(),
        reranker_version=version,
        reranker_fit=fit,
    )
    old = await engine.swap_reranker(slot, models)
    log.info(
        "reranker swapped",
        extra={"from": old, "to": slot.id, "version": version, "ms": ms_since(started)},
    )


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _announce_models(models: Models) -> None:
    log.info(
        "bi-encoder loaded",
        extra={"source": models.bi_encoder.source, "precision": models.bi_encoder.precision},
    )
    if models.reranker is None:
        log.warning("NO RERANKER (--reranker none): serving retrieve-only (bi-encoder ranking)")
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
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    started: list[Running] = []

    async def on_change(healthy: bool) -> None:
        if started:
            await started[0].set_health(healthy)

    engine = load_engine(settings, metrics, Supervisor(on_change=on_change))
    try:
        running = _assemble(settings, engine, metrics, health_servicer)
        started.append(running)
        await running.server.start()
        if settings.http_port >= 0:
            running.http = _http_listener(settings, running)
            await running.http.start()
        if settings.metrics_port >= 0:
            running.metrics_endpoint = metrics.serve(settings.host, settings.metrics_port)
        engine.start()
        running.loop_lag = asyncio.create_task(running.gate.loop_lag.watch(), name="loop-lag")
        if warm:
            await running.warm_up()
    except BaseException:
        # A port that will not bind, say: release the collection (and its writer lock).
        if started:
            await started[0].server.stop(0)
            if started[0].http is not None:
                await started[0].http.stop()
        await engine.stop()
        raise
    log.info(
        "serving",
        extra={
            "address": f"{settings.host}:{running.port}",
            "tls": settings.tls,
            "token": settings.token is not None,
            "metrics_port": running.metrics_port,
            "http": _http_address(settings, running.http_port),
            "documents": len(engine.collection.index),
            "reranker": "none" if engine.models.reranker is None else engine.models.reranker.source,
            "reranker_is_stand_in": engine.models.reranker_is_stand_in,
        },
    )
    return running


def _http_listener(settings: Settings, running: Running) -> HttpListener:
    # Imported here: a gRPC-only server (--http-port -1) loads no FastAPI, pydantic or uvicorn.
    from tandem.server.http.app import create_app
    from tandem.server.http.listener import HttpListener

    app = create_app(
        running.engine,
        settings=settings,
        gate=running.gate,
        metrics=running.metrics,
        serving=lambda: running.serving,
    )
    return HttpListener(
        app,
        host=settings.host,
        port=settings.http_port,
        drain_seconds=settings.drain_seconds,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
    )


def _url_host(settings: Settings) -> str:
    return f"[{settings.host}]" if ":" in settings.host else settings.host


def _http_address(settings: Settings, port: int | None) -> str | None:
    if port is None:
        return None
    return f"{'https' if settings.tls else 'http'}://{_url_host(settings)}:{port}"


def _addresses(settings: Settings, running: Running) -> str:
    """What a person starting the server wants to open, on stdout (the log is on stderr)."""
    host = _url_host(settings)
    lines = [f"Tandem is serving gRPC on {host}:{running.port}"]
    http = _http_address(settings, running.http_port)
    if http is not None:
        lines += [
            f"  search page:  {http}/",
            f"  API docs:     {http}/docs",
            f"  rerank:       {http}/v2/rerank (Cohere), {http}/rerank (TEI)",
        ]
    if running.metrics_port is not None:
        lines.append(f"  metrics:      http://{host}:{running.metrics_port}/metrics")
    return "\n".join(lines)


def _assemble(
    settings: Settings, engine: Engine, metrics: Metrics, health_servicer: health.aio.HealthServicer
) -> Running:
    """Puts the gRPC servicer in front of ``engine`` and binds its port (not yet serving)."""
    _announce_models(engine.models)
    if engine.searcher.batcher is not None:
        # The searcher's batcher of the moment: a published reranker brings its own.
        metrics.watch_queue(
            lambda: engine.searcher.batcher.queued if engine.searcher.batcher else 0
        )
        metrics.watch_cost(
            lambda: engine.searcher.batcher.cost if engine.searcher.batcher else None
        )
    metrics.watch_documents(lambda: len(engine.collection.index))

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
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.host}:{settings.port}"
    credentials = _credentials(settings)
    port = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    loop_lag = LoopLag(on_sample=metrics.loop_lag.observe)
    gate = Gate(
        settings,
        on_limit=metrics.concurrency_limit.set,
        loop_lag=loop_lag,
        on_refused=lambda reason: metrics.rejections.labels(reason).inc(),
    )
    metrics.in_flight.set_function(lambda: gate.in_flight)
    metrics.concurrency_limit.set(gate.limit.limit)
    add_to_server(RetrievalService(engine, gate=gate, metrics=metrics), server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    running = Running(
        server=server,
        port=port,
        settings=settings,
        engine=engine,
        health=health_servicer,
        metrics=metrics,
        metrics_endpoint=None,
        gate=gate,
    )
    return running


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM/SIGINT, then drains and exits."""
    running = await create_server(settings)
    print(_addresses(settings, running), flush=True)
    # Everything loaded so far (modules, models, the collection) lives as long as the
    # process; frozen, it is skipped by the cyclic collector, whose full passes otherwise
    # walk it all and pause every call in flight.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP: look at the models root now (tandem models publish), not at the next poll.
    loop.add_signal_handler(signal.SIGHUP, running.engine.reload_models)
    await stop.wait()
    log.info("draining", extra={"grace_s": settings.drain_seconds})
    await running.stop()
