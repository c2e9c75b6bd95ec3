"""Request and reply bodies, field for field as each original API names them.

Where the original ignores fields it does not know (Cohere, Jina, TEI), so do these; where
it refuses them (OpenAI, and Tandem's own JSON API), so do these, and the 400 names the field.
Defaults are the original's: TEI does not truncate unless asked, Cohere truncates.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Scores and ids as every shape returns them.
Strict = ConfigDict(extra="forbid")
Lenient = ConfigDict(extra="ignore")


class TextDocument(BaseModel):
    model_config = Lenient
    text: str


# Cohere v1 and v2, and Jina (which shares /v1/rerank)


class CohereRerankRequest(BaseModel):
    model_config = Lenient
    query: str
    documents: list[str | TextDocument] = Field(
        description="the texts to rerank: strings, or objects with a `text` field"
    )
    model: str | None = Field(
        default=None, description="accepted and echoed; the server's reranker answers"
    )
    top_n: int | None = Field(default=None, description="return the best this many")
    return_documents: bool | None = Field(
        default=None,
        description="include each document's text; default false (Cohere), true when `model` "
        "names a Jina reranker (jina-…), as Jina's API does",
    )
    max_tokens_per_doc: int | None = Field(
        default=None, description="cut each document to this many tokens before scoring"
    )
    rank_fields: list[str] | None = Field(
        default=None, description="Cohere v1: only `text` is ranked; other fields are refused"
    )
    max_chunks_per_doc: int | None = Field(
        default=None,
        description="Cohere v1: read a long document in at most this many overlapping windows, "
        "scored by the best; default: the server's",
    )


class InfinityRerankRequest(CohereRerankRequest):
    """Infinity's rerank (LiteLLM's ``infinity/`` provider posts here): Cohere's fields on
    ``/rerank``, with ``raw_scores``; documents come back as strings when asked for."""

    raw_scores: bool = Field(default=False, description="the logit instead of the sigmoid")


class InfinityRerankResult(BaseModel):
    relevance_score: float
    index: int
    document: str | None = None


class InfinityUsage(BaseModel):
    prompt_tokens: int = Field(description="the tokens of every pair the reranker read")
    total_tokens: int


class InfinityRerankResponse(BaseModel):
    object: Literal["rerank"] = "rerank"
    results: list[InfinityRerankResult]
    model: str
    usage: InfinityUsage
    id: str
    created: int


class CohereDocument(BaseModel):
    text: str


class PassageBody(BaseModel):
    """The window whose score the document took, in characters (Unicode code points)."""

    start: int
    end: int
    window: int = Field(description="0-based")
    windows: int = Field(description="windows the document was cut into")
    windows_scored: int = Field(description="windows scored within the budget")
    partly_scored: bool


class CohereResult(BaseModel):
    index: int
    relevance_score: float = Field(description="the reranker's logit through the sigmoid")
    document: CohereDocument | None = None
    passage: PassageBody | None = Field(
        default=None, description="Tandem's: the window that earned the score"
    )


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int


class CohereMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits


class JinaUsage(BaseModel):
    total_tokens: int


class CohereRerankResponse(BaseModel):
    """Cohere's reply; ``model`` and ``usage`` are Jina's, which Cohere clients ignore
    (``usage`` is sent where ``model`` names a Jina reranker)."""

    id: str
    results: list[CohereResult]
    meta: CohereMeta
    model: str
    usage: JinaUsage | None = None


# TEI


class TeiRerankRequest(BaseModel):
    model_config = Lenient
    query: str
    texts: list[str]
    truncate: bool = False
    raw_scores: bool = Field(default=False, description="the logit instead of the sigmoid")
    return_text: bool = False
    truncation_direction: Literal["Right", "right"] = "Right"


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


TeiDirection = Literal["Right", "right", "Left", "left"]


MATRYOSHKA = (
    "a Matryoshka bi-encoder's vectors cut to this many components (GET /info lists the "
    "sizes it was trained for); default: its full size"
)


class TeiEmbedOptions(BaseModel):
    """What huggingface_hub's ``InferenceClient.feature_extraction`` nests under
    ``parameters``. TEI reads these options at the top level only and ignores them there;
    Tandem honours both places."""

    model_config = Lenient
    truncate: bool | None = None
    normalize: bool | None = None
    prompt_name: str | None = None
    truncation_direction: TeiDirection | None = None
    dimensions: int | None = None


class TeiEmbedRequest(BaseModel):
    model_config = Lenient
    inputs: str | list[str]
    truncate: bool | None = Field(default=None, description="default false: too long is a 400")
    normalize: bool | None = Field(default=None, description="default true (unit vectors)")
    prompt_name: str | None = Field(
        default=None,
        description="one of the bi-encoder's prompts (GET /info); default: its default prompt",
    )
    truncation_direction: TeiDirection | None = Field(
        default=None, description="Right only: a long text loses its end"
    )
    dimensions: int | None = Field(default=None, description=MATRYOSHKA)
    parameters: TeiEmbedOptions | None = Field(
        default=None,
        description="the same options as huggingface_hub's InferenceClient sends them; a "
        "top-level field wins",
    )

    def option(self, name: str) -> Any:
        """A field at the top level, else under ``parameters``; None where neither sets it."""
        value = getattr(self, name)
        if value is None and self.parameters is not None:
            value = getattr(self.parameters, name)
        return value


# Cohere's embed, v1 and v2


CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereContent(BaseModel):
    model_config = Lenient
    type: str
    text: str | None = None


class CohereEmbedInput(BaseModel):
    """v2's ``inputs``: each a list of content parts; Tandem embeds one text part."""

    model_config = Lenient
    content: list[CohereContent]


