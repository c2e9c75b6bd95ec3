"""The ``tandem.v1.Retrieval`` servicer: protobuf in and out, validation, admission, metrics.

The servicer never touches a model or the store itself: it validates a request, then hands
it to ``server.search.Searcher`` (queries, reranks) or the collection (writes) on their
lanes. Every error is raised as an exception and turned into a status in one place,
``server.status``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from server.admission import INITIAL_LIMIT, AdaptiveLimit, LoopLag, ShedLog
from server.batcher import Overloaded
from server.collection import Collection
from server.metrics import Metrics
from server.search import DocumentRef, Hit, Mode, Result, Searcher
from server.settings import Settings
from server.status import BadArgument, Busy, describe
from server.store import NewDocument, StoreError, Upserted
from tandem import __version__
from tandem.artifact import Manifest
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

log = logging.getLogger(__name__)
# The stubs make these generic; grpc's runtime classes are not, hence the string.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[["RetrievalService", Request, Context], Awaitable[Response]]

# Calls that queue for the query and store threads; shedding them protects admitted latency.
QUEUED_METHODS = frozenset({"Search", "Rerank", "Embed"})
# Time kept back from a client's deadline to send the answer: a reply that lands after the
# deadline is work thrown away.
REPLY_MARGIN_S = 0.005
# A retrieve-only search has no budget; alone it takes 1-3 ms (RESULTS, serving), so one
# that takes longer than this has queued, and counts as late for the adaptive limit.
RETRIEVE_ONLY_TARGET_S = 0.010
# The latency target of the call being served (seconds; None: it has none), set by its
# handler once it knows the budget and read by ``serve_call`` to teach the adaptive limit.
# Each RPC runs in its own task, so each has its own value.
latency_target: ContextVar[float | None] = ContextVar("latency_target", default=None)


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes are not a valid message (invalid UTF-8 from a
    non-Python client, truncated fields): the call gets INVALID_ARGUMENT, not INTERNAL."""

    reason: str


def lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as error:
            return Undecodable(str(error) or "malformed message")

    return deserialize


def add_to_server(service: RetrievalService, server: grpc.aio.Server) -> None:
    """Registers the servicer like protoc's ``add_RetrievalServicer_to_server``, but with
    lenient request decoding."""
    descriptor = pb.DESCRIPTOR.services_by_name["Retrieval"]
    handlers = {}
    for method in descriptor.methods:
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        make = (
            grpc.stream_unary_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=lenient(request.FromString),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )


def _decoded(message: Any) -> Any:
    if isinstance(message, Undecodable):
        raise BadArgument(f"the request is not a valid protobuf message: {message.reason}")
    return message


@dataclass(frozen=True)
class Models:
    """What Info reports about the loaded models."""

    bi_encoder: Manifest
    reranker: Manifest | None
    reranker_is_stand_in: bool


def served(method: str) -> Callable[[Handler[Request, Response]], Handler[Request, Response]]:
    """Admission, status mapping, metrics and the access log around one RPC handler."""

    def wrap(handler: Handler[Request, Response]) -> Handler[Request, Response]:
        @functools.wraps(handler)
        async def call(self: RetrievalService, request: Request, context: Context) -> Response:
            return await self.serve_call(method, handler, request, context)

        return call

    return wrap


