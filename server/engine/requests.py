"""What each engine call takes, and the one place its fields are checked.

Transports convert their wire format into these types, leaving ``None`` wherever the client
set nothing, so the engine applies the server's defaults itself. Every check raises
``InvalidArgument`` with a message that says what to fix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tandem.artifact import Role
from tandem.server.engine.errors import InvalidArgument
from tandem.server.engine.filters import MetadataFilter, parse_filter
from tandem.server.engine.fusion import FirstStage, Fusion
from tandem.server.engine.search import DocumentRef, Mode
from tandem.server.engine.store import NewDocument
from tandem.server.engine.windows import Reading
from tandem.server.settings import Settings

# Time kept back from a client's deadline to send the answer: a reply that lands after the
# deadline is work thrown away. When the budget ends, a batch may still hold both cores;
# with its threads at the event loop's priority (OpenVINO workers started before the server
# lowered them, as when a process exports and then serves), 5 ms missed 1 reply in 30.
REPLY_MARGIN_S = 0.02


@dataclass(frozen=True)
class SearchRequest:
    query: str
    recall_k: int | None = None
    top_n: int | None = None
    mode: Mode | None = None  # None: two-stage where a reranker is loaded
    rerank_budget_ms: int | None = None  # None: the server's default; 0: no deadline
    include_text: bool = False
    metadata_filter: Mapping[str, Any] | None = None
    truncate: bool = True
    max_tokens_per_doc: int | None = None  # None: the server's default
    min_rerank: int | None = None  # None: the server's default
    max_chunks_per_doc: int | None = None  # None: the server's default
    first_stage: FirstStage | None = None  # None: the server's default
    dense_weight: float | None = None  # hybrid's RRF weights; None: the server's default
    lexical_weight: float | None = None


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: Sequence[DocumentRef]
    top_n: int | None = None  # None: every document
    rerank_budget_ms: int | None = None
    return_documents: bool = False
    truncate: bool = True
    max_tokens_per_doc: int | None = None  # None: the server's default
    min_rerank: int | None = None  # None: the server's default
    max_chunks_per_doc: int | None = None  # None: the server's default


@dataclass(frozen=True)
class EmbedRequest:
    texts: Sequence[str]
    truncate: bool = True
    # Which of the bi-encoder's prompts goes before each text: the one named, else the
    # role's (query or document), else its default (artifact.Prompts.resolve).
    prompt_name: str | None = None
    role: Role | None = None
    # A Matryoshka bi-encoder's vectors cut to this many components; None: the full size.
    dimensions: int | None = None


@dataclass(frozen=True)
class UpsertBatch:
    """One streamed message of an Upsert: committed whole, or not at all."""

    documents: Sequence[NewDocument]
    truncate: bool = True


# TREC's graded scale (0 not relevant .. 3 perfectly relevant), as `tandem train` reads qrels.
MAX_FEEDBACK_GRADE = 3.0
CLICK_GRADE = 1.0


@dataclass(frozen=True)
class FeedbackItem:
    query: str
    document_id: str
    label: float | None = None  # a grade, 0 to MAX_FEEDBACK_GRADE
    click: bool = False  # the user chose the document: recorded as CLICK_GRADE


def check_feedback(
    items: Sequence[FeedbackItem], settings: Settings
) -> list[tuple[str, str, float, str]]:
    """(query, id, grade, kind) per item, or InvalidArgument naming the first bad one."""
    if not items:
        raise InvalidArgument("items is empty: send at least one (query, document_id, label)")
    if len(items) > settings.max_upsert_documents:
        raise InvalidArgument(
            f"{len(items)} feedback items in one call; at most {settings.max_upsert_documents} "
            "(max_upsert_documents): send more calls"
        )
    checked = []
    for position, item in enumerate(items):
        where = f"items[{position}]"
        if not item.query.strip():
            raise InvalidArgument(f"{where}.query is empty: send the query the label is for")
        check_id(item.document_id, settings.max_id_bytes, where=where)
        if item.label is not None and item.click:
            raise InvalidArgument(f"{where} sets both label and click: send one")
        if item.label is None and not item.click:
            raise InvalidArgument(f"{where} has neither a label nor a click: send one")
        if item.label is not None and not (
            math.isfinite(item.label) and 0 <= item.label <= MAX_FEEDBACK_GRADE
        ):
            raise InvalidArgument(
                f"{where}.label is {item.label}: a label is a grade from 0 (not relevant) to "
                f"{MAX_FEEDBACK_GRADE:g} (perfectly relevant)"
            )
        grade = CLICK_GRADE if item.label is None else float(item.label)
        checked.append((item.query, item.document_id, grade, "click" if item.click else "label"))
    return checked


def check_query(query: str) -> None:
    if not query.strip():
        raise InvalidArgument("query is empty: send the question to search for")


def bounded(name: str, value: int | None, *, default: int, limit: int) -> int:
    if value is None:
        return default
    if not 1 <= value <= limit:
        raise InvalidArgument(f"{name} must be between 1 and {limit} (got {value})")
    return int(value)


def finite_json(value: Any, where: str) -> None:
    """Metadata and filters are JSON, which has no NaN or Infinity (SQLite's JSON functions
    reject them): refuse them here rather than store what later reads would choke on."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError as error:
        raise InvalidArgument(
            f"{where} holds NaN or Infinity, which JSON cannot: send a finite number"
        ) from error
    except TypeError as error:
        raise InvalidArgument(f"{where} is not JSON: {error}") from error


