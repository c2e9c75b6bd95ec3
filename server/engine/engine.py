"""The engine every transport calls: search, rerank, embed, upsert, delete, get, info.

    transport (gRPC, HTTP) -> Engine -> Searcher / Collection -> models, store, index

The engine owns what a call needs besides its wire format: validation
(``tandem.server.engine.requests``), the rerank budget, the threads blocking work runs on
(``Lanes``), the batcher, the collection and its writes, compaction, and the background
tasks (under a ``Supervisor``). A transport admits a call, converts its message into an
engine request, awaits one method here, and converts the result or the ``RequestError`` back.

Each call carries a ``Call``: when it arrived (the budget counts from then) and how long its
client will wait. The engine writes the call's latency target into it, which admission
learns from once the call is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tandem import __version__
from tandem.artifact import Manifest, UnknownPrompt
from tandem.matryoshka import UnsupportedDimensions, served_dimension, truncated
from tandem.runtimes import RuntimeFit
from tandem.server.engine.batcher import RerankBatcher
from tandem.server.engine.collection import Collection
from tandem.server.engine.errors import (
    FailedPrecondition,
    InvalidArgument,
    RequestError,
    Unavailable,
)
from tandem.server.engine.lanes import Lanes
from tandem.server.engine.listing import Listing, ListRequest, PageReader, check_listing
from tandem.server.engine.requests import (
    EmbedRequest,
    FeedbackItem,
    RerankRequest,
    SearchRequest,
    UpsertBatch,
    budget_seconds,
    bulk_embed,
    check_batch,
    check_embed,
    check_feedback,
    check_rerank,
    check_search,
    checked_filter,
    document_cap,
    first_stage,
    min_rerank,
    reading,
    unique_ids,
)
from tandem.server.engine.search import (
    SCORE_ACTIVATION,
    Mode,
    RerankerSlot,
    Result,
    Searcher,
    ms_since,
)
from tandem.server.engine.store import Feedback, StoredDocument
from tandem.server.engine.supervisor import Supervisor
from tandem.server.settings import Settings

log = logging.getLogger(__name__)

# A retrieve-only search has no budget; alone it takes 1-3 ms (RESULTS, serving), so one
# that takes longer than this has queued, and counts as late for the adaptive limit.
RETRIEVE_ONLY_TARGET_S = 0.010
STAGES = ("embed", "search", "tokenize", "queue", "rerank")
MOVER = "rerank-mover"
CHECKPOINTER = "checkpointer"


@dataclass
class Call:
    """One call as its transport saw it arrive."""

    arrived: float = field(default_factory=time.perf_counter)
    client_remaining_s: float | None = None  # until the client's deadline; None: no deadline
    # When the call should have finished, in seconds after ``arrived`` (None: no target);
    # set by the engine once it knows the budget, read by admission after the call.
    latency_target_s: float | None = None

    def elapsed_ms(self) -> float:
        return ms_since(self.arrived)

    def timings(self, stages_ms: Mapping[str, float]) -> dict[str, float]:
        """The reply's timings: milliseconds per stage (zero for stages the call did not
        use) and the total so far, under the field names both transports send."""
        timings = {f"{stage}_ms": stages_ms.get(stage, 0.0) for stage in STAGES}
        timings["total_ms"] = self.elapsed_ms()
        return timings


@dataclass(frozen=True)
class Models:
    """What Info reports about the loaded models."""

    bi_encoder: Manifest
    reranker: Manifest | None
    reranker_is_stand_in: bool
    reranker_since: str = ""  # RFC 3339, UTC: when this reranker started serving
    reranker_version: str = ""  # the models root's version it came from, if it follows one
    bi_encoder_fit: RuntimeFit | None = None  # how each runs on this machine, and why
    reranker_fit: RuntimeFit | None = None


class SwapRefused(FailedPrecondition):
    """A reranker cannot replace the serving one as it is (another tokenizer, none loaded)."""


@dataclass(frozen=True)
class Embedded:
    vectors: NDArray[np.float32]
    truncated: NDArray[np.bool_]
    dimension: int
    timings_ms: dict[str, float]
    tokens: int  # what the bi-encoder read, special tokens included


@dataclass
class Upserted:
    received: int = 0
    inserted: int = 0
    replaced: int = 0
    truncated: int = 0
    generation: int = 0
    timings_ms: dict[str, float] = field(default_factory=lambda: {"embed": 0.0, "search": 0.0})


@dataclass(frozen=True)
class Deleted:
    deleted: int
    not_found: list[str]
    timings_ms: dict[str, float]


@dataclass(frozen=True)
class Fetched:
    documents: list[StoredDocument]  # in request order (a listing: id order)
    not_found: list[str]
    timings_ms: dict[str, float]
    next_page_token: str = ""  # a listing's next page; "" once nothing is left


@dataclass(frozen=True)
class EngineInfo:
    version: str
    models: Models
    settings: Settings
    index_size: int
    lexical_index_size: int
    index_dtype: str
    generation: int
    collection_version: str | None
    read_only: bool
    dimension: int
    query_max_tokens: int
    pair_max_tokens: int  # 0 without a reranker
    score_activation: str  # what maps a rerank logit into [0, 1]; "" without a reranker
    reranker_id: str = ""  # which reranker serves (search.reranker_id); "" without one
    feedback_count: int = 0  # labels recorded by Feedback
    index_vectors: int = 0  # passages in the vector index (index_size counts documents)
    max_passages_per_doc: int = 1  # the collection's (IndexSettings.max_passages)
    passage_overlap_tokens: int = 0

    @property
    def limits(self) -> dict[str, int]:
        """The limits and defaults a client plans against, under the names both transports
        send (the gRPC ``Limits`` message's fields)."""
        settings = self.settings
        return {
            "max_recall_k": settings.max_recall_k,
            "max_top_n": settings.max_top_n,
            "max_rerank_documents": settings.max_rerank_documents,
            "max_embed_texts": settings.max_embed_texts,
            "max_message_bytes": settings.max_message_bytes,
            "max_in_flight": settings.max_in_flight,
            "default_rerank_budget_ms": settings.default_rerank_budget_ms,
            "default_recall_k": settings.default_recall_k,
            "default_top_n": settings.default_top_n,
            "max_upsert_documents": settings.max_upsert_documents,
            "max_id_bytes": settings.max_id_bytes,
            "query_max_tokens": self.query_max_tokens,
            "pair_max_tokens": self.pair_max_tokens,
            "default_max_tokens_per_doc": settings.max_tokens_per_doc,
            "default_min_rerank": settings.min_rerank,
            "default_max_chunks_per_doc": settings.max_chunks_per_doc,
            "max_chunks_per_doc": settings.max_chunks_per_doc_limit,
            "window_overlap_tokens": settings.window_overlap,
            "max_passages_per_doc": self.max_passages_per_doc,
            "passage_overlap_tokens": self.passage_overlap_tokens,
        }


class Engine:
    def __init__(
        self,
        searcher: Searcher,
        *,
        settings: Settings,
        models: Models,
        supervisor: Supervisor | None = None,
        on_search: Callable[[Result], None] | None = None,
    ) -> None:
        """``on_search``: called with every search's result (the server's metrics)."""
        self.searcher = searcher
        self.on_search = on_search
        self.settings = settings
        self.models = models
        self.supervisor = supervisor or Supervisor()
        self.dirty = asyncio.Event()  # the index has changes its file does not
        # Asks the reranker follower to look at its models root now (SIGHUP); a no-op
        # where the server serves one artifact folder.
        self.reload_models: Callable[[], None] = lambda: None
        self.compacting: asyncio.Task[None] | None = None
        self.pages = PageReader()

    @property
    def collection(self) -> Collection:
        # Always the searcher's: a replica swaps it for each published version. Work that
        # runs on the store lane must look it up there, not capture it earlier.
        return self.searcher.collection

    @property
    def lanes(self) -> Lanes:
        return self.searcher.lanes

    def expected_wait(self) -> float:
        """Seconds a call arriving now would queue before its work ran (for admission)."""
        return self.lanes.expected_wait()

    # Lifecycle

    def start(self) -> None:
        """Starts the background tasks under the supervisor (needs a running loop)."""
        batcher = self.searcher.batcher
        if batcher is not None:
            self._run_mover(batcher)
        if not self.collection.read_only:
            self.supervisor.spawn(CHECKPOINTER, self._checkpointer)

    def _run_mover(self, batcher: RerankBatcher) -> asyncio.Task[None] | None:
        """Runs ``batcher``'s mover as the supervised MOVER; returns the one it replaces."""

        def fail_waiting(error: BaseException) -> None:
            failed = batcher.fail_waiting(
                Unavailable(
                    "the reranker's batch scheduler failed while this call waited; it "
                    "is restarting: retry shortly"
                )
            )
            log.error("failed the calls waiting on the reranker", extra={"calls": failed})

        return self.supervisor.replace(MOVER, batcher.run, on_crash=fail_waiting)

    async def swap_reranker(self, slot: RerankerSlot, models: Models) -> str:
        """Serves ``slot`` (loaded, verified and warmed by the caller) from the next call on,
        without a failed call: calls that took the old slot finish on it, then its mover
        stops. Refused (the old one keeps serving) where the collection's documents were
        tokenized by another tokenizer, or no reranker serves now. Returns the old id."""
        old = self.searcher.slot
        if old is None:
            raise SwapRefused(
                "this server started without a reranker (retrieve-only): restart it with one"
            )
        collection = self.collection
        if not slot.pairs.same_ids_as(old.pairs):
            raise SwapRefused(
                f"{slot.id} tokenizes documents differently from the serving reranker, whose "
                "token ids the collection stores: re-index the collection with it (tandem "
                "index build --reranker), or train from the serving reranker's tokenizer"
            )
        # The same architecture as a rule (one base), if not the same length: the old
        # seconds per padded token are the best first guess, and the new runs correct them.
        slot.batcher.cost = old.batcher.cost
        replaced = self._run_mover(slot.batcher)
        self.searcher.slot = slot
        if collection.pairs is not None:
            collection.pairs = slot.pairs
        self.models = models
        await old.drained()
        if replaced is not None:
            replaced.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replaced
        old.batcher.executor.shutdown(wait=False)
        return old.id

    async def stop(self) -> None:
        """Stops the background tasks, saves the index and releases everything."""
        await self.supervisor.stop()
        if self.compacting is not None:
            await asyncio.gather(self.compacting, return_exceptions=True)
        if self.searcher.batcher is not None:
            await self.searcher.batcher.stop()
        collection = self.collection
        try:
            await self.lanes.run("store", collection.checkpoint)
        except (OSError, RuntimeError) as error:
            log.error("final index checkpoint failed (start-up will repair it): %s", error)
        self.lanes.shutdown()
        self.pages.close()
        collection.close()

    async def _checkpointer(self) -> None:
        """Saves the index after writes, at most every ``checkpoint_seconds``. Writes are
        durable in the store before they are acknowledged; this only shortens start-up repair."""
        while True:
            await self.dirty.wait()
            await asyncio.sleep(self.settings.checkpoint_seconds)
            self.dirty.clear()
            collection = self.collection
            try:
                await self.lanes.run("store", collection.checkpoint)
            except (OSError, RuntimeError) as error:
                # A full or read-only disk: the store still holds every acknowledged write,
                # and start-up repairs the index from it; try again after the next write.
                log.error("index checkpoint failed: %s", error)
                continue
            log.debug("index saved", extra={"generation": collection.store.generation})

    def _require_up(self, task: str, what: str) -> None:
        reason = self.supervisor.down.get(task)
        if reason is not None:
            raise Unavailable(f"{what} is down ({reason}) and restarting; retry shortly")

    # Reads

    async def search(self, request: SearchRequest, call: Call) -> Result:
        recall_k, top_n = check_search(request, self.settings)
        stage, fusion = first_stage(
            request, self.settings, lexical=self.collection.lexical is not None
        )
        mode = request.mode
        if mode is None:
            # A server started without a reranker still answers plain searches.
            mode = Mode.TWO_STAGE if self.searcher.batcher is not None else Mode.RETRIEVE_ONLY
        budget_s = None
        if mode is Mode.TWO_STAGE:
            budget_s = self._budget(request.rerank_budget_ms, call)
            self._require_up(MOVER, "the reranker's batch scheduler")
        else:
            call.latency_target_s = RETRIEVE_ONLY_TARGET_S
        result = await self.searcher.search(
            request.query,
            recall_k=recall_k,
            top_n=top_n,
            mode=mode,
            budget_s=budget_s,
            include_text=request.include_text,
            metadata_filter=request.metadata_filter or None,
            truncate=request.truncate,
            arrived=call.arrived,
            max_tokens_per_doc=document_cap(request.max_tokens_per_doc, self.settings),
            min_rerank=min_rerank(request.min_rerank, self.settings),
            first_stage=stage,
            fusion=fusion,
            reading=reading(request.max_chunks_per_doc, self.settings),
        )
        if self.on_search is not None:
            self.on_search(result)
        return result

    async def rerank(self, request: RerankRequest, call: Call) -> Result:
        top_n = check_rerank(request, self.settings)
        budget_s = self._budget(request.rerank_budget_ms, call)
        self._require_up(MOVER, "the reranker's batch scheduler")
        return await self.searcher.rerank(
            request.query,
            request.documents,
            top_n=top_n,
            budget_s=budget_s,
            include_text=request.return_documents,
            truncate=request.truncate,
            arrived=call.arrived,
            max_tokens_per_doc=document_cap(request.max_tokens_per_doc, self.settings),
            min_rerank=min_rerank(request.min_rerank, self.settings),
            reading=reading(request.max_chunks_per_doc, self.settings),
        )

    def _budget(self, requested_ms: int | None, call: Call) -> float | None:
        budget = budget_seconds(
            requested_ms, self.settings, client_remaining_s=call.client_remaining_s
        )
        if budget is not None:
            call.latency_target_s = budget + self.settings.latency_slack_ms / 1000
        return budget

    async def embed(self, request: EmbedRequest, call: Call) -> Embedded:
        check_embed(request, self.settings)
        embedder = self.searcher.embedder
        started = time.perf_counter()
        try:
            prompt = embedder.prompt(request.prompt_name, role=request.role)
            size = served_dimension(request.dimensions, embedder.dimension, embedder.matryoshka)
        except (UnknownPrompt, UnsupportedDimensions) as error:
            raise InvalidArgument(str(error)) from error
        lane = "ingest" if bulk_embed(len(request.texts), self.settings) else "query"
        vectors, cut, tokens = await self.lanes.run(
            lane, lambda: embedder.encode_counted(list(request.texts), prompt=prompt)
        )
        if not request.truncate and cut.any():
            raise InvalidArgument(
                f"texts[{int(np.flatnonzero(cut)[0])}] is longer than the bi-encoder's "
                f"{embedder.manifest.max_length} tokens; shorten it, or allow truncate"
            )
        return Embedded(
            truncated(vectors, size, normalize=embedder.normalizes),
            cut, size, {"embed": ms_since(started)}, tokens,
        )  # fmt: skip

    async def get(self, ids: list[str], call: Call, listing: ListRequest | None = None) -> Fetched:
        """The documents ``ids``; with no ids, a page of the documents ``listing`` keeps."""
        if ids and listing is not None and listing.asked:
            raise InvalidArgument(
                "Get takes ids to look up, or metadata_filter, id_prefix, limit and "
                "page_token to list documents, not both: send one or the other"
            )
        if not ids:
            return await self._listed(check_listing(listing or ListRequest(), self.settings))
        started = time.perf_counter()
        wanted = unique_ids(ids, self.settings)
        found = await self.lanes.run("store", lambda: self.collection.get(wanted))
        return Fetched(
            documents=[found[item] for item in wanted if item in found],
            not_found=[item for item in wanted if item not in found],
            timings_ms={"search": ms_since(started)},
        )

    async def _listed(self, listing: Listing) -> Fetched:
        started = time.perf_counter()
        documents, last = await self.lanes.run(
            "listing", lambda: self.pages.page(self.collection.paths.store, listing)
        )
        return Fetched(
            documents=documents,
            not_found=[],
            timings_ms={"search": ms_since(started)},
            next_page_token=listing.token_after(last),
        )

    async def info(self) -> EngineInfo:
        def sizes() -> tuple[Collection, int, int, int, int, int]:
            collection = self.collection
            return (
                collection,
                collection.index.documents,
                len(collection.index),
                len(collection.lexical) if collection.lexical is not None else 0,
                collection.store.generation,
                collection.store.feedback_count(),
            )

        collection, documents, vectors, lexical_size, generation, feedback = await self.lanes.run(
            "store", sizes
        )
        index_settings = collection.index.settings
        pairs = self.searcher.pairs
        embedder = self.searcher.embedder
        return EngineInfo(
            version=__version__,
            models=self.models,
            settings=self.settings,
            index_size=documents,
            index_vectors=vectors,
            lexical_index_size=lexical_size,
            index_dtype=index_settings.dtype,
            generation=generation,
            collection_version=collection.version,
            read_only=collection.read_only,
            dimension=embedder.dimension,
            query_max_tokens=embedder.manifest.max_length,
            pair_max_tokens=pairs.template.max_length if pairs is not None else 0,
            score_activation=SCORE_ACTIVATION if self.models.reranker is not None else "",
            reranker_id=self.searcher.slot.id if self.searcher.slot is not None else "",
            feedback_count=feedback,
            max_passages_per_doc=index_settings.max_passages,
            passage_overlap_tokens=index_settings.passage_overlap,
        )

    # Writes

    async def upsert(self, batches: AsyncIterator[UpsertBatch], call: Call) -> Upserted:
        """Commits each batch durably before reading the next. A bad batch fails the call,
        and the reply says how many documents of earlier batches are committed."""
        self.collection.store.require_writable()  # before any document is embedded
        totals = Upserted()
        try:
            async for batch in batches:
                await self._upsert_batch(batch, totals)
        except RequestError as error:
            if totals.received:
                told = copy.copy(error)  # the same class and fields (a retry delay, say)
                told.args = (
                    f"{error} (the {totals.received} documents of earlier messages in this "
                    "stream are committed)",
                )
                raise told from error
            raise
        if not totals.received:  # a committed message holds at least one document
            raise InvalidArgument("the Upsert stream held no messages: send at least one")
        return totals

    async def _upsert_batch(self, batch: UpsertBatch, totals: Upserted) -> None:
        check_batch(batch, self.settings)
        documents = list(batch.documents)
        started = time.perf_counter()
        prepared = await self.lanes.run("ingest", self.collection.prepare, documents)
        totals.timings_ms["embed"] += ms_since(started)
        truncated = int(prepared.truncated.sum())
        if truncated and not batch.truncate:
            first = int(np.flatnonzero(prepared.truncated)[0])
            raise InvalidArgument(
                f"document {documents[first].id!r} is longer than the "
                f"{self.collection.index.settings.max_passages} passages of "
                f"{self.searcher.embedder.manifest.max_length} tokens this collection embeds "
                "per document; shorten or split it, or allow truncate (nothing in this "
                "message was written)"
            )
        started = time.perf_counter()

        def commit() -> tuple[int, int, int]:
            written = self.collection.commit(prepared)
            return len(written.keys), len(written.replaced), self.collection.store.generation

        written, replaced, totals.generation = await self.lanes.run("store", commit)
        totals.timings_ms["search"] += ms_since(started)
        totals.received += len(documents)
        totals.inserted += written - replaced
        totals.replaced += replaced
        totals.truncated += truncated
        self._written()

    async def delete(
        self, ids: list[str], call: Call, *, metadata_filter: Mapping[str, Any] | None = None
    ) -> Deleted:
        """Deletes the documents ``ids`` and every document that matches ``metadata_filter``,
        in one transaction; ``not_found`` lists the ids that were not stored."""
        self.collection.store.require_writable()
        matching = checked_filter(metadata_filter)
        wanted = [] if matching is not None and not ids else unique_ids(ids, self.settings)
        started = time.perf_counter()

        def delete() -> tuple[int, list[str]]:
            present = self.collection.store.stored_ids(wanted)
            stored = [item for item in wanted if item in present]
            keys = self.collection.delete(stored, matching=matching)
            return len(keys), [item for item in wanted if item not in present]

        deleted, not_found = await self.lanes.run("store", delete)
        if deleted:
            self._written()
        return Deleted(deleted, not_found, {"search": ms_since(started)})

    async def feedback(self, items: Sequence[FeedbackItem], call: Call) -> tuple[int, int]:
        """Records the labels durably, all or none; returns (recorded, the total held)."""
        checked = check_feedback(items, self.settings)
        self.collection.store.require_writable()
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        rows = [Feedback(query, item, grade, kind, at) for query, item, grade, kind in checked]
        total = await self.lanes.run("store", lambda: self.collection.store.add_feedback(rows))
        return len(rows), total

    def _written(self) -> None:
        self.dirty.set()
        fraction = self.collection.index.removed_fraction
        threshold = self.settings.compact_removed_fraction
        if (
            threshold > 0
            and fraction >= threshold
            and self.collection.index.removed >= self.settings.compact_min_removed
            and self.compacting is None
        ):
            self.compacting = asyncio.create_task(self._compact(), name="compaction")

    async def _compact(self) -> None:
        """Rebuilds the index without its removed slots, off the store lane: searches go on
        against the old index until the new one, caught up, is swapped in."""
        started = time.perf_counter()
        collection = self.collection
        try:
            fresh = await self.lanes.run("ingest", collection.build_compact_index)
            caught_up = await self.lanes.run("store", collection.swap_index, fresh)
        except Exception:  # a background task: nothing to answer, so log it whole
            log.exception("compaction failed: the index in use is unchanged")
            return
        finally:
            self.compacting = None
        self.dirty.set()
        log.info(
            "index compacted",
            extra={"vectors": len(fresh), "caught_up": caught_up, "ms": ms_since(started)},
        )

    async def compaction_done(self) -> None:
        """Waits for a compaction in progress, if any (tests, shutdown)."""
        if self.compacting is not None:
            await asyncio.gather(self.compacting, return_exceptions=True)
