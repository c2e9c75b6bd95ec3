"""A collection on disk: the document store, the two indexes kept consistent with it, and writes.

A write commits to the store first (that is the acknowledgement), then updates the in-memory
vector index and commits the lexical (BM25) index. The vector index file and the lexical
index's sidecar are saved by ``checkpoint``; if the process dies before that, start-up
repairs both indexes from the store.

The collection owns its index settings: they are chosen when it is created, recorded in the
store, and used by every later opening. One process at a time may open a folder for writing
(a lock file says which); any number may read it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from tandem.encoders import BiEncoder
from tandem.server.engine.filters import MetadataFilter
from tandem.server.engine.index import (
    IndexSettings,
    VectorIndex,
    catch_up,
    load_consistent,
    rebuild,
    recorded_settings,
)
from tandem.server.engine.pairs import STORED_TOKENS, PairTokenizer
from tandem.server.engine.store import (
    DocumentStore,
    NewDocument,
    StoredDocument,
    StoreUnavailable,
    Upserted,
    passage_key,
)

if TYPE_CHECKING:
    from tandem.server.engine.lexical import LexicalIndex

log = logging.getLogger(__name__)

STORE_NAME = "documents.sqlite"
INDEX_NAME = "vectors.usearch"
LEXICAL_NAME = "lexical"
TOKENIZER_KEY = "reranker_tokenizer"
# How many reranker ids a stored document keeps at most. Absent: a collection from before
# whole ids were stored, which kept one past a pair's length.
TOKEN_CAP_KEY = "reranker_token_cap"
EMBEDDER_KEY = "bi_encoder"
INDEX_SETTINGS_KEY = "index_settings"
LOCK_NAME = "writer.lock"


@dataclass(frozen=True)
class CollectionPaths:
    folder: Path

    @property
    def store(self) -> Path:
        return self.folder / STORE_NAME

    @property
    def index(self) -> Path:
        return self.folder / INDEX_NAME

    @property
    def lexical(self) -> Path:
        return self.folder / LEXICAL_NAME


@dataclass(frozen=True)
class Prepared:
    """Documents with their passage vectors and reranker token ids, ready to commit."""

    documents: list[NewDocument]
    vectors: list[NDArray[np.float32]]  # (passages, dimension) per document
    token_ids: list[NDArray[np.int32]]
    truncated: NDArray[np.bool_]  # text went on past the last passage embedded


class CollectionError(Exception):
    """The collection on disk was built with other models than the ones being served."""


class Collection:
    def __init__(
        self,
        folder: Path,
        *,
        embedder: BiEncoder,
        pairs: PairTokenizer | None,
        settings: IndexSettings | Mapping[str, Any] | None = None,
        read_only: bool = False,
        version: str | None = None,
    ) -> None:
        """``settings``: the index settings the caller chose (all of them, as an
        ``IndexSettings``, or some, by field name). A new collection is created with them
        (defaults for the rest); an existing one must already have them, or this raises."""
        self.paths = CollectionPaths(folder)
        self.version = version  # the published version, for a replica (replication.publish)
        if not read_only:
            folder.mkdir(parents=True, exist_ok=True)
            read_only = not os.access(folder, os.W_OK)
            if read_only:
                log.warning(
                    "the collection folder cannot be written: serving it read-only (reads "
                    "work, writes get FAILED_PRECONDITION)",
                    extra={"folder": str(folder)},
                )
        if read_only and not self.paths.store.is_file():
            raise CollectionError(f"{self.paths.store} does not exist, and a read-only "
                                  "collection cannot create it")  # fmt: skip
        self.read_only = read_only
        self.embedder = embedder
        self.pairs = pairs
        self.lock = None if read_only else _lock_for_writing(folder)
        try:
            self.store = DocumentStore(self.paths.store, read_only=read_only)
        except StoreUnavailable as exc:
            self._unlock()
            raise CollectionError(str(exc)) from exc
        try:
            self._check_embedder()
            self._retokenize_if_stale()
            self.token_cap = self._keep_whole_token_ids()
            index_settings = self._index_settings(settings)
            self.index: VectorIndex = load_consistent(
                self.paths.index, self.store, ndim=embedder.dimension, settings=index_settings,
                writable=not read_only,
            )  # fmt: skip
            self.lexical = open_lexical(self.paths.lexical, self.store, writable=not read_only)
            # A write the lexical index failed to take (a full disk): the store has it, and
            # the next write or checkpoint catches the index up from the store.
            self.lexical_behind = False
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        lexical = getattr(self, "lexical", None)  # None: __init__ failed before opening it
        if lexical is not None:
            lexical.close()
        self.store.close()
        self._unlock()

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the file releases its flock
            self.lock = None

    def _index_settings(self, requested: IndexSettings | Mapping[str, Any] | None) -> IndexSettings:
        """The collection's own settings, checked against what the caller asked for."""
        wanted = (
            asdict(requested) if isinstance(requested, IndexSettings) else dict(requested or {})
        )
        unknown = set(wanted) - {item.name for item in fields(IndexSettings)}
        if unknown:
            raise CollectionError(f"unknown index settings: {', '.join(sorted(unknown))}")
        text = self.store.get_meta(INDEX_SETTINGS_KEY)
        # A collection from before settings were recorded: its index sidecar knows them.
        recorded = (
            IndexSettings(**json.loads(text)) if text is not None
            else recorded_settings(self.paths.index)
        )  # fmt: skip
        if recorded is None:
            try:
                recorded = IndexSettings(**wanted)
            except ValueError as error:
                raise CollectionError(f"index settings: {error}") from error
        conflicts = [
            f"{name}={value!r} (the collection has {getattr(recorded, name)!r})"
            for name, value in wanted.items()
            if getattr(recorded, name) != value
        ]
        if conflicts:
            raise CollectionError(
                f"{self.paths.folder} was built with other index settings than asked for: "
                f"{'; '.join(conflicts)}. Drop those flags to serve it as built, or build a new "
                "collection with them (tandem index build --out NEW_FOLDER ...)"
            )
        if text is None and not self.read_only:
            self.store.set_meta(INDEX_SETTINGS_KEY, json.dumps(asdict(recorded)))
        return recorded

    def __len__(self) -> int:
        return len(self.store)

    def _check_embedder(self) -> None:
        fingerprint = self.embedder.fingerprint
        recorded = self.store.get_meta(EMBEDDER_KEY)
        if recorded is None:
            if not self.read_only:
                self.store.set_meta(EMBEDDER_KEY, fingerprint)
        elif recorded != fingerprint:
            raise CollectionError(
                f"{self.paths.folder} was embedded with another bi-encoder, or with another "
                f"document prompt (model sha256 {recorded[:12]}…); serve that model, or "
                "rebuild the collection with this one"
            )

    def _tokenizer_fingerprint(self) -> str:
        if self.pairs is None:
            return ""
        spec = f"{self.pairs.tokenizer.to_str()}|{self.pairs.template.max_length}"
        return hashlib.sha256(spec.encode()).hexdigest()

    def _retokenize_if_stale(self) -> None:
        """Stored reranker ids must come from the reranker being served; redo them if not.
        A tokenizer whose file differs but whose ids agree (a reranker fine-tuned from the
        one the collection was built with, saved by another library version) is accepted:
        a sample of stored documents is tokenized again and compared, id for id."""
        fingerprint = self._tokenizer_fingerprint()
        if self.store.get_meta(TOKENIZER_KEY) == fingerprint or self.pairs is None:
            return
        if self._stored_ids_agree(self.pairs):
            if not self.read_only:
                self.store.set_meta(TOKENIZER_KEY, fingerprint)
            return
        if self.read_only:
            if len(self.store):
                raise CollectionError(
                    f"{self.paths.folder} holds token ids from another reranker tokenizer, and "
                    "a read-only collection cannot redo them: open it writable once with this "
                    "reranker, or serve the reranker it was built with"
                )
            return
        if len(self.store):
            log.warning("reranker tokenizer changed: re-tokenizing %d documents", len(self.store))
            self._retokenize(self.store.keys().tolist())
            self.store.set_meta(TOKEN_CAP_KEY, str(STORED_TOKENS))
        self.store.set_meta(TOKENIZER_KEY, fingerprint)

    def _retokenize(self, keys: Sequence[int]) -> None:
        assert self.pairs is not None
        for start in range(0, len(keys), 1000):
            ordered = list(self.store.by_keys(keys[start : start + 1000]).values())
            self.store.replace_token_ids(
                [doc.key for doc in ordered],
                self.pairs.tokenize_stored([doc.text for doc in ordered]),
            )

    def _recorded_token_cap(self) -> int:
        recorded = self.store.get_meta(TOKEN_CAP_KEY)
        if recorded is not None:
            return int(recorded)
        if self.pairs is None or not len(self.store):
            return STORED_TOKENS
        return self.pairs.template.max_length + 1  # the layout before the record existed

    def _keep_whole_token_ids(self) -> int:
        """The collection's ``token_cap``. One that stored fewer ids (written before whole ids
        were kept) re-tokenizes, once, the documents it cut, so that no call has to; read-only,
        it is served as stored (calls re-tokenize the long ones, as it was built to)."""
        cap = self._recorded_token_cap()
        if self.read_only or self.pairs is None:
            return cap
        if cap < STORED_TOKENS:
            cut = self.store.keys_with_tokens(cap)
            if cut:
                log.info(
                    "keeping whole reranker ids: re-tokenizing %d long documents once", len(cut),
                    extra={"folder": str(self.paths.folder)},
                )  # fmt: skip
                self._retokenize(cut)
            cap = STORED_TOKENS
        if self.store.get_meta(TOKEN_CAP_KEY) != str(cap):
            self.store.set_meta(TOKEN_CAP_KEY, str(cap))
        return cap

    def _stored_ids_agree(self, pairs: PairTokenizer, *, sample: int = 32) -> bool:
        """Whether ``pairs`` gives a sample of stored documents (spread over the keys) the
        ids they are stored with (as far as the store kept them); True for an empty store."""
        keys = self.store.keys().tolist()
        if not keys:
            return True
        cap = self._recorded_token_cap()
        picked = keys[:: max(len(keys) // sample, 1)][:sample]
        documents = list(self.store.by_keys(picked).values())
        fresh = pairs.tokenize_stored([doc.text for doc in documents])
        return all(
            doc.token_ids.tolist() == ids[: len(doc.token_ids)].tolist()
            and (len(doc.token_ids) >= cap or len(ids) == len(doc.token_ids))
            for doc, ids in zip(documents, fresh, strict=True)
        )

    def upsert(self, documents: Sequence[NewDocument], *, batch_size: int = 32) -> Upserted:
        """Embeds, tokenizes and commits ``documents``; durable once this returns."""
        return self.commit(self.prepare(documents, batch_size=batch_size))

    def prepare(self, documents: Sequence[NewDocument], *, batch_size: int = 32) -> Prepared:
        """The model work of an upsert. Touches neither store nor index, so it may run on
        another thread than ``commit`` (the server keeps it off the store's thread)."""
        texts = [document.text for document in documents]
        settings = self.index.settings
        embedded = self.embedder.encode_passages(
            texts,
            max_passages=settings.max_passages,
            overlap=settings.passage_overlap,
            batch_size=batch_size,
            prompt=self.embedder.prompt(role="document"),
        )
        if self.pairs is not None:
            token_ids = self.pairs.tokenize_stored(texts)
        else:
            token_ids = [np.zeros(0, dtype=np.int32) for _ in texts]
        return Prepared(list(documents), embedded.passages, token_ids, embedded.truncated)

    def commit(self, prepared: Prepared) -> Upserted:
        written = self.store.upsert(prepared.documents, prepared.vectors, prepared.token_ids)
        self.index.remove_documents(written.replaced)
        keys = [
            passage_key(key, number)
            for key, vectors in zip(written.keys, prepared.vectors, strict=True)
            for number in range(len(vectors))
        ]
        if keys:
            self.index.add(np.asarray(keys, dtype=np.uint64), np.concatenate(prepared.vectors))
        self._update_lexical(
            written.replaced, written.keys, [document.text for document in prepared.documents]
        )
        return written

    def delete(self, ids: Sequence[str], *, matching: MetadataFilter | None = None) -> list[int]:
        """Deletes ``ids`` and the documents ``matching`` a filter; returns their keys."""
        keys = self.store.delete(ids, matching=matching)
        self.index.remove_documents(keys)
        self._update_lexical(keys, [], [])
        return keys

    def _update_lexical(
        self, removed: Sequence[int], keys: Sequence[int], texts: list[str]
    ) -> None:
        if self.lexical is None or (not removed and not keys):
            return
        try:
            if self.lexical_behind:
                self._catch_up_lexical(self.lexical)  # the store holds this write too
                return
            self.lexical.remove(removed)
            self.lexical.add(keys, texts)
            self.lexical.commit()
        except OSError as error:  # LexicalWriteFailed: a full or read-only disk
            # The write is durable in the store, which the index is caught up from later;
            # failing the acknowledged write now would make a client send it twice.
            self.lexical_behind = True
            log.error("the lexical index could not take a write (caught up later): %s", error)

    def _catch_up_lexical(self, lexical: LexicalIndex) -> None:
        lexical.renew_writer()
        removed, added = lexical.catch_up(self.store)
        self.lexical_behind = False
        log.warning("lexical index caught up", extra={"removed": removed, "added": added})

    def get(self, ids: Sequence[str]) -> dict[str, StoredDocument]:
        return self.store.by_ids(ids)

    def checkpoint(self) -> None:
        """Saves the index at the store's generation, so the next start-up need not repair."""
        if self.read_only:
            return  # nothing was written, and nothing could be
        generation = self.store.generation
        self.index.save(self.paths.index, generation=generation)
        if self.lexical is None:
            return
        if self.lexical_behind:
            self._catch_up_lexical(self.lexical)
        self.lexical.save(self.paths.lexical, generation=generation)

    def compact(self) -> None:
        """Rebuilds the index from the store, dropping the graph's deleted slots, in one go
        (the server runs the two steps on different threads instead)."""
        self.swap_index(self.build_compact_index())

    def build_compact_index(self) -> VectorIndex:
        """A new graph of the store's vectors, without removed slots. It reads through a
        connection of its own (a WAL snapshot), so it may run on another thread while the
        store's owner goes on serving searches and writes."""
        reader = DocumentStore(self.paths.store, read_only=True)
        try:
            return rebuild(reader, ndim=self.embedder.dimension, settings=self.index.settings)
        finally:
            reader.close()

    def swap_index(self, fresh: VectorIndex) -> int:
        """Catches ``fresh`` up with the writes made while it was built, then serves it and
        saves it; returns how many vectors the catch-up removed or added."""
        removed, added = catch_up(fresh, self.store)  # counts its removals in fresh.removed
        self.index = fresh
        try:
            self.checkpoint()
        except OSError as error:  # a full disk: the store holds everything; start-up repairs
            log.error("the compacted index is serving but could not be saved: %s", error)
        return removed + added


def open_lexical(folder: Path, store: DocumentStore, *, writable: bool) -> LexicalIndex | None:
    """The collection's lexical index, consistent with the store; None where tantivy cannot
    be imported (a platform without its wheel, or a GPU machine that was not carried it):
    then the dense first stage alone is served, and the store still holds every text."""
    try:
        from tandem.server.engine.lexical import load_consistent
    except ImportError as error:
        log.warning(
            "tantivy cannot be imported (%s): no lexical index; only the dense first stage "
            "is served (pip install tantivy, then restart: the index is built from the store)",
            error,
        )
        return None
    return load_consistent(folder, store, writable=writable)


def _lock_for_writing(folder: Path) -> IO[str]:
    """Holds ``folder``'s writer lock until the returned file is closed (or the process
    dies: the kernel releases an flock with its holder, so a crash leaves no stale lock)."""
    path = folder / LOCK_NAME
    handle = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise CollectionError(
            f"{folder} is open for writing by another process (pid {holder}): one writer per "
            "folder. Stop that process, or open this one read-only (--read-only)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