def checked_filter(raw: Mapping[str, Any] | None) -> MetadataFilter | None:
    """A request's metadata_filter, read (None where it sets none); refused where it holds
    NaN or Infinity, or means nothing (filters' InvalidFilter)."""
    if raw:
        finite_json(dict(raw), "metadata_filter")
    return parse_filter(raw)


def document_cap(requested: int | None, settings: Settings) -> int | None:
    """The per-document token cap: the request's, else the server's (None: no cap but the
    reranker's own length)."""
    if requested is None:
        return settings.max_tokens_per_doc or None
    if requested < 1:
        raise InvalidArgument(
            f"max_tokens_per_doc must be at least 1 (got {requested}); leave it out for the "
            "server's default"
        )
    return int(requested)


def reading(requested: int | None, settings: Settings) -> Reading:
    """How many windows of each document the reranker reads: the request's, else the
    server's."""
    windows = bounded(
        "max_chunks_per_doc",
        requested,
        default=settings.max_chunks_per_doc,
        limit=settings.max_chunks_per_doc_limit,
    )
    return Reading(max_windows=windows, overlap=settings.window_overlap)


def min_rerank(requested: int | None, settings: Settings) -> int:
    """How many candidates a budgeted call must get reranked, or be refused: the request's,
    else the server's (0: answer whatever the budget allowed)."""
    if requested is None:
        return settings.min_rerank
    if requested < 0:
        raise InvalidArgument(f"min_rerank must be >= 0 (got {requested})")
    return int(requested)


def check_search(request: SearchRequest, settings: Settings) -> tuple[int, int]:
    """(recall_k, top_n) with the server's defaults filled in."""
    check_query(request.query)
    if request.metadata_filter:
        finite_json(dict(request.metadata_filter), "metadata_filter")
    recall_k = bounded(
        "recall_k", request.recall_k, default=settings.default_recall_k, limit=settings.max_recall_k
    )
    top_n = bounded(
        "top_n", request.top_n, default=settings.default_top_n, limit=settings.max_top_n
    )
    return recall_k, top_n


def first_stage(
    request: SearchRequest, settings: Settings, *, lexical: bool = True
) -> tuple[FirstStage, Fusion]:
    """The first stage to run, and hybrid's fusion, with the server's defaults filled in.
    ``lexical``: whether the collection has a lexical index; without one, the default falls
    back to dense (a call that names lexical or hybrid is refused by the search)."""
    chosen = request.first_stage or FirstStage(settings.first_stage)
    if request.first_stage is None and not lexical:
        chosen = FirstStage.DENSE
    weights = {
        "dense_weight": settings.dense_weight if request.dense_weight is None
        else request.dense_weight,
        "lexical_weight": settings.lexical_weight if request.lexical_weight is None
        else request.lexical_weight,
    }  # fmt: skip
    for name, weight in weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise InvalidArgument(f"{name} must be a finite number >= 0 (got {weight})")
    if chosen is FirstStage.HYBRID and sum(weights.values()) <= 0:
        raise InvalidArgument(
            "dense_weight and lexical_weight are both 0: give one a weight, or choose the "
            "dense or lexical first stage"
        )
    return chosen, Fusion(k=settings.rrf_k, **weights)


