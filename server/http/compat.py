"""The rerank ecosystem's shapes over the engine: Cohere v1 and v2 rerank and embed, Jina
rerank, TEI's rerank and embed (also at the root, where huggingface_hub's InferenceClient
posts), and OpenAI's embeddings.

These clients expect every document scored, so these routes rerank without a budget (the
native ``/v1/search`` takes one). Scores are the sigmoid of the reranker's logit, in [0, 1],
as Cohere's ``relevance_score`` reads and sentence-transformers' CrossEncoder returns by
default; TEI's ``raw_scores`` returns the logit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Body
from fastapi.exceptions import RequestValidationError
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from tandem.artifact import Manifest, Role
from tandem.matryoshka import UnsupportedDimensions, served_dimension, unit_length
from tandem.server.engine.engine import Call, Engine
from tandem.server.engine.errors import InvalidArgument
from tandem.server.engine.requests import EmbedRequest, RerankRequest, bulk_embed
from tandem.server.engine.search import DocumentRef, Result
from tandem.server.http import schemas as s
from tandem.server.http.bodies import UnicodeRoute
from tandem.server.http.calls import Calls
from tandem.server.http.encodings import UNIT_TYPES, encoded
from tandem.server.http.errors import Dialect
from tandem.server.http.native import passage_body

Body_T = TypeVar("Body_T", bound=BaseModel)

NO_BUDGET_MS = 0
JINA_PREFIX = "jina"
# Cohere's input types that are a query or a document; the tasks are prompt names in
# models trained with one per task (nomic-embed: classification, clustering).
COHERE_ROLES: dict[str, Role] = {"search_query": "query", "search_document": "document"}
COHERE_TASKS = ("classification", "clustering")
# OpenAI's embeddings have no input_type; Voyage's and NVIDIA NIM's, on the same path, do.
OPENAI_ROLES: dict[str, Role] = {"query": "query", "document": "document", "passage": "document"}
# jina-embeddings-v3's tasks (and jina-embeddings-v2-code's).
JINA_ROLES: dict[str, Role] = {
    "retrieval.query": "query", "retrieval.passage": "document",
    "code.query": "query", "code.passage": "document",
}  # fmt: skip
JINA_TASKS = ("text-matching", "classification", "separation")
ROOT_BODIES = 'send {"inputs": ...} to embed, or {"query": ..., "texts": [...]} to rerank'


# The root route's body is TEI's embed or its rerank; the schema says so (the route itself
# reads a plain object and picks).
def _one_of_bodies(*schemas: str) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads a plain object and picks its shape."""
    refs = [{"$ref": f"#/components/schemas/{schema}"} for schema in schemas]
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"oneOf": refs}}},
        }
    }


def _scored(result: Result) -> None:
    """With no budget every document is scored; a hit without a score is a server bug."""
    if any(hit.rerank_score is None for hit in result.hits):
        raise RuntimeError("a document came back unscored from a rerank without a budget")


