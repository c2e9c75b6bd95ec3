"""Tandem's own JSON API, field for field the gRPC one: search, upsert, get, delete, info,
and health."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.responses import Response

from tandem.artifact import Manifest
from tandem.matryoshka import advertised
from tandem.runtimes import RuntimeFit
from tandem.server.engine.engine import Call, Engine, EngineInfo
from tandem.server.engine.fusion import FirstStage
from tandem.server.engine.listing import ListRequest
from tandem.server.engine.requests import FeedbackItem, SearchRequest, UpsertBatch
from tandem.server.engine.search import Hit, Mode, Passage
from tandem.server.engine.store import NewDocument
from tandem.server.http import schemas as s
from tandem.server.http.bodies import UnicodeRoute
from tandem.server.http.calls import Calls
from tandem.server.http.errors import Dialect
from tandem.server.replication.models import worse_than_stage1

MODES = {None: None, "two_stage": Mode.TWO_STAGE, "retrieve_only": Mode.RETRIEVE_ONLY}


def timings(stages_ms: Mapping[str, float], call: Call) -> s.TimingsBody:
    return s.TimingsBody(**call.timings(stages_ms))


def hit_body(hit: Hit) -> s.HitBody:
    return s.HitBody(
        id=hit.id,
        score=hit.score,
        probability=hit.probability,
        stage1_score=hit.stage1_score,
        stage1_rank=hit.stage1_rank,
        reranked=hit.reranked,
        truncated=hit.truncated,
        text=hit.text,
        metadata=hit.metadata,
        dense_rank=hit.dense_rank,
        lexical_rank=hit.lexical_rank,
        passage=passage_body(hit.passage),
    )


def passage_body(passage: Passage | None) -> s.PassageBody | None:
    if passage is None:
        return None
    return s.PassageBody(**passage.fields())


def router(engine: Engine, calls: Calls, *, serving: Callable[[], bool]) -> APIRouter:
    routes = APIRouter(route_class=UnicodeRoute)

    @routes.post("/v1/search", response_model=s.SearchReply, tags=["native"], summary="Search")
    async def search(request: s.SearchBody) -> Response:
        async def work(call: Call) -> s.SearchReply:
            result = await engine.search(
                SearchRequest(
                    query=request.query,
                    recall_k=request.recall_k,
                    top_n=request.top_n,
                    mode=MODES[request.mode],
                    rerank_budget_ms=request.rerank_budget_ms,
                    include_text=request.include_text,
                    metadata_filter=request.metadata_filter,
                    truncate=request.truncate,
                    max_tokens_per_doc=request.max_tokens_per_doc,
                    min_rerank=request.min_rerank,
                    max_chunks_per_doc=request.max_chunks_per_doc,
                    first_stage=FirstStage(request.first_stage) if request.first_stage else None,
                    dense_weight=request.dense_weight,
                    lexical_weight=request.lexical_weight,
                ),
                call,
            )
            return s.SearchReply(
                first_stage=(result.first_stage or FirstStage.DENSE).value,
                dense_candidates=result.dense_candidates,
                lexical_candidates=result.lexical_candidates,
                hits=[hit_body(hit) for hit in result.hits],
                reranked_count=result.reranked_count,
                candidates=result.candidates,
                truncated=result.truncated,
                filter_matched=result.filter_matched,
                timings=timings(result.timings_ms, call),
                reranker_id=result.reranker_id,
            )

        return await calls.run(Dialect.NATIVE, work, queued=True)

    @routes.post(
        "/v1/upsert",
        response_model=s.UpsertReply,
        tags=["native"],
        summary="Upsert documents (one batch, committed whole or not at all)",
    )
    async def upsert(request: s.UpsertBody) -> Response:
        async def batches() -> AsyncIterator[UpsertBatch]:
            yield UpsertBatch(
                documents=[
                    NewDocument(id=d.id, text=d.text, metadata=d.metadata)
                    for d in request.documents
                ],
                truncate=request.truncate,
            )

        async def work(call: Call) -> s.UpsertReply:
            totals = await engine.upsert(batches(), call)
            return s.UpsertReply(
                received=totals.received,
                inserted=totals.inserted,
                replaced=totals.replaced,
                truncated=totals.truncated,
                generation=totals.generation,
                timings=timings(totals.timings_ms, call),
            )

        return await calls.run(Dialect.NATIVE, work, queued=False)

    @routes.post(
        "/v1/get",
        response_model=s.GetReply,
        tags=["native"],
        summary="Get by id, or list documents a page at a time",
    )
    async def get(request: s.GetBody) -> Response:
        async def work(call: Call) -> s.GetReply:
            listing = ListRequest(
                metadata_filter=request.metadata_filter,
                id_prefix=request.id_prefix,
                limit=request.limit,
                page_token=request.page_token,
            )
            fetched = await engine.get(request.ids, call, listing)
            return s.GetReply(
                documents=[
                    s.DocumentBody(id=d.id, text=d.text, metadata=d.metadata)
                    for d in fetched.documents
                ],
                not_found=fetched.not_found,
                timings=timings(fetched.timings_ms, call),
                next_page_token=fetched.next_page_token,
            )

        return await calls.run(Dialect.NATIVE, work, queued=False)

    @routes.post(
        "/v1/delete",
        response_model=s.DeleteReply,
        tags=["native"],
        summary="Delete by id, or by metadata filter",
    )
    async def delete(request: s.DeleteBody) -> Response:
        async def work(call: Call) -> s.DeleteReply:
            deleted = await engine.delete(
                request.ids, call, metadata_filter=request.metadata_filter
            )
            return s.DeleteReply(
                deleted=deleted.deleted,
                not_found=deleted.not_found,
                timings=timings(deleted.timings_ms, call),
            )

        return await calls.run(Dialect.NATIVE, work, queued=False)

    @routes.post(
        "/v1/feedback",
        response_model=s.FeedbackReply,
        tags=["native"],
        summary="Record relevance labels or clicks, as training data for tandem train",
    )
    async def feedback(request: s.FeedbackBody) -> Response:
        async def work(call: Call) -> s.FeedbackReply:
            items = [
                FeedbackItem(item.query, item.document_id, item.label, item.click)
                for item in request.items
            ]
            recorded, total = await engine.feedback(items, call)
            return s.FeedbackReply(recorded=recorded, total=total)

        return await calls.run(Dialect.NATIVE, work, queued=False)

    @routes.get("/info", tags=["native"], summary="Models, limits and the collection")
    async def info() -> Response:
        async def work(call: Call) -> dict[str, Any]:
            return info_body(await engine.info())

        return await calls.run(Dialect.NATIVE, work, queued=False)

    @routes.get("/health", tags=["native"], summary="200 while serving, 503 otherwise")
    async def health() -> Response:
        up = serving()
        return JSONResponse(
            {"status": "SERVING" if up else "NOT_SERVING"}, status_code=200 if up else 503
        )

    return routes


def info_body(info: EngineInfo) -> dict[str, Any]:
    return {
        "version": info.version,
        "bi_encoder": _model(info.models.bi_encoder, info.models.bi_encoder_fit),
        "reranker": (
            _model(info.models.reranker, info.models.reranker_fit) if info.models.reranker else None
        ),
        "reranker_is_stand_in": info.models.reranker_is_stand_in,
        "score_activation": info.score_activation,
        "limits": info.limits,
        "index_size": info.index_size,
        "index_dtype": info.index_dtype,
        "store_generation": info.generation,
        "collection_version": info.collection_version or "",
        "read_only": info.read_only,
        "dimension": info.dimension,
        "default_first_stage": info.settings.first_stage,
        "lexical_index_size": info.lexical_index_size,
        "rrf_k": info.settings.rrf_k,
        "default_dense_weight": info.settings.dense_weight,
        "default_lexical_weight": info.settings.lexical_weight,
        "reranker_id": info.reranker_id,
        "reranker_since": info.models.reranker_since,
        "reranker_version": info.models.reranker_version,
        "feedback_count": info.feedback_count,
        "index_vectors": info.index_vectors,
    }


def _model(manifest: Manifest, fit: RuntimeFit | None) -> dict[str, Any]:
    sizes, any_size = advertised(manifest.matryoshka)
    return {
        "runtime": fit.backend if fit else "",
        "inference_precision": fit.precision if fit else "",
        "runtime_choice": fit.reason if fit else "",
        "kind": manifest.kind,
        "source": manifest.source,
        "precision": manifest.precision,
        "preset": manifest.preset or "",
        "max_length": manifest.max_length,
        "verified": manifest.verified,
        "parity": manifest.parity.metrics if manifest.parity else {},
        "parity_thresholds": manifest.parity.thresholds if manifest.parity else {},
        # What `tandem train` measured on its held-out queries, for a reranker it trained.
        "held_out": manifest.extra.get("training", {}).get("held_out"),
        # Set where those figures put it below stage 1 alone: `tandem models publish` refuses
        # such a reranker, and the search page says so.
        "worse_than_stage1": worse_than_stage1(manifest),
        "prompts": manifest.prompts.texts,
        **manifest.prompts.chosen_names(),
        "matryoshka_dimensions": sizes,
        "matryoshka_any_size": any_size,
    }
