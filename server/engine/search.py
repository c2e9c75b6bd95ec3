"""Two-stage search: take candidates from the indexes, rerank them under a budget.

    query -> bi-encoder (LRU-cached) -> vector index  top recall_k ┐
          -> analyzer                -> BM25 index    top recall_k ┴ RRF -> cross-encoder -> top_n

The first stage is dense (the vector index), lexical (BM25) or hybrid (each side's best
recall_k, fused by reciprocal rank fusion, cut to recall_k); see ``fusion``.

Modes: two-stage (default), retrieve-only, and rerank of documents the client names (sent as
text, or stored ids). A document longer than one reranker pair is read in overlapping windows
and takes its best window's score (``windows``). Reranked hits come first by rerank score;
candidates the budget left unscored follow in stage-1 order, and ``reranked_count`` says how
many were scored. A budget of 0 (or None) means no deadline; it counts from ``arrived``, the
call's arrival.

The ``Searcher`` takes requests that ``tandem.server.engine.requests`` has validated; the
errors it raises itself depend on the data (a stored id that does not exist, an overlong
query with truncate off) and come from ``tandem.server.engine.errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tandem.encoders import BiEncoder, CrossEncoder
from tandem.server.engine.batcher import RerankBatcher, Runner
from tandem.server.engine.collection import Collection
from tandem.server.engine.errors import FailedPrecondition, InvalidArgument, NotFound
from tandem.server.engine.filters import MetadataFilter, parse_filter
from tandem.server.engine.fusion import (
    FirstStage,
    Fusion,
    Ranked,
    reciprocal_rank_fusion,
    single,
)
from tandem.server.engine.index import fold_passages
from tandem.server.engine.lanes import Lanes
from tandem.server.engine.pairs import PairIds, PairTokenizer, Windows, pad_pairs
from tandem.server.engine.store import DocumentStore
from tandem.server.engine.windows import DocumentScore, Reading, best_per_document, interleave

DEFAULT_RECALL_K = 100
DEFAULT_TOP_N = 5
DEFAULT_BUDGET_S = 0.100
# A filtered search first looks at this many times recall_k nearest vectors. When fewer than
# recall_k of them match, the filter is selective and the search counts every match instead.
FILTER_OVERFETCH = 4
# Up to this many matching documents, a filtered search scores them all exactly (a numpy
# product over their stored vectors: ~10 ms for 50,000 x 384 on 2 cores) rather than widen
# an approximate search that would have to visit most of the graph to find them.
EXACT_FILTER_MAX = 50_000
# A budgeted call reads (tokenizes, cuts into windows) only the candidates its budget could
# reach: until their first windows hold READ_AHEAD times the tokens the model could score in
# the time left at its current rate (what is past it would come back unscored anyway, and
# tokenizing all 890 RAG24 passages of one Rerank took 220-250 ms on 2 cores, over twice the
# default budget). More than once over, because the rate is a moving average that a slow spell
# inflates, and because near the deadline the batcher fills its last batch with whichever
# queued pairs still fit: a longer queue gives it more to choose from. A stored candidate
# whose ids serve as they are costs microseconds to read, so more of those are read: at 2x,
# Search reranked fewer than reading every candidate (2% on an idle machine, ~10% on a busy
# one; RESULTS), at 8x as many.
READ_AHEAD = 2.0
READ_AHEAD_STORED = 8.0
# Candidates tokenized at once when reading ahead: few enough that the first chunk stays
# near what a CPU's budget reaches (about 5 RAG24 passages in 100 ms on 2 cores), enough
# that the tokenizer's cost per call stays small.
READ_CHUNK = 8
# A candidate past a budget's reach: not tokenized, so no pairs, and not known to be cut.
UNREAD = Windows((), cut=False)


# Rerankers have one output logit (the export refuses others); the sigmoid maps it into
# [0, 1], as sentence-transformers' CrossEncoder does by default and Cohere's scores read.
SCORE_ACTIVATION = "sigmoid"


def sigmoid(logit: float) -> float:
    # Written so that neither branch overflows math.exp for a large logit of either sign.
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    odds = math.exp(logit)
    return odds / (1.0 + odds)


class Mode(enum.Enum):
    TWO_STAGE = "two_stage"
    RETRIEVE_ONLY = "retrieve_only"


class UnknownDocuments(NotFound):
    """A Rerank names stored ids that do not exist."""


class NoReranker(FailedPrecondition):
    """A rerank asked of a retrieve-only server."""


class NoLexicalIndex(FailedPrecondition):
    """A lexical or hybrid first stage asked of a collection without a lexical index."""


@dataclass(frozen=True)
class Passage:
    """The window whose score a reranked document took: characters ``start`` to ``end`` of
    its text (Python string indices: Unicode code points), which of its ``windows`` it was,
    and how many of them were scored within the budget."""

    start: int
    end: int
    window: int
    windows: int
    windows_scored: int

    @property
    def partly_scored(self) -> bool:
        return self.windows_scored < self.windows

    def fields(self) -> dict[str, Any]:
        """Its fields as both transports name them (``partly_scored`` included)."""
        return {**asdict(self), "partly_scored": self.partly_scored}


@dataclass(frozen=True)
class Hit:
    id: str
    text: str | None
    metadata: dict[str, Any]
    # Cosine (dense), BM25 (lexical) or the RRF score (hybrid); None where the client sent
    # the document.
    stage1_score: float | None
    stage1_rank: int  # 0-based position among the candidates before reranking
    rerank_score: float | None  # None where the budget ran out first
    truncated: bool = False  # some of the document (or the query) was in no scored window
    dense_rank: int | None = None  # 0-based, in the dense side's ranking; None: not found there
    lexical_rank: int | None = None
    passage: Passage | None = None  # the window that earned the score; None: not reranked

    @property
    def reranked(self) -> bool:
        return self.rerank_score is not None

    @property
    def score(self) -> float:
        """The rerank score where reranked, else the stage-1 score (0.0 for a document the
        client sent, which has none)."""
        if self.rerank_score is not None:
            return self.rerank_score
        return self.stage1_score if self.stage1_score is not None else 0.0

    @property
    def probability(self) -> float | None:
        """The rerank score through ``SCORE_ACTIVATION``, in [0, 1]."""
        return None if self.rerank_score is None else sigmoid(self.rerank_score)


@dataclass(frozen=True)
class Result:
    hits: list[Hit]
    reranked_count: int
    candidates: int
    query_truncated: bool
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Some (query, candidate) pair was cut, returned or not; of a budgeted call's candidates,
    # those past the budget's reach are never tokenized, so they cannot say (``READ_AHEAD``).
    pairs_truncated: bool = False
    # With a metadata filter: the documents known to match it (every one in the collection
    # when the filter was selective enough to count them), else None.
    filter_matched: int | None = None
    first_stage: FirstStage | None = None  # None: no index was searched (a Rerank)
    dense_candidates: int = 0  # candidates the dense side found (both sides: counted in each)
    lexical_candidates: int = 0
    reranker_id: str = ""  # the model that scored the hits; "" where none was reranked
    # Tokens of every pair the reranker scored (query, document and special tokens): what
    # Infinity's and Jina's shapes report as usage.
    pair_tokens: int = 0

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
    dense_rank: int | None = None
    lexical_rank: int | None = None


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


@dataclass(eq=False)
class RerankerSlot:
    """The reranker, its pair tokenizer and its batcher, taken together once per call: a
    reranker published to a running server (``Engine.swap_reranker``) puts a new slot in
    place while the calls holding the old one finish on it, so one reply is never scored by
    two models. ``id`` names the model in replies and Info."""

    reranker: CrossEncoder | None
    pairs: PairTokenizer
    batcher: RerankBatcher
    id: str = ""
    users: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @contextlib.contextmanager
    def held(self) -> Iterator[RerankerSlot]:
        self.users += 1
        try:
            yield self
        finally:
            self.users -= 1
            if not self.users:
                self.idle.set()

    async def drained(self) -> None:
        """Returns once no call holds this slot (none can take it after a swap)."""
        while self.users:
            self.idle.clear()
            await self.idle.wait()


class FilterScope:
    """One call's metadata filter, and what is known of which documents pass it: every one,
    once counted (``count``); until then, each document looked at, by reading its metadata
    (never the rest of its row) once, whichever side of stage 1 looks again."""

    def __init__(self, wanted: MetadataFilter, store: DocumentStore) -> None:
        self.wanted = wanted
        self.store = store
        self.matching: set[int] | None = None
        self.verdicts: dict[int, bool] = {}

    def passing(
        self, keys: Sequence[int], scores: Sequence[float]
    ) -> tuple[list[int], list[float]]:
        """``keys`` (with their ``scores``) that pass, in order."""
        pairs = zip(keys, scores, strict=True)
        if self.matching is not None:
            kept = [(key, score) for key, score in pairs if key in self.matching]
        else:
            unseen = [key for key in keys if key not in self.verdicts]
            passing = self.store.passing(unseen, self.wanted)
            for key in unseen:
                self.verdicts[key] = key in passing
            kept = [(key, score) for key, score in pairs if self.verdicts[key]]
        return [key for key, _ in kept], [score for _, score in kept]

    def count(self) -> set[int]:
        """Every document that passes (a scan of the store's metadata, once per call)."""
        if self.matching is None:
            self.matching = set(self.store.keys_matching(self.wanted))
        return self.matching

    @property
    def known_matching(self) -> int:
        """How many documents are known to pass: all of them, once counted."""
        if self.matching is not None:
            return len(self.matching)
        return sum(self.verdicts.values())


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
        self.slot = (
            RerankerSlot(reranker, pairs, batcher, reranker_id(reranker))
            if pairs is not None and batcher is not None
            else None
        )
        self.cache = QueryCache(cache_size)
        self.lanes = lanes or Lanes()

    @property
    def reranker(self) -> CrossEncoder | None:
        return None if self.slot is None else self.slot.reranker

    @property
    def pairs(self) -> PairTokenizer | None:
        return None if self.slot is None else self.slot.pairs

    @property
    def batcher(self) -> RerankBatcher | None:
        return None if self.slot is None else self.slot.batcher

    def embed_query(self, query: str) -> tuple[NDArray[np.float32], bool]:
        """(vector, truncated); runs on the query lane, which also owns the cache."""
        entry = self.cache.get(query)
        if entry is None:
            batch = self.embedder.tokenize([query], prompt=self.embedder.prompt(role="query"))
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
        arrived: float | None = None,
        max_tokens_per_doc: int | None = None,
        min_rerank: int = 0,
        first_stage: FirstStage = FirstStage.DENSE,
        fusion: Fusion | None = None,
        reading: Reading | None = None,
    ) -> Result:
        """``arrived``: when the call arrived (``time.perf_counter()``); the budget counts
        from it. None: from now. ``max_tokens_per_doc`` cuts each candidate to that many
        tokens before it is paired with the query: shorter pairs, so more of them within
        the budget. ``min_rerank``: refuse (``TooShallow``) rather than rerank fewer.
        ``metadata_filter``: the language of ``filters`` (``InvalidFilter`` if unreadable)."""
        if mode is Mode.TWO_STAGE:
            self._require_reranker()
        wanted = parse_filter(metadata_filter)
        timings: dict[str, float] = {}
        arrived = time.perf_counter() if arrived is None else arrived
        vector, query_truncated = None, False
        if first_stage is not FirstStage.LEXICAL:
            started = time.perf_counter()
            vector, query_truncated = await self.lanes.run("query", self.embed_query, query)
            timings["embed"] = ms_since(started)
            if query_truncated and not truncate:
                raise InvalidArgument(
                    f"the query is longer than the bi-encoder's "
                    f"{self.embedder.manifest.max_length} tokens; shorten it, or allow truncate"
                )
        started = time.perf_counter()
        # Only the returned hits need their documents read when nothing is reranked.
        keep = top_n if mode is Mode.RETRIEVE_ONLY else recall_k
        candidates, ranked, matched = await self.lanes.run(
            "store", self._stage1, query, vector, first_stage, recall_k, wanted,
            fusion or Fusion(), keep,
        )  # fmt: skip
        timings["search"] = ms_since(started)
        if mode is Mode.RETRIEVE_ONLY:
            hits_out = [
                _hit(candidate, rank, None, include_text=include_text, truncated=False)
                for rank, candidate in enumerate(candidates[:top_n])
            ]
            result = Result(hits_out, 0, len(ranked), query_truncated, timings)
        else:
            result = await self._rerank(
                query, candidates, top_n=top_n, budget_s=budget_s, include_text=include_text,
                timings=timings, query_truncated=query_truncated, truncate=True,
                arrived=arrived, document_cap=max_tokens_per_doc, min_rerank=min_rerank,
                reading=reading or Reading(),
            )  # fmt: skip
        return replace(
            result,
            first_stage=first_stage,
            dense_candidates=ranked.dense_count,
            lexical_candidates=ranked.lexical_count,
            filter_matched=matched,
        )

    def _stage1(
        self,
        query: str,
        vector: NDArray[np.float32] | None,
        first_stage: FirstStage,
        recall_k: int,
        wanted: MetadataFilter | None,
        fusion: Fusion,
        keep: int,
    ) -> tuple[list[Candidate], Ranked, int | None]:
        """Stage 1 on the store lane: the ranking, the first ``keep`` of it as candidates
        (their documents read), and how many documents match the filter, where known."""
        dense = lexical = None
        scope = None if wanted is None else FilterScope(wanted, self.collection.store)
        if vector is not None:
            keys, scores = self._dense(vector, recall_k, scope)
            dense = single(keys, scores, FirstStage.DENSE)
        if first_stage is not FirstStage.DENSE:
            keys, scores = self._lexical(query, recall_k, scope)
            lexical = single(keys, scores, FirstStage.LEXICAL)
        if dense is not None and lexical is not None:
            ranked = reciprocal_rank_fusion(dense.keys, lexical.keys, fusion, limit=recall_k)
        else:
            ranked = dense or lexical or single([], [], first_stage)
        matched = None if scope is None else scope.known_matching
        return self._documents(ranked.head(keep)), ranked, matched

    def _dense(
        self, vector: NDArray[np.float32], recall_k: int, scope: FilterScope | None
    ) -> tuple[list[int], list[float]]:
        if scope is not None:
            return self._filtered(vector, recall_k, scope)
        hits = self.collection.index.search_documents(vector, recall_k)
        return [int(key) for key in hits.keys], hits.similarities.tolist()

    def _lexical(
        self, query: str, recall_k: int, scope: FilterScope | None
    ) -> tuple[list[int], list[float]]:
        """The ``recall_k`` best documents by BM25 that match the filter. Only documents
        holding a query term are ranked at all, so widening until enough pass, or until
        every such document was seen, stays bounded."""
        index = self.collection.lexical
        if index is None:
            raise NoLexicalIndex(
                "this server has no lexical index (tantivy could not be imported; its log "
                "says why): use first_stage dense"
            )
        fetch = recall_k if scope is None else min(recall_k * FILTER_OVERFETCH, len(index))
        while True:
            hits = index.search(query, fetch)
            keys, scores = [int(key) for key in hits.keys], hits.similarities.tolist()
            if scope is not None:
                keys, scores = scope.passing(keys, scores)
            done = len(keys) >= recall_k or len(hits.keys) < fetch or fetch >= len(index)
            if scope is None or done:
                return keys[:recall_k], scores[:recall_k]
            # Widen by what the share that passed predicts (with room to spare). Where that
            # reaches most of the index, count every match first: each wider look is then a
            # set look-up, not a read of every hit's metadata.
            predicted = recall_k * len(hits.keys) * 2 // max(len(keys), 1)
            if predicted * 2 >= len(index):
                scope.count()
            fetch = min(len(index), max(fetch * 2, predicted))

    def _documents(self, ranked: Ranked) -> list[Candidate]:
        documents = self.collection.store.by_keys(ranked.keys)
        return [
            Candidate(documents[key].id, documents[key].text, documents[key].metadata,
                      documents[key].token_ids, float(score), dense_rank, lexical_rank)
            for key, score, dense_rank, lexical_rank in zip(
                ranked.keys, ranked.scores, ranked.dense_ranks, ranked.lexical_ranks, strict=True
            )
            if key in documents
        ]  # fmt: skip

    def _filtered(
        self, vector: NDArray[np.float32], recall_k: int, scope: FilterScope
    ) -> tuple[list[int], list[float]]:
        """The ``recall_k`` nearest documents that match the filter. Exact: fewer than
        ``recall_k`` come back only when fewer match at all."""
        index = self.collection.index
        total = len(index)
        fetch = min(recall_k * FILTER_OVERFETCH, total)
        keys, scores = self._matching(vector, fetch, recall_k, scope)
        if len(keys) == recall_k or fetch >= total:
            return keys, scores
        candidates = scope.count()
        if len(candidates) <= EXACT_FILTER_MAX:
            return self._exact(vector, sorted(candidates), recall_k)
        while len(keys) < recall_k and fetch < total:
            # Enough matches are spread through the graph: widen by what the match rate
            # predicts (with room to spare) rather than a step at a time.
            fetch = min(total, max(fetch * 2, recall_k * total // len(candidates) * 2))
            keys, scores = self._matching(vector, fetch, recall_k, scope)
        return keys, scores

    def _matching(
        self, vector: NDArray[np.float32], fetch: int, recall_k: int, scope: FilterScope
    ) -> tuple[list[int], list[float]]:
        hits = self.collection.index.search_documents(vector, fetch)
        keys, scores = scope.passing(hits.keys.tolist(), hits.similarities.tolist())
        return keys[:recall_k], scores[:recall_k]

    def _exact(
        self, vector: NDArray[np.float32], keys: Sequence[int], recall_k: int
    ) -> tuple[list[int], list[float]]:
        """Cosine against every stored passage of the documents ``keys``; the best
        ``recall_k`` documents, each by its best passage."""
        if not keys:
            return [], []
        batches = list(self.collection.store.vectors(self.collection.index.ndim, list(keys)))
        all_keys = np.concatenate([batch_keys for batch_keys, _ in batches])
        vectors = np.concatenate([batch_vectors for _, batch_vectors in batches])
        query = np.asarray(vector, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
        similarities = (vectors @ query / np.maximum(norms, 1e-12)).astype(np.float32)
        best = fold_passages(all_keys, similarities)
        return best.keys[:recall_k].tolist(), best.similarities[:recall_k].tolist()

    async def rerank(
        self,
        query: str,
        documents: Sequence[DocumentRef],
        *,
        top_n: int | None = None,
        budget_s: float | None = DEFAULT_BUDGET_S,
        include_text: bool = True,
        truncate: bool = True,
        arrived: float | None = None,
        max_tokens_per_doc: int | None = None,
        min_rerank: int = 0,
        reading: Reading | None = None,
    ) -> Result:
        """Reranks documents the client names, sent as text or as stored ids, in any mix.

        ``top_n`` None returns every document. Hit ids are stored ids, or the position in
        ``documents`` for texts. ``max_tokens_per_doc`` cuts each document to that many
        tokens before it is paired with the query."""
        self._require_reranker()
        arrived = time.perf_counter() if arrived is None else arrived
        timings: dict[str, float] = {}
        wanted = [ref.id for ref in documents if ref.id is not None]
        stored = {}
        if wanted:
            started = time.perf_counter()
            # Resolved on the store lane: a replica may swap its collection (replication.follow).
            stored = await self.lanes.run("store", lambda: self.collection.get(wanted))
            timings["search"] = ms_since(started)
            missing = list(dict.fromkeys(item for item in wanted if item not in stored))
            if missing:
                raise UnknownDocuments(
                    f"{len(missing)} document ids are not stored: "
                    f"{', '.join(map(repr, missing[:5]))}{' …' if len(missing) > 5 else ''}"
                )
        candidates = []
        for position, ref in enumerate(documents):
            if ref.id is not None:
                document = stored[ref.id]
                candidates.append(
                    Candidate(ref.id, document.text, document.metadata, document.token_ids, None)
                )
            else:
                # Token ids are filled in on the pairs lane, with the query's.
                empty = np.zeros(0, dtype=np.int32)
                candidates.append(Candidate(str(position), ref.text or "", {}, empty, None))
        return await self._rerank(
            query, candidates, top_n=len(candidates) if top_n is None else top_n,
            budget_s=budget_s, include_text=include_text, timings=timings,
            query_truncated=False, truncate=truncate, arrived=arrived,
            client_texts=[ref.id is None for ref in documents], document_cap=max_tokens_per_doc,
            min_rerank=min_rerank, reading=reading or Reading(),
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

    def _require_reranker(self) -> RerankerSlot:
        if self.slot is None:
            raise NoReranker(
                "no reranker is loaded: this server is retrieve-only "
                "(use SEARCH_MODE_RETRIEVE_ONLY, or start it with a reranker)"
            )
        return self.slot

    @staticmethod
    def _windows(
        pairs: PairTokenizer,
        query: str,
        candidates: Sequence[Candidate],
        client_texts: Sequence[bool],
        document_cap: int | None,
        reading: Reading,
        stored_cap: int,
        reach: int | None = None,
        at_least: int = 0,
    ) -> list[Windows]:
        """Tokenizes the query and the texts that need it, then cuts each document into
        windows (the pairs lane). With ``reach`` (the tokens the model could score in the
        time left), candidates are read in order only until their first windows hold
        ``READ_AHEAD`` times that many (``READ_AHEAD_STORED`` for stored ids that need no
        tokenizer), and at least ``at_least`` of them: returns the windows of the read ones,
        a prefix of ``candidates``. A stored
        document keeps at most ``stored_cap`` ids (the collection's ``token_cap``); one cut
        there is tokenized again whole only when the windows asked for could read past the
        cut."""
        tokenize = pairs.tokenize_whole if reading.max_windows > 1 else pairs.tokenize
        query_ids = pairs.tokenize([query])[0]

        def needs_text(i: int) -> bool:
            return client_texts[i] or not pairs.complete_enough(
                len(candidates[i].token_ids), stored_cap, max_windows=reading.max_windows
            )

        read: list[Windows] = []
        reached = 0.0  # of ``reach``: each first window's tokens over its read-ahead
        while len(read) < len(candidates) and (
            reach is None or reached < reach or len(read) < at_least
        ):
            size = _chunk(len(candidates), len(read), reached, reach, at_least)
            chunk = range(len(read), len(read) + size)
            again = [i for i in chunk if needs_text(i)]
            texts = tokenize([candidates[i].text for i in again]) if again else []
            tokenized = dict(zip(again, texts, strict=True))
            for i in chunk:
                windows = pairs.template.windows(
                    query_ids,
                    tokenized.get(i, candidates[i].token_ids),
                    document_cap=document_cap,
                    max_windows=reading.max_windows,
                    overlap=reading.overlap,
                )
                read.append(windows)
                ahead = READ_AHEAD if i in tokenized else READ_AHEAD_STORED
                reached += len(windows.pairs[0]) / ahead
        return read

    @staticmethod
    def _passages(
        pairs: PairTokenizer,
        candidates: Sequence[Candidate],
        read: Sequence[Windows],
        best: Sequence[DocumentScore],
        shown: Sequence[int],
    ) -> dict[int, Passage]:
        """The winning window of each shown document, in characters of its text (the pairs
        lane: a document read in part is tokenized again for its tokens' spans)."""
        passages = {}
        for i in shown:
            if best[i].score is None:
                continue
            window = read[i].pairs[best[i].window]
            text = candidates[i].text
            whole = not read[i].cut and len(read[i].pairs) == 1
            start, end = (0, len(text)) if whole else pairs.span(text, window.start, window.end)
            passages[i] = Passage(start, end, best[i].window, best[i].windows, best[i].scored)
        return passages

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
        client_texts: Sequence[bool] | None = None,
        document_cap: int | None = None,
        min_rerank: int = 0,
        reading: Reading | None = None,
    ) -> Result:
        # The slot is taken once: a reranker swapped in meanwhile serves the next call, and
        # this one is scored, start to end, by the model it took.
        reading = reading or Reading()
        with self._require_reranker().held() as slot:
            pairs = slot.pairs
            deadline = None if not budget_s else arrived + budget_s
            sent = client_texts if client_texts is not None else [False] * len(candidates)
            read, best, pair_tokens = await self._score_within(
                slot, query, candidates, sent, deadline=deadline, truncate=truncate,
                document_cap=document_cap, min_rerank=min_rerank, reading=reading,
                timings=timings,
            )  # fmt: skip
            ranking = sorted(
                range(len(candidates)),
                key=lambda i: (0, -(best[i].score or 0.0), i) if best[i].score is not None
                else (1, 0.0, i),
            )  # fmt: skip
            shown = ranking[:top_n]
            spans = (pairs, candidates, read, best, shown)
            # Spans of documents read whole need no tokenizer: no hop to the pairs lane.
            passages = (
                await self.lanes.run("pairs", self._passages, *spans)
                if any(read[i].cut or len(read[i].pairs) > 1 for i in shown)
                else self._passages(*spans)
            )
            hits = [
                _hit(
                    candidates[i],
                    i,
                    best[i].score,
                    include_text=include_text,
                    truncated=read[i].cut,
                    passage=passages.get(i),
                )
                for i in shown
            ]
            reranked = sum(1 for document in best if document.score is not None)
            cut = any(windows.cut for windows in read)
            return Result(
                hits, reranked, len(candidates), query_truncated, timings, cut,
                reranker_id=slot.id, pair_tokens=pair_tokens,
            )  # fmt: skip

    async def _score_within(
        self,
        slot: RerankerSlot,
        query: str,
        candidates: Sequence[Candidate],
        sent: Sequence[bool],
        *,
        deadline: float | None,
        truncate: bool,
        document_cap: int | None,
        min_rerank: int,
        reading: Reading,
        timings: dict[str, float],
    ) -> tuple[list[Windows], list[DocumentScore], int]:
        """Reads the candidates in order and scores their pairs by the deadline, in rounds:
        each reads what the time left can reach (``_windows``) and scores it, and one
        whose pairs all scored with time to spare (the rate was overestimated) reads on.
        Returns each candidate's windows (``UNREAD`` past the last round), its best score,
        and the tokens of the pairs scored.

        A later round's documents queue after the earlier rounds' later windows, so under
        MaxP "every first window before any second one" holds within a round."""
        read: list[Windows] = []
        order: list[tuple[int, int]] = []
        scores: list[NDArray[np.float32]] = []
        timings.update(tokenize=0.0, queue=0.0, rerank=0.0)
        while len(read) < len(candidates):
            started = time.perf_counter()
            # Without truncate every candidate is read: one cut anywhere refuses the call.
            reach = None
            if deadline is not None and truncate:
                within = slot.batcher.tokens_within(deadline - started)
                if read and within * len(read) < sum(len(w.pairs[0]) for w in read):
                    break  # not one more pair of the mean length fits
                # At least one batch, whatever the rate says.
                reach = max(within, slot.batcher.limits.max_batch_tokens)
            done = len(read)
            more = await self.lanes.run(
                "pairs", self._windows, slot.pairs, query, candidates[done:], sent[done:],
                document_cap, reading, self.collection.token_cap, reach, min_rerank - done,
            )  # fmt: skip
            timings["tokenize"] += ms_since(started)
            cut = [done + i for i, windows in enumerate(more) if windows.cut]
            if cut and not truncate:
                raise InvalidArgument(
                    f"{len(cut)} documents do not fit the reranker's {reading.max_windows} "
                    f"windows of {slot.pairs.template.max_length} tokens with the query "
                    f"(first: document {cut[0]}); shorten them, raise max_chunks_per_doc, or "
                    "allow truncate"
                )
            if not more:
                break
            read += more
            round_order = [
                (done + document, window)
                for document, window in interleave([len(windows.pairs) for windows in more])
            ]
            # The budget runs from the call's arrival, so embedding and search time count
            # against it: a caller's 100 ms means 100 ms of latency, not 100 ms after the
            # index answers.
            remaining = None if deadline is None else max(deadline - time.perf_counter(), 1e-6)
            outcome = await slot.batcher.score(
                [read[document].pairs[window] for document, window in round_order],
                budget=remaining,
                min_scored=min_rerank if not done else 0,
            )
            timings["queue"] += outcome.queue_seconds * 1000
            timings["rerank"] += outcome.run_seconds * 1000
            order += round_order
            scores.append(outcome.scores)
            if not outcome.scored.all():
                break  # the budget ran out before the pairs did
        read += [UNREAD] * (len(candidates) - len(read))
        joined = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
        counts = [len(windows.pairs) for windows in read]
        scored = ~np.isnan(joined)
        tokens = sum(
            len(read[document].pairs[window])
            for (document, window), done in zip(order, scored, strict=True)
            if done
        )
        return read, best_per_document(counts, order, joined, scored), tokens


def _chunk(total: int, done: int, reached: float, reach: int | None, at_least: int) -> int:
    """How many candidates to read next: all that are left without a reach; else as many as
    the rest of it takes at the mean read so far, and at least ``READ_CHUNK`` (or what
    ``at_least`` still asks for)."""
    left = total - done
    if reach is None:
        return left
    wanted = max(at_least - done, READ_CHUNK)
    if done:
        wanted = max(wanted, math.ceil((reach - reached) / (reached / done)))
    return min(left, wanted)


def reranker_id(reranker: CrossEncoder | None) -> str:
    """``<artifact folder>@<12 hex of its weights' sha256>``: which model scored a reply."""
    if reranker is None:
        return ""
    return f"{reranker.folder.name}@{reranker.manifest.weights_sha256[:12]}"


def make_runner(reranker: CrossEncoder) -> Runner:
    """The batcher's runner: pad the joined pairs and run the cross-encoder session."""

    def run(pairs: Sequence[PairIds]) -> NDArray[np.float32]:
        return reranker.forward(pad_pairs(pairs, pad_id=reranker.pad_id))

    return run


def _hit(
    candidate: Candidate,
    rank: int,
    score: float | None,
    *,
    include_text: bool,
    truncated: bool,
    passage: Passage | None = None,
) -> Hit:
    return Hit(
        id=candidate.id,
        text=candidate.text if include_text else None,
        metadata=candidate.metadata,
        stage1_score=candidate.stage1_score,
        stage1_rank=rank,
        rerank_score=score,
        truncated=truncated,
        dense_rank=candidate.dense_rank,
        lexical_rank=candidate.lexical_rank,
        passage=passage,
    )


def ms_since(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - started) * 1000