class RetrievalService(tandem_pb2_grpc.RetrievalServicer):
    def __init__(
        self,
        searcher: Searcher,
        *,
        settings: Settings,
        metrics: Metrics,
        models: Models,
        on_write: Callable[[], None] = lambda: None,
    ) -> None:
        self.searcher = searcher
        self.settings = settings
        self.metrics = metrics
        self.models = models
        self.on_write = on_write  # tells the checkpointer the index has unsaved changes
        # Only the event loop thread touches these.
        self.in_flight = 0
        self.queued_in_flight = 0  # calls of QUEUED_METHODS among them
        self.limit = AdaptiveLimit(
            limit=min(INITIAL_LIMIT, settings.max_in_flight), maximum=settings.max_in_flight
        )
        metrics.concurrency_limit.set(self.limit.limit)
        self.loop_lag = LoopLag(on_sample=metrics.loop_lag.observe)
        self.shed_log = ShedLog(
            lambda counts: log.warning("shedding load: calls refused", extra={"refused": counts})
        )

    @property
    def collection(self) -> Collection:
        # Always the searcher's: a replica swaps it for each published version. Work that
        # runs on the store lane must look it up there, not capture it earlier.
        return self.searcher.collection

    async def serve_call(
        self,
        method: str,
        handler: Handler[Request, Response],
        request: Request,
        context: Context,
    ) -> Response:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        if self.in_flight >= self.settings.max_in_flight:
            await self._refuse(
                method, "in_flight", started, context,
                f"{self.in_flight} calls are in flight, the limit is "
                f"{self.settings.max_in_flight}; retry with backoff",
            )  # fmt: skip
        queued = method in QUEUED_METHODS
        if queued and self.settings.adaptive_limit and not self.limit.admits(self.queued_in_flight):
            await self._refuse(
                method, "concurrency_limit", started, context,
                f"the server is overloaded: {self.queued_in_flight} calls are running, as "
                f"many as it now admits (the limit, {int(self.limit.limit)}, rises while "
                "calls finish on time and falls when they finish late); retry with backoff",
            )  # fmt: skip
        wait = self.searcher.lanes.expected_wait()
        if queued and wait * 1000 > self.settings.max_queue_wait_ms:
            await self._refuse(
                method, "queue_wait", started, context,
                f"the server is overloaded: a call now would wait ~{wait * 1000:.0f} ms before "
                f"any work (limit {self.settings.max_queue_wait_ms} ms); retry with backoff",
            )  # fmt: skip
        self.in_flight += 1
        self.queued_in_flight += queued
        running = self.queued_in_flight
        self.metrics.in_flight.inc()
        latency_target.set(None)
        try:
            return await handler(self, _decoded(request), context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:
            code, message = describe(error)
            if isinstance(error, Overloaded):
                self.metrics.rejections.labels("queue_full").inc()
            await context.abort(code, message)
            raise  # unreachable: abort raises
        finally:
            self.in_flight -= 1
            self.queued_in_flight -= queued
            self.metrics.in_flight.dec()
            self._learn(code, started, running)
            self._record(method, code, started)

    def _learn(self, code: grpc.StatusCode, started: float, running: int) -> None:
        """Feed the adaptive limit: did a call with a latency target meet it? ``running``:
        the latency-bound calls in flight when it was admitted, itself included."""
        target = latency_target.get()
        if target is None or code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return
        # The loop's lag stands for the waits the handler cannot see: before it ran, and
        # for the reply to be sent.
        seconds = time.perf_counter() - started + 2 * self.loop_lag.seconds
        late = code is grpc.StatusCode.RESOURCE_EXHAUSTED or seconds > target
        self.limit.observe(late=late, running=running)
        self.metrics.concurrency_limit.set(self.limit.limit)

    def _expect(self, budget_s: float | None) -> None:
        """This call should finish within ``budget_s`` plus the slack (None: no target)."""
        if budget_s is not None:
            latency_target.set(budget_s + self.settings.latency_slack_ms / 1000)

    def _expect_retrieval(self) -> None:
        latency_target.set(RETRIEVE_ONLY_TARGET_S)

    async def _refuse(
        self, method: str, reason: str, started: float, context: Context, message: str
    ) -> None:
        """Admission said no: count it, then answer RESOURCE_EXHAUSTED (abort raises)."""
        self.metrics.rejections.labels(reason).inc()
        self.shed_log.refused(reason, started)
        self._record(method, grpc.StatusCode.RESOURCE_EXHAUSTED, started, quiet=True)
        await context.abort(*describe(Busy(message)))

    def _record(
        self, method: str, code: grpc.StatusCode, started: float, *, quiet: bool = False
    ) -> None:
        seconds = time.perf_counter() - started
        self.metrics.requests.labels(method, code.name).inc()
        self.metrics.latency.labels(method).observe(seconds)
        level = logging.DEBUG if code is grpc.StatusCode.OK or quiet else logging.INFO
        log.log(
            level,
            "call",
            extra={"method": method, "code": code.name, "ms": round(seconds * 1000, 3)},
        )

    def _budget(self, requested_ms: int | None, context: Context) -> float | None:
        """The rerank budget in seconds (None: no deadline), shrunk to the client's deadline."""
        milliseconds = (
            self.settings.default_rerank_budget_ms if requested_ms is None else requested_ms
        )
        budget = milliseconds / 1000 if milliseconds > 0 else None
        remaining = context.time_remaining()
        if remaining is not None:
            cap = max(remaining - REPLY_MARGIN_S, 0.001)
            budget = cap if budget is None else min(budget, cap)
        return budget

    def _observe(self, result: Result, started: float) -> pb.Timings:
        self.metrics.observe_stages(result.timings_ms)
        if result.candidates:
            self.metrics.reranked_fraction.observe(result.reranked_count / result.candidates)
        return _timings(result.timings_ms, started)

    @served("Search")
    async def Search(  # noqa: N802 - gRPC method names
        self, request: pb.SearchRequest, context: Context
    ) -> pb.SearchResponse:
        started = time.perf_counter()
        recall_k = _bounded(
            "recall_k", request, self.settings.default_recall_k, self.settings.max_recall_k
        )
        top_n = _bounded("top_n", request, self.settings.default_top_n, self.settings.max_top_n)
        mode = self._mode(request.mode)
        budget_s = self._budget(_get(request, "rerank_budget_ms"), context)
        if mode is Mode.TWO_STAGE:
            self._expect(budget_s)
        else:
            self._expect_retrieval()
        result = await self.searcher.search(
            request.query,
            recall_k=recall_k,
            top_n=top_n,
            mode=mode,
            budget_s=budget_s,
            include_text=request.include_text,
            metadata_filter=_filter(request.metadata_filter),
            truncate=_get(request, "truncate") is not False,
        )
        return pb.SearchResponse(
            hits=[_hit(hit, include_text=request.include_text) for hit in result.hits],
            reranked_count=result.reranked_count,
            candidates=result.candidates,
            timings=self._observe(result, started),
            truncated=result.truncated,
        )

    def _mode(self, value: int) -> Mode:
        if value == pb.SEARCH_MODE_RETRIEVE_ONLY:
            return Mode.RETRIEVE_ONLY
        if value == pb.SEARCH_MODE_TWO_STAGE:
            return Mode.TWO_STAGE
        if value == pb.SEARCH_MODE_UNSPECIFIED:
            # A server started without a reranker still answers plain searches.
            return Mode.TWO_STAGE if self.searcher.batcher is not None else Mode.RETRIEVE_ONLY
        raise BadArgument(f"mode {value} is not a SearchMode this server knows")

    @served("Rerank")
    async def Rerank(  # noqa: N802
        self, request: pb.RerankRequest, context: Context
    ) -> pb.RerankResponse:
        started = time.perf_counter()
        count = len(request.documents)
        if count == 0:
            raise BadArgument("documents is empty: send at least one text or stored id")
        if count > self.settings.max_rerank_documents:
            raise BadArgument(
                f"{count} documents sent; this server reranks at most "
                f"{self.settings.max_rerank_documents} per call (max_rerank_documents): "
                "split the call, or raise the limit"
            )
        refs = []
        for position, document in enumerate(request.documents):
            source = document.WhichOneof("source")
            if source is None:
                raise BadArgument(f"documents[{position}] has neither text nor id")
            refs.append(
                DocumentRef(text=document.text) if source == "text" else DocumentRef(id=document.id)
            )
        top_n = _get(request, "top_n")
        if top_n is not None and not 1 <= top_n <= self.settings.max_top_n:
            raise BadArgument(
                f"top_n must be between 1 and {self.settings.max_top_n} (got {top_n})"
            )
        budget_s = self._budget(_get(request, "rerank_budget_ms"), context)
        self._expect(budget_s)
        result = await self.searcher.rerank(
            request.query,
            refs,
            top_n=None if top_n is None else min(top_n, count),
            budget_s=budget_s,
            include_text=request.return_documents,
            truncate=_get(request, "truncate") is not False,
        )
        results = []
        for hit in result.hits:
            item = pb.RerankResult(
                index=hit.stage1_rank,
                relevance_score=hit.rerank_score if hit.rerank_score is not None else 0.0,
                reranked=hit.rerank_score is not None,
                truncated=hit.truncated,
            )
            if request.return_documents and hit.text is not None:
                item.text = hit.text
            if refs[hit.stage1_rank].id is not None:
                item.id = hit.id
            results.append(item)
        return pb.RerankResponse(
            results=results,
            reranked_count=result.reranked_count,
            timings=self._observe(result, started),
            truncated=result.truncated,
        )

    @served("Embed")
    async def Embed(  # noqa: N802
        self, request: pb.EmbedRequest, context: Context
    ) -> pb.EmbedResponse:
        started = time.perf_counter()
        texts = list(request.texts)
        if not texts:
            raise BadArgument("texts is empty: send at least one")
        if len(texts) > self.settings.max_embed_texts:
            raise BadArgument(
                f"{len(texts)} texts sent; at most {self.settings.max_embed_texts} per call "
                "(max_embed_texts)"
            )
        embedder = self.searcher.embedder
        vectors, truncated = await self.searcher.lanes.run("query", embedder.encode, texts)
        embed_ms = _ms_since(started)
        if _get(request, "truncate") is False and truncated.any():
            raise BadArgument(
                f"texts[{int(np.flatnonzero(truncated)[0])}] is longer than the bi-encoder's "
                f"{embedder.manifest.max_length} tokens; shorten it, or allow truncate"
            )
        self.metrics.observe_stages({"embed": embed_ms})
        return pb.EmbedResponse(
            embeddings=[
                pb.Embedding(values=vector.tolist(), truncated=bool(cut))
                for vector, cut in zip(vectors, truncated, strict=True)
            ],
            dimension=embedder.dimension,
            timings=_timings({"embed": embed_ms}, started),
            truncated=bool(truncated.any()),
        )

    @served("Upsert")
    async def Upsert(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.UpsertRequest], context: Context
    ) -> pb.UpsertResponse:
        started = time.perf_counter()
        self.collection.store.require_writable()  # before any document is embedded
        totals = {"received": 0, "inserted": 0, "replaced": 0, "truncated": 0}
        stages = {"embed": 0.0, "search": 0.0}
        generation = await self.searcher.lanes.run(
            "store", lambda: self.collection.store.generation
        )
        async for message in request_iterator:
            try:
                written, truncated, generation = await self._upsert_message(
                    _decoded(message), stages
                )
            except (BadArgument, StoreError) as error:
                if totals["received"]:
                    raise type(error)(
                        f"{error} (the {totals['received']} documents of earlier messages "
                        "in this stream are committed)"
                    ) from error
                raise
            totals["received"] += len(message.documents)
            totals["inserted"] += len(written.keys) - len(written.replaced)
            totals["replaced"] += len(written.replaced)
            totals["truncated"] += truncated
        self.metrics.observe_stages(stages)
        return pb.UpsertResponse(generation=generation, timings=_timings(stages, started), **totals)

    async def _upsert_message(
        self, message: pb.UpsertRequest, stages: dict[str, float]
    ) -> tuple[Upserted, int, int]:
        """Commits one message; returns what was written, how many texts were cut, and the
        store generation right after the commit."""
        documents = self._documents(message.documents)
        started = time.perf_counter()
        prepared = await self.searcher.lanes.run("ingest", self.collection.prepare, documents)
        stages["embed"] += _ms_since(started)
        truncated = int(prepared.truncated.sum())
        if truncated and _get(message, "truncate") is False:
            first = int(np.flatnonzero(prepared.truncated)[0])
            raise BadArgument(
                f"document {documents[first].id!r} is longer than the bi-encoder's "
                f"{self.searcher.embedder.manifest.max_length} tokens; shorten it, or allow "
                "truncate (nothing in this message was written)"
            )
        started = time.perf_counter()

        def commit() -> tuple[Upserted, int]:
            return self.collection.commit(prepared), self.collection.store.generation

        written, generation = await self.searcher.lanes.run("store", commit)
        stages["search"] += _ms_since(started)
        self.on_write()
        return written, truncated, generation

    def _documents(self, documents: Sequence[pb.Document]) -> list[NewDocument]:
        if len(documents) > self.settings.max_upsert_documents:
            raise BadArgument(
                f"{len(documents)} documents in one message; at most "
                f"{self.settings.max_upsert_documents} (max_upsert_documents): send more messages"
            )
        checked = []
        seen: set[str] = set()
        for document in documents:
            _check_id(document.id, self.settings.max_id_bytes)
            if document.id in seen:
                raise BadArgument(f"id {document.id!r} appears twice in one message; send it once")
            seen.add(document.id)
            checked.append(
                NewDocument(
                    id=document.id, text=document.text, metadata=_struct_to_dict(document.metadata)
                )
            )
        return checked

    @served("Delete")
    async def Delete(  # noqa: N802
        self, request: pb.DeleteRequest, context: Context
    ) -> pb.DeleteResponse:
        started = time.perf_counter()
        self.collection.store.require_writable()
        ids = _unique_ids(request.ids, self.settings.max_id_bytes)

        def delete() -> tuple[int, list[str]]:
            present = self.collection.get(ids)
            self.collection.delete([item for item in ids if item in present])
            return len(present), [item for item in ids if item not in present]

        deleted, not_found = await self.searcher.lanes.run("store", delete)
        if deleted:
            self.on_write()
        stages = {"search": _ms_since(started)}
        return pb.DeleteResponse(
            deleted=deleted, not_found=not_found, timings=_timings(stages, started)
        )

    @served("Get")
    async def Get(  # noqa: N802
        self, request: pb.GetRequest, context: Context
    ) -> pb.GetResponse:
        started = time.perf_counter()
        ids = _unique_ids(request.ids, self.settings.max_id_bytes)
        found = await self.searcher.lanes.run("store", lambda: self.collection.get(ids))
        documents = []
        for item in ids:
            if item in found:
                document = pb.Document(id=item, text=found[item].text)
                document.metadata.update(found[item].metadata)
                documents.append(document)
        return pb.GetResponse(
            documents=documents,
            not_found=[item for item in ids if item not in found],
            timings=_timings({"search": _ms_since(started)}, started),
        )

    @served("Info")
    async def Info(  # noqa: N802
        self, request: pb.InfoRequest, context: Context
    ) -> pb.InfoResponse:
        settings = self.settings
        embedder = self.searcher.embedder
        pairs = self.searcher.pairs
        collection, index_size, generation = await self.searcher.lanes.run(
            "store",
            lambda: (self.collection, len(self.collection.index), self.collection.store.generation),
        )
        index = collection.index
        response = pb.InfoResponse(
            version=__version__,
            bi_encoder=_model_info(self.models.bi_encoder),
            reranker_is_stand_in=self.models.reranker_is_stand_in,
            limits=pb.Limits(
                max_recall_k=settings.max_recall_k,
                max_top_n=settings.max_top_n,
                max_rerank_documents=settings.max_rerank_documents,
                max_embed_texts=settings.max_embed_texts,
                max_message_bytes=settings.max_message_bytes,
                max_in_flight=settings.max_in_flight,
                default_rerank_budget_ms=settings.default_rerank_budget_ms,
                default_recall_k=settings.default_recall_k,
                default_top_n=settings.default_top_n,
                max_upsert_documents=settings.max_upsert_documents,
                max_id_bytes=settings.max_id_bytes,
                query_max_tokens=embedder.manifest.max_length,
                pair_max_tokens=pairs.template.max_length if pairs is not None else 0,
            ),
            index_size=index_size,
            index_dtype=index.settings.dtype,
            store_generation=generation,
            collection_version=collection.version or "",
            read_only=collection.read_only,
            dimension=embedder.dimension,
        )
        if self.models.reranker is not None:
            response.reranker.CopyFrom(_model_info(self.models.reranker))
        return response


