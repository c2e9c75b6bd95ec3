"""Two-stage search: embed the query, take candidates from the index, rerank under a budget.

    query -> bi-encoder (LRU-cached) -> index top recall_k -> cross-encoder -> top_n

Modes: two-stage (default), retrieve-only, and rerank of documents the client names (sent as
text, or stored ids). Reranked hits come first by rerank score; candidates the budget left
unscored follow in stage-1 order, and ``reranked_count`` says how many were scored. A budget
of 0 (or None) means no deadline.

Errors (each maps to one gRPC status in ``server.status``)::

    SearchError
    ├── InvalidRequest     sizes out of range, overlong input with truncate=False
    ├── UnknownDocuments   stored ids that do not exist
    └── NoReranker         a rerank on a retrieve-only server
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from server.batcher import RerankBatcher, Runner
from server.collection import Collection
from server.pairs import PairIds, PairTokenizer, pad_pairs
from tandem.encoders import BiEncoder, CrossEncoder

DEFAULT_RECALL_K = 100
DEFAULT_TOP_N = 5
DEFAULT_BUDGET_S = 0.100
T = TypeVar("T")


class Mode(enum.Enum):
    TWO_STAGE = "two_stage"
    RETRIEVE_ONLY = "retrieve_only"


class SearchError(Exception):
    """A request the pipeline cannot serve as asked."""


class InvalidRequest(SearchError):
    pass


class UnknownDocuments(SearchError):
    pass


class NoReranker(SearchError):
    pass


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
    pairs_truncated: bool = False  # some (query, candidate) pair was cut, returned or not

    @property
    def truncated(self) -> bool:
        return self.query_truncated or self.pairs_truncated


@dataclass(frozen=True)
class Candidate:
    id: str
    text: str
    metadata: dict[str, Any]
    token_ids: NDArray[np.int32]
    stage1_score: float | None


@dataclass(frozen=True)
class DocumentRef:
    """A document to rerank: its text, or the id of a stored one (exactly one is set)."""

    text: str | None = None
    id: str | None = None


class QueryCache:
    """Bounded LRU of query vectors: popular queries skip the bi-encoder."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, tuple[NDArray[np.float32], bool]] = OrderedDict()

    def get(self, query: str) -> tuple[NDArray[np.float32], bool] | None:
        entry = self.items.get(query)
        if entry is not None:
            self.items.move_to_end(query)
        return entry

    def put(self, query: str, entry: tuple[NDArray[np.float32], bool]) -> None:
        if self.capacity <= 0:
            return
        self.items[query] = entry
        self.items.move_to_end(query)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