def check_rerank(request: RerankRequest, settings: Settings) -> int | None:
    """The top_n to return (None: every document)."""
    check_query(request.query)
    count = len(request.documents)
    if count == 0:
        raise InvalidArgument("documents is empty: send at least one text or stored id")
    if count > settings.max_rerank_documents:
        raise InvalidArgument(
            f"{count} documents sent; this server reranks at most "
            f"{settings.max_rerank_documents} per call (max_rerank_documents): "
            "split the call, or raise the limit"
        )
    for position, document in enumerate(request.documents):
        if (document.text is None) == (document.id is None):
            raise InvalidArgument(f"documents[{position}] needs exactly one of text and id")
        if document.text is not None and not document.text.strip():
            raise InvalidArgument(f"documents[{position}].text is empty: send the document's text")
        if document.id is not None:
            check_id(document.id, settings.max_id_bytes)
    if request.top_n is None:
        return None
    return min(bounded("top_n", request.top_n, default=count, limit=settings.max_top_n), count)


def bulk_embed(texts: int, settings: Settings) -> bool:
    """Whether an Embed of ``texts`` texts is index-time work: a pipeline embedding its
    documents through the OpenAI, Cohere or TEI door, with no deadline. Refused for load as a
    query is, such calls failed outright once an SDK's retries ran out (4 workers on 2 cores
    lost 38% of their calls, for no more throughput: RESULTS), and on the query lane they held
    back every search's query. So they wait their turn on the ingest lane, beside upserts.
    An Embed of a few texts is a query a caller waits on: admitted and run as a search's."""
    return texts >= settings.bulk_embed_texts


def check_embed(request: EmbedRequest, settings: Settings) -> None:
    if not request.texts:
        raise InvalidArgument("texts is empty: send at least one")
    if len(request.texts) > settings.max_embed_texts:
        raise InvalidArgument(
            f"{len(request.texts)} texts sent; at most {settings.max_embed_texts} per call "
            "(max_embed_texts)"
        )
    for position, text in enumerate(request.texts):
        if not text.strip():
            raise InvalidArgument(f"texts[{position}] is empty: send the text to embed")


def check_batch(batch: UpsertBatch, settings: Settings) -> None:
    documents = batch.documents
    if not documents:
        raise InvalidArgument(
            "an Upsert message holds no documents: put each one, with its id and text, in "
            "the message's `documents` list"
        )
    if len(documents) > settings.max_upsert_documents:
        raise InvalidArgument(
            f"{len(documents)} documents in one message; at most "
            f"{settings.max_upsert_documents} (max_upsert_documents): send more messages"
        )
    seen: set[str] = set()
    for position, document in enumerate(documents):
        check_id(document.id, settings.max_id_bytes, where=f"documents[{position}]")
        if not document.text.strip():
            raise InvalidArgument(
                f"document {document.id!r} has no text: send the text to index (an empty one "
                "would be found by nothing)"
            )
        if document.id in seen:
            raise InvalidArgument(f"id {document.id!r} appears twice in one message; send it once")
        finite_json(document.metadata, f"the metadata of document {document.id!r}")
        seen.add(document.id)


def check_id(item: str, max_bytes: int, *, where: str = "a document") -> None:
    if not item:
        raise InvalidArgument(f"{where} has an empty id; every document needs one")
    if len(item.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidArgument(f"id {item[:40]!r}… is longer than {max_bytes} bytes (max_id_bytes)")


def unique_ids(ids: Sequence[str], settings: Settings) -> list[str]:
    if not ids:
        raise InvalidArgument("ids is empty: send at least one document id")
    for item in ids:
        check_id(item, settings.max_id_bytes)
    return list(dict.fromkeys(ids))


def budget_seconds(
    requested_ms: int | None, settings: Settings, *, client_remaining_s: float | None
) -> float | None:
    """The rerank budget in seconds (None: no deadline), shrunk to the client's deadline
    less the time to send the reply: a reply that lands after the deadline is thrown away."""
    milliseconds = settings.default_rerank_budget_ms if requested_ms is None else requested_ms
    if milliseconds < 0:
        raise InvalidArgument(f"rerank_budget_ms must be >= 0 (got {milliseconds}); 0 means none")
    budget = milliseconds / 1000 if milliseconds > 0 else None
    if client_remaining_s is not None:
        cap = max(client_remaining_s - REPLY_MARGIN_S, 0.001)
        budget = cap if budget is None else min(budget, cap)
    return budget