def _get(message: Any, name: str) -> Any:
    """The field's value where the client set it (proto3 ``optional``), else None."""
    return getattr(message, name) if message.HasField(name) else None


def _bounded(name: str, message: Any, default: int, limit: int) -> int:
    value = _get(message, name)
    if value is None:
        return default
    if not 1 <= value <= limit:
        raise BadArgument(f"{name} must be between 1 and {limit} (got {value})")
    return int(value)


def _check_id(item: str, max_bytes: int) -> None:
    if not item:
        raise BadArgument("a document id is empty; every document needs one")
    if len(item.encode("utf-8", "surrogatepass")) > max_bytes:
        raise BadArgument(f"id {item[:40]!r}… is longer than {max_bytes} bytes (max_id_bytes)")


def _unique_ids(ids: Sequence[str], max_bytes: int) -> list[str]:
    for item in ids:
        _check_id(item, max_bytes)
    return list(dict.fromkeys(ids))


def _filter(entries: Mapping[str, struct_pb2.Value]) -> dict[str, Any] | None:
    if not entries:
        return None
    values = {}
    for key, value in entries.items():
        try:
            values[key] = json_format.MessageToDict(value)
        except ValueError as error:  # NaN or Infinity: JSON, and so metadata, has neither
            raise BadArgument(f"metadata_filter[{key!r}]: {error}; send a finite number") from error
    return values