class CohereEmbedRequest(BaseModel):
    model_config = Lenient
    texts: list[str] | None = None
    inputs: list[CohereEmbedInput] | None = Field(
        default=None, description="v2: one text part per input (images are refused)"
    )
    images: list[str] | None = Field(default=None, description="refused: Tandem embeds text")
    model: str | None = Field(default=None, description="accepted; the server's model answers")
    input_type: str | None = Field(
        default=None,
        description="search_query and search_document get the bi-encoder's query and "
        "document prompts (as Search and Upsert do); classification and clustering its prompt "
        "of that name, where it has one",
    )
    embedding_types: list[CohereEmbeddingType] | None = Field(
        default=None,
        description="float, base64 (float32 bytes), binary/ubinary (sign bits, packed), "
        "int8/uint8 (a unit vector's components times 127, rounded)",
    )
    truncate: Literal["NONE", "START", "END"] | None = Field(
        default=None, description="END (the default) cuts a long text's end; NONE refuses it"
    )
    output_dimension: int | None = Field(default=None, description=MATRYOSHKA)
    max_tokens: int | None = Field(
        default=None, description="at least the bi-encoder's own length (it cannot cut shorter)"
    )


class CohereEmbeddingsByType(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    float_: list[list[float]] | None = Field(default=None, alias="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereEmbedUnits(BaseModel):
    input_tokens: int


class CohereEmbedMeta(BaseModel):
    api_version: ApiVersion
    billed_units: CohereEmbedUnits


class CohereEmbedResponse(BaseModel):
    """v1 without ``embedding_types``: ``embeddings_floats``, a list of float vectors;
    otherwise (and always on v2) ``embeddings_by_type``, one list per type asked for."""

    response_type: Literal["embeddings_floats", "embeddings_by_type"]
    id: str
    embeddings: list[list[float]] | CohereEmbeddingsByType
    texts: list[str]
    meta: CohereEmbedMeta


# OpenAI


class OpenAIEmbeddingRequest(BaseModel):
    model_config = Strict
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, description=MATRYOSHKA)
    user: str | None = None
    input_type: Literal["query", "document", "passage"] | None = Field(
        default=None,
        description="not OpenAI's: Voyage's and NVIDIA NIM's; picks the bi-encoder's query "
        "or document prompt. Default: its default prompt",
    )
    # Jina's embeddings API is OpenAI's with these fields; jina-embeddings-v3 clients send them.
    task: str | None = Field(
        default=None,
        description="Jina's: the bi-encoder's prompt of that name where it has one (as "
        "jina-embeddings-v3's are named), else retrieval.query and retrieval.passage pick the "
        "query and document prompts, and text-matching, classification, separation the default",
    )
    embedding_type: CohereEmbeddingType | None = Field(
        default=None,
        description="Jina's: float, base64, binary, ubinary, int8 or uint8 (as Cohere's "
        "embedding_types); wins over encoding_format",
    )
    normalized: bool | None = Field(
        default=None,
        description="Jina's: true scales each vector to unit length; false or unset leaves "
        "the model's own (unit where it normalizes)",
    )
    truncate: bool | None = Field(
        default=None, description="Jina's: false refuses a text longer than the model reads"
    )
    late_chunking: bool | None = Field(
        default=None, description="Jina's: false only; each input is embedded on its own"
    )


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    # int lists first: Jina's binary and int8 types must not be read back as floats.
    embedding: list[int] | list[float] | str
    index: int


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


# Tandem's own JSON API: the gRPC messages' fields, as JSON.


class SearchBody(BaseModel):
    model_config = Strict
    query: str
    recall_k: int | None = None
    top_n: int | None = None
    mode: Literal["two_stage", "retrieve_only"] | None = Field(
        default=None, description="default: two_stage where a reranker is loaded"
    )
    rerank_budget_ms: int | None = Field(default=None, description="0: no deadline")
    include_text: bool = False
    metadata_filter: dict[str, Any] | None = Field(
        default=None,
        description=(
            'keys with values (equality) or operators, all of which must hold: {"lang": "en", '
            '"year": {"$gte": 2020}, "tags": {"$in": ["faq"]}}; $eq $ne $gt $gte $lt $lte $in '
            "$nin $all $exists, $not of an object of them, and $and/$or/$nor over lists of "
            "filters (MongoDB's meaning)"
        ),
    )
    truncate: bool = True
    max_tokens_per_doc: int | None = Field(
        default=None, description="cut each candidate to this many tokens before reranking"
    )
    min_rerank: int | None = Field(
        default=None,
        description="refuse (429) rather than rerank fewer candidates than this in the budget",
    )
    max_chunks_per_doc: int | None = Field(
        default=None,
        description="read a long candidate in at most this many overlapping windows, scored by "
        "the best; default: the server's",
    )
    first_stage: Literal["dense", "lexical", "hybrid"] | None = Field(
        default=None, description="where candidates come from; default: the server's"
    )
    dense_weight: float | None = Field(default=None, description="hybrid's RRF weight, >= 0")
    lexical_weight: float | None = Field(default=None, description="hybrid's RRF weight, >= 0")


class HitBody(BaseModel):
    id: str
    score: float = Field(description="the rerank logit when reranked, else the stage-1 score")
    probability: float | None = Field(description="the rerank logit through the sigmoid")
    stage1_score: float | None = Field(description="cosine, BM25, or the fused RRF score")
    stage1_rank: int
    dense_rank: int | None = Field(default=None, description="rank on the dense side, from 0")
    lexical_rank: int | None = Field(default=None, description="rank on the BM25 side, from 0")
    reranked: bool
    truncated: bool
    text: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    passage: PassageBody | None = Field(
        default=None, description="the window that earned the rerank score"
    )


class TimingsBody(BaseModel):
    embed_ms: float = 0.0
    search_ms: float = 0.0
    tokenize_ms: float = 0.0
    queue_ms: float = 0.0
    rerank_ms: float = 0.0
    total_ms: float = 0.0


class SearchReply(BaseModel):
    hits: list[HitBody]
    reranked_count: int
    candidates: int
    truncated: bool
    filter_matched: int | None = None
    first_stage: Literal["dense", "lexical", "hybrid"]
    dense_candidates: int
    lexical_candidates: int
    timings: TimingsBody
    reranker_id: str = Field(default="", description="the reranker that scored the hits")


class DocumentBody(BaseModel):
    model_config = Strict
    id: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class UpsertBody(BaseModel):
    model_config = Strict
    documents: list[DocumentBody]
    truncate: bool = True


class UpsertReply(BaseModel):
    received: int
    inserted: int
    replaced: int
    truncated: int
    generation: int
    timings: TimingsBody


class GetBody(BaseModel):
    model_config = Strict
    ids: list[str] = Field(
        default=[], description="look these up; or leave out to list documents a page at a time"
    )
    metadata_filter: dict[str, Any] | None = Field(
        default=None, description="listing: only documents that match (search's filter language)"
    )
    id_prefix: str = Field(default="", description="listing: only ids that start with this")
    limit: int | None = Field(
        default=None, description="listing: documents per page (default 100, at most 1000)"
    )
    page_token: str = Field(
        default="", description="listing: the last reply's next_page_token; none for page one"
    )


class DeleteBody(BaseModel):
    model_config = Strict
    ids: list[str] = []
    metadata_filter: dict[str, Any] | None = Field(
        default=None,
        description="also delete every document that matches (search's filter language), in "
        "the same transaction; send ids, a filter, or both",
    )


class GetReply(BaseModel):
    documents: list[DocumentBody]
    not_found: list[str]
    timings: TimingsBody
    next_page_token: str = Field(description="listing: the next page's token; empty at the end")


class DeleteReply(BaseModel):
    deleted: int
    not_found: list[str]
    timings: TimingsBody


class FeedbackItemBody(BaseModel):
    model_config = Strict
    query: str
    document_id: str = Field(description="a stored document's id")
    label: float | None = Field(
        default=None, description="a grade from 0 (not relevant) to 3 (perfectly relevant)"
    )
    click: bool = Field(default=False, description="the user chose it (grade 1); or a label")


class FeedbackBody(BaseModel):
    model_config = Strict
    items: list[FeedbackItemBody]


class FeedbackReply(BaseModel):
    recorded: int
    total: int = Field(description="labels the collection holds in all")


# OpenAI's model list (Infinity and vLLM serve it too; clients list models to check a server)


Capability = Literal["embed", "rerank"]


class OpenAIModel(BaseModel):
    id: str = Field(description="the model's source, as its manifest records it")
    object: Literal["model"] = "model"
    created: int = Field(description="when it was exported (Unix seconds)")
    owned_by: Literal["tandem"] = "tandem"
    capabilities: list[Capability]


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]
