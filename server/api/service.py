"""The ``tandem.v1.Retrieval`` servicer: a thin gRPC skin over the engine.

Each RPC does four things: admit the call (``tandem.server.admission.Gate``), convert its
message into an engine request, await one engine method, and convert the result back. Errors
become statuses in one place (``tandem.server.api.status``), and every call is counted in the
metrics and the access log. Nothing here touches a model, the store or the index.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from tandem.artifact import Manifest, Role
from tandem.matryoshka import advertised
from tandem.runtimes import RuntimeFit
from tandem.server.admission import Gate
from tandem.server.api.status import rich_status
from tandem.server.engine.engine import Call, Engine, EngineInfo
from tandem.server.engine.errors import InvalidArgument, Retryable
from tandem.server.engine.fusion import FirstStage
from tandem.server.engine.listing import ListRequest
from tandem.server.engine.requests import (
    EmbedRequest,
    FeedbackItem,
    RerankRequest,
    SearchRequest,
    UpsertBatch,
    bulk_embed,
)
from tandem.server.engine.search import DocumentRef, Hit, Mode, Result
from tandem.server.engine.store import NewDocument
from tandem.server.metrics import Metrics
from tandem.server.replication.models import worse_than_stage1
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

log = logging.getLogger(__name__)
# The stubs make these generic; grpc's runtime classes are not, hence the string.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Response = TypeVar("Response")

# Calls that queue for the threads a search waits on; shedding them protects admitted
# latency. An Embed of many texts is index-time work instead (requests.bulk_embed).
QUEUED_METHODS = frozenset({"Search", "Rerank", "Embed"})
MODES = {
    pb.SEARCH_MODE_UNSPECIFIED: None,
    pb.SEARCH_MODE_TWO_STAGE: Mode.TWO_STAGE,
    pb.SEARCH_MODE_RETRIEVE_ONLY: Mode.RETRIEVE_ONLY,
}
FIRST_STAGES = {
    pb.FIRST_STAGE_UNSPECIFIED: None,
    pb.FIRST_STAGE_DENSE: FirstStage.DENSE,
    pb.FIRST_STAGE_LEXICAL: FirstStage.LEXICAL,
    pb.FIRST_STAGE_HYBRID: FirstStage.HYBRID,
}
ROLES: dict[int, Role | None] = {
    pb.INPUT_TYPE_UNSPECIFIED: None,
    pb.INPUT_TYPE_QUERY: "query",
    pb.INPUT_TYPE_DOCUMENT: "document",
}
FIRST_STAGE_ENUM = {stage: number for number, stage in FIRST_STAGES.items() if stage is not None}


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
        raise InvalidArgument(f"the request is not a valid protobuf message: {message.reason}")
    return message


class RetrievalService(tandem_pb2_grpc.RetrievalServicer):
    def __init__(self, engine: Engine, *, gate: Gate, metrics: Metrics) -> None:
        self.engine = engine
        self.gate = gate
        self.metrics = metrics

    async def _serve(
        self,
        method: str,
        context: Context,
        run: Callable[[Call], Awaitable[Response]],
        *,
        queued: bool | None = None,
    ) -> Response:
        """``queued``: whether admission treats the call as one a caller waits on (by
        default, by its method)."""
        call = Call(client_remaining_s=context.time_remaining())
        code = grpc.StatusCode.OK
        quiet = True
        try:
            return await self.gate.run(
                call,
                run,
                queued=method in QUEUED_METHODS if queued is None else queued,
                expected_wait_s=self.engine.expected_wait(),
            )
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:
            status = rich_status(error)
            code = status.code
            quiet = isinstance(error, Retryable)  # refusals are counted, not logged one by one
            await _abort(context, status)
            raise  # unreachable: abort raises
        finally:
            self._record(method, code, call, quiet=quiet)

    def _record(self, method: str, code: grpc.StatusCode, call: Call, *, quiet: bool) -> None:
        seconds = time.perf_counter() - call.arrived
        self.metrics.requests.labels(method, code.name).inc()
        self.metrics.latency.labels(method).observe(seconds)
        level = logging.DEBUG if quiet else logging.INFO
        log.log(
            level,
            "call",
            extra={"method": method, "code": code.name, "ms": round(seconds * 1000, 3)},
        )

    def _observe(self, result: Result, call: Call) -> pb.Timings:
        self.metrics.observe_stages(result.timings_ms)
        if result.candidates:
            self.metrics.reranked_fraction.observe(result.reranked_count / result.candidates)
        return _timings(result.timings_ms, call)

    async def Search(  # noqa: N802 - gRPC method names
        self, request: pb.SearchRequest, context: Context
    ) -> pb.SearchResponse:
        async def run(call: Call) -> pb.SearchResponse:
            message = _decoded(request)
            if message.mode not in MODES:
                raise InvalidArgument(f"mode {message.mode} is not a SearchMode this server knows")
            if message.first_stage not in FIRST_STAGES:
                raise InvalidArgument(
                    f"first_stage {message.first_stage} is not a FirstStage this server knows"
                )
            result = await self.engine.search(
                SearchRequest(
                    query=message.query,
                    recall_k=_get(message, "recall_k"),
                    top_n=_get(message, "top_n"),
                    mode=MODES[message.mode],
                    rerank_budget_ms=_get(message, "rerank_budget_ms"),
                    include_text=message.include_text,
                    metadata_filter=_filter(message.metadata_filter),
                    truncate=_get(message, "truncate") is not False,
                    max_tokens_per_doc=_get(message, "max_tokens_per_doc"),
                    min_rerank=_get(message, "min_rerank"),
                    max_chunks_per_doc=_get(message, "max_chunks_per_doc"),
                    first_stage=FIRST_STAGES[message.first_stage],
                    dense_weight=_get(message, "dense_weight"),
                    lexical_weight=_get(message, "lexical_weight"),
                ),
                call,
            )
            reply = pb.SearchResponse(
                first_stage=FIRST_STAGE_ENUM[result.first_stage or FirstStage.DENSE],
                dense_candidates=result.dense_candidates,
                lexical_candidates=result.lexical_candidates,
                hits=[_hit(hit, include_text=message.include_text) for hit in result.hits],
                reranked_count=result.reranked_count,
                candidates=result.candidates,
                timings=self._observe(result, call),
                truncated=result.truncated,
                reranker_id=result.reranker_id,
            )
            if result.filter_matched is not None:
                reply.filter_matched = result.filter_matched
            return reply

        return await self._serve("Search", context, run)

    async def Rerank(  # noqa: N802
        self, request: pb.RerankRequest, context: Context
    ) -> pb.RerankResponse:
        async def run(call: Call) -> pb.RerankResponse:
            message = _decoded(request)
            refs = [_document_ref(document) for document in message.documents]
            result = await self.engine.rerank(
                RerankRequest(
                    query=message.query,
                    documents=refs,
                    top_n=_get(message, "top_n"),
                    rerank_budget_ms=_get(message, "rerank_budget_ms"),
                    return_documents=message.return_documents,
                    truncate=_get(message, "truncate") is not False,
                    max_tokens_per_doc=_get(message, "max_tokens_per_doc"),
                    min_rerank=_get(message, "min_rerank"),
                    max_chunks_per_doc=_get(message, "max_chunks_per_doc"),
                ),
                call,
            )
            results = []
            for hit in result.hits:
                item = pb.RerankResult(
                    index=hit.stage1_rank,
                    relevance_score=hit.score,
                    reranked=hit.reranked,
                    truncated=hit.truncated,
                )
                if message.return_documents and hit.text is not None:
                    item.text = hit.text
                if refs[hit.stage1_rank].id is not None:
                    item.id = hit.id
                if hit.probability is not None:
                    item.probability = hit.probability
                if hit.passage is not None:
                    item.passage.CopyFrom(pb.Passage(**hit.passage.fields()))
                results.append(item)
            return pb.RerankResponse(
                results=results,
                reranked_count=result.reranked_count,
                timings=self._observe(result, call),
                truncated=result.truncated,
                reranker_id=result.reranker_id,
            )

        return await self._serve("Rerank", context, run)

    async def Embed(  # noqa: N802
        self, request: pb.EmbedRequest, context: Context
    ) -> pb.EmbedResponse:
        async def run(call: Call) -> pb.EmbedResponse:
            message = _decoded(request)
            embedded = await self.engine.embed(
                EmbedRequest(
                    list(message.texts),
                    truncate=_get(message, "truncate") is not False,
                    prompt_name=_get(message, "prompt_name"),
                    role=_role(message.input_type),
                    dimensions=_get(message, "dimensions"),
                ),
                call,
            )
            self.metrics.observe_stages(embedded.timings_ms)
            return pb.EmbedResponse(
                embeddings=[
                    pb.Embedding(values=vector.tolist(), truncated=bool(cut))
                    for vector, cut in zip(embedded.vectors, embedded.truncated, strict=True)
                ],
                dimension=embedded.dimension,
                timings=_timings(embedded.timings_ms, call),
                truncated=bool(embedded.truncated.any()),
            )

        texts = 0 if isinstance(request, Undecodable) else len(request.texts)
        queued = not bulk_embed(texts, self.engine.settings)
        return await self._serve("Embed", context, run, queued=queued)

    async def Upsert(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.UpsertRequest], context: Context
    ) -> pb.UpsertResponse:
        async def batches() -> AsyncIterator[UpsertBatch]:
            async for message in request_iterator:
                message = _decoded(message)
                yield UpsertBatch(
                    documents=[_new_document(document) for document in message.documents],
                    truncate=_get(message, "truncate") is not False,
                )

        async def run(call: Call) -> pb.UpsertResponse:
            totals = await self.engine.upsert(batches(), call)
            self.metrics.observe_stages(totals.timings_ms)
            return pb.UpsertResponse(
                received=totals.received,
                inserted=totals.inserted,
                replaced=totals.replaced,
                truncated=totals.truncated,
                generation=totals.generation,
                timings=_timings(totals.timings_ms, call),
            )

        return await self._serve("Upsert", context, run)

    async def Delete(  # noqa: N802
        self, request: pb.DeleteRequest, context: Context
    ) -> pb.DeleteResponse:
        async def run(call: Call) -> pb.DeleteResponse:
            message = _decoded(request)
            deleted = await self.engine.delete(
                list(message.ids), call, metadata_filter=_filter(message.metadata_filter)
            )
            return pb.DeleteResponse(
                deleted=deleted.deleted,
                not_found=deleted.not_found,
                timings=_timings(deleted.timings_ms, call),
            )

        return await self._serve("Delete", context, run)

    async def Get(  # noqa: N802
        self, request: pb.GetRequest, context: Context
    ) -> pb.GetResponse:
        async def run(call: Call) -> pb.GetResponse:
            message = _decoded(request)
            listing = ListRequest(
                metadata_filter=_filter(message.metadata_filter),
                id_prefix=message.id_prefix,
                limit=message.limit or None,  # proto3: 0 is unset
                page_token=message.page_token,
            )
            fetched = await self.engine.get(list(message.ids), call, listing)
            documents = []
            for stored in fetched.documents:
                document = pb.Document(id=stored.id, text=stored.text)
                document.metadata.update(stored.metadata)
                documents.append(document)
            return pb.GetResponse(
                documents=documents,
                not_found=fetched.not_found,
                timings=_timings(fetched.timings_ms, call),
                next_page_token=fetched.next_page_token,
            )

        return await self._serve("Get", context, run)

    async def Feedback(  # noqa: N802
        self, request: pb.FeedbackRequest, context: Context
    ) -> pb.FeedbackResponse:
        async def run(call: Call) -> pb.FeedbackResponse:
            items = [
                FeedbackItem(
                    query=item.query,
                    document_id=item.document_id,
                    label=_get(item, "label"),
                    click=item.click,
                )
                for item in _decoded(request).items
            ]
            recorded, total = await self.engine.feedback(items, call)
            return pb.FeedbackResponse(recorded=recorded, total=total)

        return await self._serve("Feedback", context, run)

    async def Info(  # noqa: N802
        self, request: pb.InfoRequest, context: Context
    ) -> pb.InfoResponse:
        async def run(call: Call) -> pb.InfoResponse:
            return _info(await self.engine.info())

        return await self._serve("Info", context, run)


async def _abort(context: Context, status: grpc.Status) -> None:
    """Ends the call with ``status``, its details (RetryInfo) included; raises."""
    await context.abort(status.code, status.details, status.trailing_metadata)


def _role(input_type: int) -> Role | None:
    if input_type not in ROLES:
        raise InvalidArgument(f"input_type {input_type} is not an InputType this server knows")
    return ROLES[input_type]


def _get(message: Any, name: str) -> Any:
    """The field's value where the client set it (proto3 ``optional``), else None."""
    return getattr(message, name) if message.HasField(name) else None