def _struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return dict(json_format.MessageToDict(struct))


def _hit(hit: Hit, *, include_text: bool) -> pb.Hit:
    reranked = hit.rerank_score is not None
    stage1 = hit.stage1_score if hit.stage1_score is not None else 0.0
    message = pb.Hit(
        id=hit.id,
        score=hit.rerank_score if hit.rerank_score is not None else stage1,
        stage1_score=stage1,
        stage1_rank=hit.stage1_rank,
        reranked=reranked,
        truncated=hit.truncated,
    )
    if include_text and hit.text is not None:
        message.text = hit.text
    if hit.metadata:
        message.metadata.update(hit.metadata)
    return message


def _timings(stages_ms: Mapping[str, float], started: float) -> pb.Timings:
    return pb.Timings(
        embed_ms=stages_ms.get("embed", 0.0),
        search_ms=stages_ms.get("search", 0.0),
        tokenize_ms=stages_ms.get("tokenize", 0.0),
        queue_ms=stages_ms.get("queue", 0.0),
        rerank_ms=stages_ms.get("rerank", 0.0),
        total_ms=_ms_since(started),
    )


def _model_info(manifest: Manifest) -> pb.ModelInfo:
    return pb.ModelInfo(
        kind=manifest.kind,
        source=manifest.source,
        precision=manifest.precision,
        preset=manifest.preset or "",
        max_length=manifest.max_length,
        verified=manifest.verified,
        manifest_json=manifest.to_json(),
    )


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
