"""The rerank ecosystem's shapes over the engine: Cohere v1 and v2 and Jina rerank, TEI's
rerank and embed, and OpenAI's embeddings.

These clients expect every document scored, so these routes rerank without a budget (the
native ``/v1/search`` takes one). Scores are the sigmoid of the reranker's logit, in [0, 1],
as Cohere's ``relevance_score`` reads and sentence-transformers' CrossEncoder returns by
default; TEI's ``raw_scores`` returns the logit.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter
from starlette.responses import Response

from tandem.server.engine.engine import Call, Engine
from tandem.server.engine.errors import InvalidArgument
from tandem.server.engine.requests import EmbedRequest, RerankRequest, bulk_embed
from tandem.server.engine.search import DocumentRef, Result
from tandem.server.http import schemas as s
from tandem.server.http.calls import Calls
from tandem.server.http.errors import Dialect
from tandem.server.http.native import passage_body

NO_BUDGET_MS = 0
JINA_PREFIX = "jina"


def _scored(result: Result) -> None:
    """With no budget every document is scored; a hit without a score is a server bug."""
    if any(hit.rerank_score is None for hit in result.hits):
        raise RuntimeError("a document came back unscored from a rerank without a budget")


def router(engine: Engine, calls: Calls) -> APIRouter:
    routes = APIRouter()

    async def cohere(request: s.CohereRerankRequest, version: str) -> Response:
        texts = [d if isinstance(d, str) else d.text for d in request.documents]
        model = request.model or ""
        return_documents = (
            request.return_documents
            if request.return_documents is not None
            else model.startswith(JINA_PREFIX)
        )

        async def work(call: Call) -> s.CohereRerankResponse:
            if request.rank_fields not in (None, ["text"]):
                raise InvalidArgument(
                    f"rank_fields {request.rank_fields} is not supported: Tandem ranks the "
                    "`text` field only"
                )
            result = await engine.rerank(
                RerankRequest(
                    query=request.query,
                    documents=[DocumentRef(text=text) for text in texts],
                    top_n=request.top_n,
                    rerank_budget_ms=NO_BUDGET_MS,
                    return_documents=return_documents,
                    max_tokens_per_doc=request.max_tokens_per_doc,
                    max_chunks_per_doc=request.max_chunks_per_doc,
                ),
                call,
            )
            _scored(result)
            return s.CohereRerankResponse(
                id=str(uuid.uuid4()),
                results=[
                    s.CohereResult(
                        index=hit.stage1_rank,
                        relevance_score=hit.probability or 0.0,
                        document=(
                            s.CohereDocument(text=texts[hit.stage1_rank])
                            if return_documents
                            else None
                        ),
                        passage=passage_body(hit.passage),
                    )
                    for hit in result.hits
                ],
                meta=s.CohereMeta(
                    api_version=s.ApiVersion(version=version),
                    billed_units=s.BilledUnits(search_units=1),
                ),
                model=model or _reranker_name(engine),
            )

        return await calls.run(Dialect.COHERE, work, queued=True)

    @routes.post(
        "/v1/rerank",
        response_model=s.CohereRerankResponse,
        response_model_exclude_none=True,
        tags=["rerank"],
        summary="Cohere v1 and Jina rerank",
    )
    async def rerank_v1(request: s.CohereRerankRequest) -> Response:
        return await cohere(request, "1")

    @routes.post(
        "/v2/rerank",
        response_model=s.CohereRerankResponse,
        response_model_exclude_none=True,
        tags=["rerank"],
        summary="Cohere v2 rerank",
    )
    async def rerank_v2(request: s.CohereRerankRequest) -> Response:
        return await cohere(request, "2")

    @routes.post("/rerank", response_model=list[s.TeiRank], tags=["rerank"], summary="TEI rerank")
    async def tei_rerank(request: s.TeiRerankRequest) -> Response:
        async def work(call: Call) -> list[dict[str, Any]]:
            result = await engine.rerank(
                RerankRequest(
                    query=request.query,
                    documents=[DocumentRef(text=text) for text in request.texts],
                    rerank_budget_ms=NO_BUDGET_MS,
                    truncate=request.truncate,
                    # TEI reads one window: past it, a pair is cut (truncate) or refused.
                    max_chunks_per_doc=1,
                ),
                call,
            )
            _scored(result)
            ranks = []
            for hit in result.hits:
                score = hit.rerank_score if request.raw_scores else hit.probability
                rank: dict[str, Any] = {"index": hit.stage1_rank, "score": score}
                if request.return_text:
                    rank["text"] = request.texts[hit.stage1_rank]
                ranks.append(rank)
            return ranks

        return await calls.run(Dialect.TEI, work, queued=True)

    @routes.post("/embed", response_model=list[list[float]], tags=["embed"], summary="TEI embed")
    async def tei_embed(request: s.TeiEmbedRequest) -> Response:
        texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs

        async def work(call: Call) -> list[list[float]]:
            pooling = engine.models.bi_encoder.pooling
            if not request.normalize and pooling is not None and pooling.normalize:
                raise InvalidArgument(
                    "normalize=false: this bi-encoder's artifact returns unit vectors only; "
                    "send normalize=true"
                )
            embedded = await engine.embed(EmbedRequest(texts, truncate=request.truncate), call)
            return [vector.tolist() for vector in embedded.vectors]

        queued = not bulk_embed(len(texts), engine.settings)
        return await calls.run(Dialect.TEI, work, queued=queued)

    async def openai(request: s.OpenAIEmbeddingRequest) -> Response:
        async def work(call: Call) -> s.OpenAIEmbeddingResponse:
            texts = _openai_texts(request.input)
            if request.dimensions is not None and request.dimensions != engine_dimension(engine):
                raise InvalidArgument(
                    f"dimensions={request.dimensions}: this model's embeddings have "
                    f"{engine_dimension(engine)}; leave dimensions out"
                )
            embedded = await engine.embed(EmbedRequest(texts), call)
            data = [
                s.OpenAIEmbedding(embedding=_encoded(vector, request.encoding_format), index=i)
                for i, vector in enumerate(embedded.vectors)
            ]
            usage = s.OpenAIUsage(prompt_tokens=embedded.tokens, total_tokens=embedded.tokens)
            return s.OpenAIEmbeddingResponse(data=data, model=request.model, usage=usage)

        texts = 1 if isinstance(request.input, str) else len(request.input)
        queued = not bulk_embed(texts, engine.settings)
        return await calls.run(Dialect.OPENAI, work, queued=queued)

    @routes.post(
        "/v1/embeddings",
        response_model=s.OpenAIEmbeddingResponse,
        tags=["embed"],
        summary="OpenAI embeddings",
    )
    async def openai_v1(request: s.OpenAIEmbeddingRequest) -> Response:
        return await openai(request)

    @routes.post("/embeddings", response_model=s.OpenAIEmbeddingResponse, include_in_schema=False)
    async def openai_bare(request: s.OpenAIEmbeddingRequest) -> Response:
        return await openai(request)

    return routes


def engine_dimension(engine: Engine) -> int:
    return engine.searcher.embedder.dimension


def _reranker_name(engine: Engine) -> str:
    manifest = engine.models.reranker
    return manifest.source if manifest is not None else ""


def _openai_texts(value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    if isinstance(value, str):
        return [value]
    if all(isinstance(item, str) for item in value):
        return [str(item) for item in value]
    raise InvalidArgument(
        "input holds token ids; this server tokenizes itself: send the text (a string or a "
        "list of strings)"
    )


def _encoded(vector: np.ndarray[Any, Any], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(value) for value in vector]