def router(engine: Engine, calls: Calls) -> APIRouter:
    routes = APIRouter(route_class=UnicodeRoute)

    async def rerank_documents(
        request: s.CohereRerankRequest, texts: list[str], call: Call, *, return_documents: bool
    ) -> Result:
        """Cohere's fields (Jina's and Infinity's are theirs) as the engine's Rerank;
        ``texts``: the request's documents (``_document_texts``)."""
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
        return result

    async def cohere(request: s.CohereRerankRequest, version: str) -> Response:
        texts = _document_texts(request)
        model = request.model or ""
        return_documents = (
            request.return_documents
            if request.return_documents is not None
            else model.startswith(JINA_PREFIX)
        )

        async def work(call: Call) -> s.CohereRerankResponse:
            result = await rerank_documents(request, texts, call, return_documents=return_documents)
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
                usage=(
                    s.JinaUsage(total_tokens=result.pair_tokens)
                    if model.startswith(JINA_PREFIX)
                    else None
                ),
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

    async def tei_embed(request: s.TeiEmbedRequest) -> Response:
        texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs

        async def work(call: Call) -> list[list[float]]:
            _check_tei_embed(request, engine)
            truncate = bool(request.option("truncate"))
            embedded = await engine.embed(
                EmbedRequest(
                    texts, truncate=truncate, prompt_name=request.option("prompt_name"),
                    dimensions=request.option("dimensions"),
                ),
                call,
            )  # fmt: skip
            # TEI's normalize defaults to true: unit vectors, whatever the model's pooling.
            wanted_unit = request.option("normalize") is not False
            return [vector.tolist() for vector in _unit(embedded.vectors, engine, wanted_unit)]

        queued = not bulk_embed(len(texts), engine.settings)
        return await calls.run(Dialect.TEI, work, queued=queued)

    async def infinity_rerank(request: s.InfinityRerankRequest) -> Response:
        texts = _document_texts(request)
        return_documents = bool(request.return_documents)

        async def work(call: Call) -> s.InfinityRerankResponse:
            result = await rerank_documents(request, texts, call, return_documents=return_documents)
            return s.InfinityRerankResponse(
                results=[
                    s.InfinityRerankResult(
                        relevance_score=(
                            hit.rerank_score if request.raw_scores else hit.probability
                        )
                        or 0.0,
                        index=hit.stage1_rank,
                        document=texts[hit.stage1_rank] if return_documents else None,
                    )
                    for hit in result.hits
                ],
                model=request.model or _reranker_name(engine),
                usage=s.InfinityUsage(
                    prompt_tokens=result.pair_tokens, total_tokens=result.pair_tokens
                ),
                id=f"tandem-{uuid.uuid4()}",
                created=int(time.time()),
            )

        return await calls.run(Dialect.OPENAI, work, queued=True)

    @routes.post(
        "/rerank",
        response_model=list[s.TeiRank] | s.InfinityRerankResponse,
        response_model_exclude_none=True,
        tags=["rerank"],
        summary="TEI rerank ({query, texts}), or Infinity's ({query, documents})",
        description="TEI's body answers in TEI's shape; Infinity's (Cohere's fields, which "
        "LiteLLM's infinity/ provider sends) in Infinity's, documents as strings.",
        openapi_extra=_one_of_bodies("TeiRerankRequest", "InfinityRerankRequest"),
    )
    async def tei_rerank_route(payload: dict[str, Any] = Body()) -> Response:  # noqa: B008
        if "documents" in payload and "texts" not in payload:
            return await infinity_rerank(_validated(s.InfinityRerankRequest, payload))
        return await tei_rerank(_validated(s.TeiRerankRequest, payload))

    @routes.post("/embed", response_model=list[list[float]], tags=["embed"], summary="TEI embed")
    async def tei_embed_route(request: s.TeiEmbedRequest) -> Response:
        return await tei_embed(request)

    @routes.post(
        "/",
        response_model=list[list[float]] | list[s.TeiRank],
        tags=["embed", "rerank"],
        summary="TEI at the root: embed ({inputs}) or rerank ({query, texts})",
        description="Where huggingface_hub's InferenceClient (Haystack's and LlamaIndex's "
        "Hugging Face API embedders) posts when given this server's URL. TEI answers here "
        "for the one model it serves; Tandem serves two, so the body's fields choose.",
        openapi_extra=_one_of_bodies("TeiEmbedRequest", "TeiRerankRequest"),
    )
    async def tei_root(payload: dict[str, Any] = Body()) -> Response:  # noqa: B008
        request = _tei_root_request(payload)
        if isinstance(request, s.TeiRerankRequest):
            return await tei_rerank(request)
        return await tei_embed(request)

    async def cohere_embed(request: s.CohereEmbedRequest, version: str) -> Response:
        async def work(call: Call) -> s.CohereEmbedResponse:
            texts = _cohere_texts(request)
            kinds = request.embedding_types or (["float"] if version == "2" else None)
            _check_cohere_embed(request, kinds, engine)
            prompt_name, role = _cohere_prompt(request.input_type, engine)
            embedded = await engine.embed(
                EmbedRequest(
                    texts,
                    truncate=request.truncate != "NONE",
                    prompt_name=prompt_name,
                    role=role,
                    dimensions=request.output_dimension,
                ),
                call,
            )
            vectors = np.asarray(embedded.vectors, dtype=np.float32)
            meta = s.CohereEmbedMeta(
                api_version=s.ApiVersion(version=version),
                billed_units=s.CohereEmbedUnits(input_tokens=embedded.tokens),
            )
            if kinds is None:  # v1's plain reply: float vectors, not keyed by type
                return s.CohereEmbedResponse(
                    response_type="embeddings_floats", id=str(uuid.uuid4()),
                    embeddings=encoded(vectors, "float"), texts=texts, meta=meta,
                )  # fmt: skip
            by_type = {kind: encoded(vectors, kind) for kind in dict.fromkeys(kinds)}
            return s.CohereEmbedResponse(
                response_type="embeddings_by_type", id=str(uuid.uuid4()),
                embeddings=s.CohereEmbeddingsByType.model_validate(by_type), texts=texts,
                meta=meta,
            )  # fmt: skip

        count = len(request.texts or request.inputs or ())
        queued = not bulk_embed(count, engine.settings)
        return await calls.run(Dialect.COHERE, work, queued=queued)

    @routes.post(
        "/v1/embed",
        response_model=s.CohereEmbedResponse,
        response_model_exclude_none=True,
        tags=["embed"],
        summary="Cohere v1 embed",
    )
    async def embed_v1(request: s.CohereEmbedRequest) -> Response:
        return await cohere_embed(request, "1")

    @routes.post(
        "/v2/embed",
        response_model=s.CohereEmbedResponse,
        response_model_exclude_none=True,
        tags=["embed"],
        summary="Cohere v2 embed",
    )
    async def embed_v2(request: s.CohereEmbedRequest) -> Response:
        return await cohere_embed(request, "2")

    async def openai(request: s.OpenAIEmbeddingRequest) -> Response:
        async def work(call: Call) -> s.OpenAIEmbeddingResponse:
            texts = _openai_texts(request.input)
            prompt_name, role = _openai_prompt(request, engine)
            kind = request.embedding_type or request.encoding_format
            _check_jina_embed(request, kind, engine)
            embedded = await engine.embed(
                EmbedRequest(
                    texts, truncate=request.truncate is not False, prompt_name=prompt_name,
                    role=role, dimensions=request.dimensions,
                ),
                call,
            )  # fmt: skip
            unit = _unit(embedded.vectors, engine, bool(request.normalized))
            vectors = encoded(unit, kind)
            data = [
                s.OpenAIEmbedding(embedding=vector, index=i) for i, vector in enumerate(vectors)
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

    @routes.get(
        "/v1/models",
        response_model=s.OpenAIModelList,
        tags=["embed", "rerank"],
        summary="OpenAI model list",
        description="The bi-encoder and the reranker being served, by source; clients list "
        "models to check a server, or to offer a choice. Any `model` a call sends is "
        "accepted: the server's own models answer.",
    )
    async def models_v1() -> s.OpenAIModelList:
        return _model_list(engine)

    @routes.get("/models", response_model=s.OpenAIModelList, include_in_schema=False)
    async def models_bare() -> s.OpenAIModelList:
        return _model_list(engine)

    return routes


def _model_list(engine: Engine) -> s.OpenAIModelList:
    served: list[tuple[Manifest, s.Capability]] = [(engine.models.bi_encoder, "embed")]
    if engine.models.reranker is not None:
        served.append((engine.models.reranker, "rerank"))
    return s.OpenAIModelList(
        data=[
            s.OpenAIModel(
                id=manifest.source,
                created=int(datetime.fromisoformat(manifest.created_at).timestamp()),
                capabilities=[capability],
            )
            for manifest, capability in served
        ]
    )


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


def _check_tei_embed(request: s.TeiEmbedRequest, engine: Engine) -> None:
    if request.option("normalize") is False and engine.searcher.embedder.normalizes:
        raise InvalidArgument(
            "normalize=false: this bi-encoder's artifact returns unit vectors only; "
            "send normalize=true"
        )
    if str(request.option("truncation_direction") or "right").lower() != "right":
        raise InvalidArgument(
            "truncation_direction=Left: a long text loses its end here; send Right or leave it out"
        )


def _tei_root_request(payload: dict[str, Any]) -> s.TeiRerankRequest | s.TeiEmbedRequest:
    if "query" in payload or "texts" in payload:
        return _validated(s.TeiRerankRequest, payload)
    if "inputs" in payload:
        return _validated(s.TeiEmbedRequest, payload)
    raise RequestValidationError([{"type": "value_error", "loc": (), "msg": ROOT_BODIES}])


def _validated(schema: type[Body_T], payload: dict[str, Any]) -> Body_T:
    """``payload`` as ``schema``, refused as FastAPI refuses a body it read itself."""
    try:
        return schema.model_validate(payload)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from error


def _document_texts(request: s.CohereRerankRequest) -> list[str]:
    return [d if isinstance(d, str) else d.text for d in request.documents]


def _cohere_texts(request: s.CohereEmbedRequest) -> list[str]:
    if request.images:
        raise InvalidArgument("images: Tandem embeds text only; send texts")
    if request.texts is not None:
        return request.texts
    if request.inputs is None:
        raise InvalidArgument("texts is required: the strings to embed")
    texts = []
    for i, item in enumerate(request.inputs):
        part = item.content[0] if len(item.content) == 1 else None
        if part is None or part.type != "text" or part.text is None:
            raise InvalidArgument(
                f"inputs[{i}]: Tandem embeds one text part per input (no images); send "
                "each text as its own input, or in texts"
            )
        texts.append(part.text)
    return texts


def _cohere_prompt(input_type: str | None, engine: Engine) -> tuple[str | None, Role | None]:
    """Cohere's input_type as (prompt name, role): search_query and search_document are the
    query and document roles; classification and clustering name the artifact's prompt of
    that name where it has one (nomic-embed's do), else its default."""
    return _task_prompt(
        "input_type", input_type, COHERE_ROLES, COHERE_TASKS, _prompt_names(engine),
        named_first=False, refused="(Tandem embeds text, not images)",
    )  # fmt: skip


def _openai_prompt(
    request: s.OpenAIEmbeddingRequest, engine: Engine
) -> tuple[str | None, Role | None]:
    """Voyage's and NIM's input_type, or Jina's task. jina-embeddings-v3 names its prompts
    after its tasks, so a prompt of the task's name wins over the task's role."""
    if request.input_type is not None and request.task is not None:
        raise InvalidArgument("input_type and task both pick a prompt: send one of them")
    if request.input_type is not None:
        return None, OPENAI_ROLES[request.input_type]
    return _task_prompt(
        "task", request.task, JINA_ROLES, JINA_TASKS, _prompt_names(engine), named_first=True
    )


def _prompt_names(engine: Engine) -> Collection[str]:
    return engine.models.bi_encoder.prompts.texts.keys()


def _task_prompt(
    field: str, value: str | None, roles: Mapping[str, Role], tasks: Sequence[str],
    prompts: Collection[str], *, named_first: bool, refused: str = "",
) -> tuple[str | None, Role | None]:  # fmt: skip
    """An API's task field as (prompt name, role): the bi-encoder's prompt of that name
    (among ``prompts``) where ``named_first`` and it has one; else a role; else, for a task,
    its prompt of that name where it has one, or its default."""
    if value is None:
        return None, None
    known = value in prompts
    if named_first and known:
        return value, None
    if value in roles:
        return None, roles[value]
    if value in tasks:
        return (value if known else None), None
    raise InvalidArgument(
        f"{field}={value!r}: send one of {', '.join([*roles, *tasks])} {refused}".rstrip()
    )


def _unit(vectors: NDArray[np.float32], engine: Engine, wanted: bool) -> NDArray[np.float32]:
    """``vectors`` at unit length where a caller asks and the model's own are not."""
    if wanted and not engine.searcher.embedder.normalizes:
        return unit_length(vectors)
    return vectors


def _check_jina_embed(request: s.OpenAIEmbeddingRequest, kind: str, engine: Engine) -> None:
    if request.late_chunking:
        raise InvalidArgument(
            "late_chunking=true: Tandem embeds each input on its own (Upsert embeds a long "
            "document as overlapping passages); send false or leave it out"
        )
    _check_unit_types(
        kind, engine, normalized=bool(request.normalized), remedy=", or send normalized: true"
    )


def _check_unit_types(
    kind: str, engine: Engine, *, normalized: bool = False, remedy: str = ""
) -> None:
    if kind in UNIT_TYPES and not (normalized or engine.searcher.embedder.normalizes):
        raise InvalidArgument(
            f"{kind} scales unit vectors, and this bi-encoder's are not normalized; ask for "
            f"float, base64, binary or ubinary{remedy}"
        )


def _check_cohere_embed(
    request: s.CohereEmbedRequest, kinds: Sequence[str] | None, engine: Engine
) -> None:
    embedder = engine.searcher.embedder
    try:
        served_dimension(
            request.output_dimension, embedder.dimension, embedder.matryoshka,
            field="output_dimension",
        )  # fmt: skip
    except UnsupportedDimensions as error:
        raise InvalidArgument(str(error)) from error
    length = engine.models.bi_encoder.max_length
    if request.max_tokens is not None and request.max_tokens < length:
        raise InvalidArgument(
            f"max_tokens={request.max_tokens}: this bi-encoder reads up to {length} tokens "
            f"a text and cannot cut shorter; send at least {length} or leave max_tokens out"
        )
    if request.truncate == "START":
        raise InvalidArgument("truncate=START: a long text loses its end here; send END or NONE")
    for kind in kinds or ():
        _check_unit_types(kind, engine)
