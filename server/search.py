"""Two-stage search: embed the query, take candidates from the index, rerank under a budget.

    query -> bi-encoder (LRU-cached) -> index top recall_k -> cross-encoder -> top_n

Modes: two-stage (default), retrieve-only, rerank of documents the client sends, and rerank
of stored documents by id. Reranked hits come first by rerank score; candidates the budget
left unscored follow in stage-1 order, and ``reranked_count`` says how many were scored.
A budget of 0 (or None) means no deadline.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from server.batcher import RerankBatcher, Runner
from server.collection import Collection
from server.pairs import JoinedPair, PairTokenizer, pad_pairs
from tandem.encoders import BiEncoder, CrossEncoder

DEFAULT_RECALL_K = 100
DEFAULT_TOP_N = 5
DEFAULT_BUDGET_S = 0.100


class Mode(enum.Enum):
    TWO_STAGE = "two_stage"
    RETRIEVE_ONLY = "retrieve_only"


class SearchError(Exception):
    """A request the pipeline cannot serve as asked (bad sizes, no reranker, unknown ids)."""


@dataclass(frozen=True)
class Hit:
    id: str
    text: str | None
    metadata: dict[str, Any]
    stage1_score: float | None  # cosine similarity; None where the client sent the document
    stage1_rank: int  # 0-based position among the candidates before reranking
    rerank_score: float | None  # None where the budget ran out first
    truncated: bool = False


@dataclass(frozen=True)
class Result:
    hits: list[Hit]
    reranked_count: int
    candidates: int
    query_truncated: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    id: str
    text: str
    metadata: dict[str, Any]
    token_ids: NDArray[np.int32]
    stage1_score: float | None


class QueryCache:
    """Bounded LRU of query vectors: popular queries skip the bi-encoder."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, NDArray[np.float32]] = OrderedDict()

    def get(self, query: str) -> NDArray[np.float32] | None:
        vector = self.items.get(query)
        if vector is not None:
            self.items.move_to_end(query)
        return vector

    def put(self, query: str, vector: NDArray[np.float32]) -> None:
        if self.capacity <= 0:
            return
        self.items[query] = vector
        self.items.move_to_end(query)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