class Lanes:
    """The threads blocking work runs on, so the event loop only moves messages.

    - ``query``: the bi-encoder for queries and Embed calls;
    - ``ingest``: the bi-encoder and tokenizer for upserts, apart from ``query`` so a large
      upsert never holds a search back;
    - ``store``: the document store and the vector index. Neither is thread-safe, so one
      thread owns both; its calls are short (an index probe, a commit).
    Without executors (``Lanes()``) everything runs inline, as the library tests want.
    """

    def __init__(self, executors: Mapping[str, Executor] | None = None) -> None:
        self.executors = dict(executors or {})
        self.pending = dict.fromkeys(LANE_NAMES, 0)  # calls waiting or running, per lane
        # Seconds per call, per lane (EWMA), so admission can predict a newcomer's wait.
        self.service_seconds = dict.fromkeys(LANE_NAMES, 0.0)

    @classmethod
    def threaded(cls) -> Lanes:
        return cls({name: ThreadPoolExecutor(1, thread_name_prefix=name) for name in LANE_NAMES})

    async def run(self, lane: str, function: Callable[..., T], *args: Any) -> T:
        executor = self.executors.get(lane)
        if executor is None:
            return function(*args)
        self.pending[lane] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, self._timed, lane, function, *args
            )
        finally:
            self.pending[lane] -= 1

    def _timed(self, lane: str, function: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            seconds = time.perf_counter() - started
            self.service_seconds[lane] += 0.1 * (seconds - self.service_seconds[lane])

    def expected_wait(self) -> float:
        """Seconds a call arriving now would queue before its query and store work ran."""
        return sum(self.pending[lane] * self.service_seconds[lane] for lane in ("query", "store"))

    def shutdown(self) -> None:
        for executor in self.executors.values():
            executor.shutdown(wait=True)


LANE_NAMES = ("query", "ingest", "store")


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
        lanes: Lanes | None = None,
    ) -> None:
        self.collection = collection
        self.embedder = embedder
        self.reranker = reranker
        self.pairs = pairs
        self.batcher = batcher
        self.cache = QueryCache(cache_size)
        self.lanes = lanes or Lanes()

    def embed_query(self, query: str) -> tuple[NDArray[np.float32], bool]:
        """(vector, truncated); runs on the query lane, which also owns the cache."""
        entry = self.cache.get(query)
        if entry is None:
            batch = self.embedder.tokenize([query])
            entry = (self.embedder.forward(batch)[0], bool(batch.truncated[0]))
            self.cache.put(query, entry)
        return entry

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
        truncate: bool = True,
    ) -> Result:
        _check_sizes(recall_k=recall_k, top_n=top_n)
        if mode is Mode.TWO_STAGE:
            self._require_reranker()
        timings: dict[str, float] = {}
        arrived = started = time.perf_counter()
        vector, query_truncated = await self.lanes.run("query", self.embed_query, query)
        timings["embed"] = _ms_since(started)
        if query_truncated and not truncate:
            raise InvalidRequest(
                f"the query is longer than the bi-encoder's "
                f"{self.embedder.manifest.max_length} tokens; shorten it, or allow truncate"
            )
        started = time.perf_counter()
        if mode is Mode.RETRIEVE_ONLY and not metadata_filter:
            # Only the returned hits need their documents read: the fast path stays fast.
            candidates, found = await self.lanes.run(
                "store", self._top_candidates, vector, recall_k, top_n
            )
        else:
            candidates = await self.lanes.run(
                "store", self._candidates, vector, recall_k, metadata_filter
            )
            found = len(candidates)
        timings["search"] = _ms_since(started)
        if mode is Mode.RETRIEVE_ONLY:
            hits_out = [
                _hit(candidate, rank, None, include_text=include_text, truncated=False)
                for rank, candidate in enumerate(candidates[:top_n])
            ]
            return Result(hits_out, 0, found, query_truncated, timings)
        return await self._rerank(
            query, candidates, top_n=top_n, budget_s=budget_s, include_text=include_text,
            timings=timings, query_truncated=query_truncated, truncate=True, arrived=arrived,
        )  # fmt: skip

    def _top_candidates(
        self, vector: NDArray[np.float32], recall_k: int, top_n: int
    ) -> tuple[list[Candidate], int]:
        """The first ``top_n`` of the ``recall_k`` nearest, and how many there were."""
        hits = self.collection.index.search(vector, recall_k)
        keys = [int(key) for key in hits.keys[:top_n]]
        documents = self.collection.store.by_keys(keys)
        candidates = [
            Candidate(documents[key].id, documents[key].text, documents[key].metadata,
                      documents[key].token_ids, float(similarity))
            for key, similarity in zip(keys, hits.similarities[:top_n], strict=True)
            if key in documents
        ]  # fmt: skip
        return candidates, len(hits.keys)

    def _candidates(
        self, vector: NDArray[np.float32], recall_k: int, metadata_filter: Mapping[str, Any] | None
    ) -> list[Candidate]:
        # A metadata filter drops candidates after the search, so fetch more to keep recall_k.
        fetch = recall_k * 4 if metadata_filter else recall_k
        hits = self.collection.index.search(vector, fetch)
        documents = self.collection.store.by_keys([int(key) for key in hits.keys])
        candidates: list[Candidate] = []
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
        return candidates

    async def rerank(
        self,
        query: str,
        documents: Sequence[DocumentRef],
        *,
        top_n: int | None = None,
        budget_s: float | None = DEFAULT_BUDGET_S,
        include_text: bool = True,
        truncate: bool = True,
    ) -> Result:
        """Reranks documents the client names, sent as text or as stored ids, in any mix.

        ``top_n`` None returns every document. Hit ids are stored ids, or the position in
        ``documents`` for texts."""
        _check_sizes(recall_k=max(len(documents), 1), top_n=1 if top_n is None else top_n)
        pairs = self._require_reranker()
        arrived = time.perf_counter()
        timings: dict[str, float] = {}
        wanted = [ref.id for ref in documents if ref.id is not None]
        stored = {}
        if wanted:
            started = time.perf_counter()
            # Resolved on the store lane: a replica may swap its collection (server.follow).
            stored = await self.lanes.run("store", lambda: self.collection.get(wanted))
            timings["search"] = _ms_since(started)
            missing = list(dict.fromkeys(item for item in wanted if item not in stored))
            if missing:
                raise UnknownDocuments(
                    f"{len(missing)} document ids are not stored: "
                    f"{', '.join(map(repr, missing[:5]))}{' …' if len(missing) > 5 else ''}"
                )
        started = time.perf_counter()
        texts = [ref.text for ref in documents if ref.text is not None]
        text_ids = iter(pairs.tokenize(texts)) if texts else iter(())
        candidates = []
        for position, ref in enumerate(documents):
            if ref.id is not None:
                document = stored[ref.id]
                candidates.append(
                    Candidate(ref.id, document.text, document.metadata, document.token_ids, None)
                )
            else:
                candidates.append(
                    Candidate(str(position), ref.text or "", {}, next(text_ids), None)
                )
        timings["tokenize"] = _ms_since(started)
        return await self._rerank(
            query, candidates, top_n=len(candidates) if top_n is None else top_n,
            budget_s=budget_s, include_text=include_text, timings=timings,
            query_truncated=False, truncate=truncate, arrived=arrived,
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
        refs = [DocumentRef(text=text) for text in documents]
        return await self.rerank(query, refs, top_n=top_n, budget_s=budget_s)

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
        refs = [DocumentRef(id=item) for item in ids]
        return await self.rerank(
            query, refs, top_n=top_n, budget_s=budget_s, include_text=include_text
        )

    def _require_reranker(self) -> PairTokenizer:
        if self.pairs is None or self.batcher is None:
            raise NoReranker(
                "no reranker is loaded: this server is retrieve-only "
                "(use SEARCH_MODE_RETRIEVE_ONLY, or start it with a reranker)"
            )
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
        truncate: bool,
        arrived: float,
    ) -> Result:
        pairs = self._require_reranker()
        assert self.batcher is not None
        if budget_s is not None and budget_s < 0:
            raise InvalidRequest(f"the rerank budget must be >= 0 (got {budget_s}); 0 means none")
        deadline = None if not budget_s else arrived + budget_s
        started = time.perf_counter()
        query_ids = pairs.tokenize([query])[0]
        joined = pairs.join(query_ids, [candidate.token_ids for candidate in candidates])
        timings["tokenize"] = timings.get("tokenize", 0.0) + _ms_since(started)
        cut = [i for i, pair in enumerate(joined) if pair.truncated]
        if cut and not truncate:
            raise InvalidRequest(
                f"{len(cut)} (query, document) pairs are longer than the reranker's "
                f"{pairs.template.max_length} tokens (first: document {cut[0]}); shorten them, "
                "or allow truncate"
            )
        # The budget runs from the call's arrival, so embedding and search time count against
        # it: a caller's 100 ms means 100 ms of latency, not 100 ms after the index answers.
        remaining = None if deadline is None else max(deadline - time.perf_counter(), 1e-6)
        outcome = await self.batcher.score(joined, budget=remaining)
        timings["queue"] = outcome.queue_seconds * 1000
        timings["rerank"] = outcome.run_seconds * 1000
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
        return Result(hits, int(scored.sum()), len(candidates), query_truncated, timings, bool(cut))


def make_runner(reranker: CrossEncoder) -> Runner:
    """The batcher's runner: pad the joined pairs and run the cross-encoder session."""

    def run(pairs: Sequence[PairIds]) -> NDArray[np.float32]:
        return reranker.forward(pad_pairs(pairs, pad_id=reranker.pad_id))

    return run


def _check_sizes(*, recall_k: int, top_n: int) -> None:
    if recall_k < 1:
        raise InvalidRequest(f"recall_k must be at least 1 (got {recall_k})")
    if top_n < 1:
        raise InvalidRequest(f"top_n must be at least 1 (got {top_n})")


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