def _document_ref(document: pb.RerankDocument) -> DocumentRef:
    source = document.WhichOneof("source")
    if source == "text":
        return DocumentRef(text=document.text)
    if source == "id":
        return DocumentRef(id=document.id)
    return DocumentRef()  # neither: the engine's check names the document


def _new_document(document: pb.Document) -> NewDocument:
    try:
        metadata = dict(json_format.MessageToDict(document.metadata))
    except ValueError as error:  # NaN or Infinity: JSON, and so metadata, has neither
        raise InvalidArgument(
            f"the metadata of document {document.id!r} holds NaN or Infinity, which JSON "
            "cannot: send a finite number"
        ) from error
    return NewDocument(id=document.id, text=document.text, metadata=metadata)


def _filter(entries: Mapping[str, struct_pb2.Value]) -> dict[str, Any] | None:
    if not entries:
        return None
    values = {}
    for key, value in entries.items():
        try:
            values[key] = json_format.MessageToDict(value)
        except ValueError as error:  # NaN or Infinity: JSON, and so metadata, has neither
            raise InvalidArgument(
                f"metadata_filter[{key!r}]: {error}; send a finite number"
            ) from error
    return values


def _hit(hit: Hit, *, include_text: bool) -> pb.Hit:
    message = pb.Hit(
        id=hit.id,
        score=hit.score,
        stage1_score=hit.stage1_score if hit.stage1_score is not None else 0.0,
        stage1_rank=hit.stage1_rank,
        reranked=hit.reranked,
        truncated=hit.truncated,
    )
    if include_text and hit.text is not None:
        message.text = hit.text
    if hit.probability is not None:
        message.probability = hit.probability
    if hit.metadata:
        message.metadata.update(hit.metadata)
    if hit.dense_rank is not None:
        message.dense_rank = hit.dense_rank
    if hit.lexical_rank is not None:
        message.lexical_rank = hit.lexical_rank
    if hit.passage is not None:
        message.passage.CopyFrom(pb.Passage(**hit.passage.fields()))
    return message