class Searcher:
    def __init__(
        self,
        collection: Collection,
        *,
        embedder: BiEncoder,
        reranker: CrossEncoder | None,
        pairs: PairTokenizer | None,
        batcher: RerankBatcher | None,
        cache_size: int = 10_000,
    ) -> None:
        self.collection = collection
        self.embedder = embedder
        self.reranker = reranker
        self.pairs = pairs
        self.batcher = batcher
        self.cache = QueryCache(cache_size)

    def embed_query(self, query: str) -> tuple[NDArray[np.float32], bool]:
        cached = self.cache.get(query)
        batch = None
        if cached is None:
            batch = self.embedder.tokenize([query])
            cached = self.embedder.forward(batch)[0]
            self.cache.put(query, cached)
        return cached, bool(batch is not None and batch.truncated[0])

    async def search(
        self,
        query: str,
        *,
        recall_k: int = DEFAULT_RECALL_K,
        top_n: int = DEFAULT_TOP_N,
        mode: Mode = Mode.TWO_STAGE,
        budget_s: float | None = DEFAULT_BUDGET_S,
        include_text: bool = True,
        metadata_filter: Mapping[str, Any] | None = None,
    ) -> Result:
        _check_sizes(recall_k=recall_k, top_n=top_n)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        vector, query_truncated = self.embed_query(query)
        timings["embed"] = _ms_since(started)
        started = time.perf_counter()
        # A metadata filter drops candidates after the search, so fetch more to keep recall_k.
        fetch = recall_k * 4 if metadata_filter else recall_k
        hits = self.collection.index.search(vector, fetch)
        documents = self.collection.store.by_keys([int(key) for key in hits.keys])
        candidates = []
        for key, similarity in zip(hits.keys, hits.similarities, strict=True):
            document = documents.get(int(key))
            if document is None or not _matches(document.metadata, metadata_filter):
                continue
            candidates.append(
                Candidate(document.id, document.text, document.metadata, document.token_ids,
                          float(similarity))
            )  # fmt: skip
            if len(candidates) == recall_k:
                break
        timings["search"] = _ms_since(started)
        if mode is Mode.RETRIEVE_ONLY:
            hits_out = [
                _hit(candidate, rank, None, include_text=include_text, truncated=False)
                for rank, candidate in enumerate(candidates[:top_n])
            ]
            return Result(hits_out, 0, len(candidates), query_truncated, timings)
        return await self._rerank(
            query, candidates, top_n=top_n, budget_s=budget_s, include_text=include_text,
            timings=timings, query_truncated=query_truncated,
        )  # fmt: skip

    async def rerank_texts(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int = DEFAULT_TOP_N,
        budget_s: float | None = DEFAULT_BUDGET_S,
    ) -> Result:
        """Reranks documents the client sends (small corpora: no index at all)."""
        _check_sizes(recall_k=max(len(documents), 1), top_n=top_n)
        pairs = self._require_reranker()
        started = time.perf_counter()
        token_ids = pairs.tokenize(documents)
        timings = {"tokenize": _ms_since(started)}
        candidates = [
            Candidate(str(position), text, {}, ids, None)
            for position, (text, ids) in enumerate(zip(documents, token_ids, strict=True))
        ]
        return await self._rerank(
            query, candidates, top_n=top_n, budget_s=budget_s, include_text=True,
            timings=timings, query_truncated=False,
        )  # fmt: skip

    async def rerank_ids(
        self,
        query: str,
        ids: Sequence[str],
        *,
        top_n: int = DEFAULT_TOP_N,
        budget_s: float | None = DEFAULT_BUDGET_S,
        include_text: bool = True,
    ) -> Result:
        """Reranks stored documents by external id, in the order given."""
        _check_sizes(recall_k=max(len(ids), 1), top_n=top_n)
        self._require_reranker()
        found = self.collection.get(ids)
        missing = [item for item in ids if item not in found]
        if missing:
            raise SearchError(f"unknown document ids: {', '.join(map(repr, missing[:5]))}")
        candidates = [
            Candidate(item, found[item].text, found[item].metadata, found[item].token_ids, None)
            for item in ids
        ]
        return await self._rerank(
            query, candidates, top_n=top_n, budget_s=budget_s, include_text=include_text,
            timings={}, query_truncated=False,
        )  # fmt: skip

    def _require_reranker(self) -> PairTokenizer:
        if self.pairs is None or self.batcher is None:
            raise SearchError("no reranker is loaded: this server is retrieve-only")
        return self.pairs

    async def _rerank(
        self,
        query: str,
        candidates: list[Candidate],
        *,
        top_n: int,
        budget_s: float | None,
        include_text: bool,
        timings: dict[str, float],
        query_truncated: bool,
    ) -> Result:
        pairs = self._require_reranker()
        assert self.batcher is not None
        if budget_s is not None and budget_s < 0:
            raise SearchError(f"the rerank budget must be >= 0 (got {budget_s}); 0 means none")
        started = time.perf_counter()
        query_ids = pairs.tokenize([query])[0]
        joined = pairs.join(query_ids, [candidate.token_ids for candidate in candidates])
        timings["tokenize"] = timings.get("tokenize", 0.0) + _ms_since(started)
        outcome = await self.batcher.score(joined, budget=budget_s or None)
        timings["rerank"] = outcome.queue_seconds * 1000
        scored = outcome.scored
        order = sorted(
            range(len(candidates)),
            key=lambda i: (0, -float(outcome.scores[i]), i) if scored[i] else (1, 0.0, i),
        )
        hits = [
            _hit(
                candidates[i],
                i,
                float(outcome.scores[i]) if scored[i] else None,
                include_text=include_text,
                truncated=joined[i].truncated,
            )
            for i in order[:top_n]
        ]
        return Result(hits, int(scored.sum()), len(candidates), query_truncated, timings)


def make_runner(reranker: CrossEncoder) -> Runner:
    """The batcher's runner: pad the joined pairs and run the cross-encoder session."""

    def run(pairs: Sequence[JoinedPair]) -> NDArray[np.float32]:
        return reranker.forward(pad_pairs(pairs, pad_id=reranker.pad_id))

    return run


def _check_sizes(*, recall_k: int, top_n: int) -> None:
    if recall_k < 1:
        raise SearchError(f"recall_k must be at least 1 (got {recall_k})")
    if top_n < 1:
        raise SearchError(f"top_n must be at least 1 (got {top_n})")


def _matches(metadata: Mapping[str, Any], wanted: Mapping[str, Any] | None) -> bool:
    return not wanted or all(metadata.get(key) == value for key, value in wanted.items())


def _hit(
    candidate: Candidate, rank: int, score: float | None, *, include_text: bool, truncated: bool
) -> Hit:
    return Hit(
        id=candidate.id,
        text=candidate.text if include_text else None,
        metadata=candidate.metadata,
        stage1_score=candidate.stage1_score,
        stage1_rank=rank,
        rerank_score=score,
        truncated=truncated,
    )


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