def _timings(stages_ms: Mapping[str, float], call: Call) -> pb.Timings:
    return pb.Timings(**call.timings(stages_ms))


def _info(info: EngineInfo) -> pb.InfoResponse:
    response = pb.InfoResponse(
        version=info.version,
        bi_encoder=_model_info(info.models.bi_encoder, info.models.bi_encoder_fit),
        reranker_is_stand_in=info.models.reranker_is_stand_in,
        limits=pb.Limits(**info.limits),
        index_size=info.index_size,
        index_dtype=info.index_dtype,
        store_generation=info.generation,
        collection_version=info.collection_version or "",
        read_only=info.read_only,
        dimension=info.dimension,
        score_activation=info.score_activation,
        default_first_stage=FIRST_STAGE_ENUM[FirstStage(info.settings.first_stage)],
        lexical_index_size=info.lexical_index_size,
        rrf_k=info.settings.rrf_k,
        default_dense_weight=info.settings.dense_weight,
        default_lexical_weight=info.settings.lexical_weight,
        reranker_id=info.reranker_id,
        reranker_since=info.models.reranker_since,
        reranker_version=info.models.reranker_version,
        feedback_count=info.feedback_count,
        index_vectors=info.index_vectors,
    )
    if info.models.reranker is not None:
        response.reranker.CopyFrom(_model_info(info.models.reranker, info.models.reranker_fit))
    return response


def _model_info(manifest: Manifest, fit: RuntimeFit | None) -> pb.ModelInfo:
    info = pb.ModelInfo(
        kind=manifest.kind,
        source=manifest.source,
        precision=manifest.precision,
        preset=manifest.preset or "",
        max_length=manifest.max_length,
        verified=manifest.verified,
        manifest_json=manifest.to_json(),
        prompts=manifest.prompts.texts,
        worse_than_stage1=worse_than_stage1(manifest),
    )
    for name, value in manifest.prompts.chosen_names().items():
        setattr(info, name, value)
    sizes, info.matryoshka_any_size = advertised(manifest.matryoshka)
    info.matryoshka_dimensions.extend(sizes)
    if fit is not None:
        info.runtime, info.inference_precision = fit.backend, fit.precision
        info.runtime_choice = fit.reason
    if manifest.parity is not None:
        info.parity.update(manifest.parity.metrics)
        info.parity_thresholds.update(manifest.parity.thresholds)
    return info
