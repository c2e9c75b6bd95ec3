"""The durable document store (SQLite, WAL): the source of truth the vector index is rebuilt from.

Each document keeps its external id, text, JSON metadata, its bi-encoder vectors and the
reranker's token ids, so neither a rerank nor an index repair has to run a model again. Keys
are internal uint64 ids, never reused, so an index entry can never point at the wrong text.
Every write bumps ``generation``; the index records the generation it was saved at, which is
how start-up tells that the two disagree.

A document longer than the bi-encoder's window has one vector per passage, all in its row
(``vector`` holds them end to end). In the vector index, passage ``p`` of the document with
key ``k`` has key ``passage_key(k, p)``: ``k`` itself for the first passage, so a collection
written before passages existed keeps every key it had.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tandem.server.engine.errors import (
    Exhausted,
    FailedPrecondition,
    InvalidArgument,
    RequestError,
    Retryable,
)
from tandem.server.engine.filters import MetadataFilter, narrowing

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    token_ids BLOB NOT NULL,
    vector BLOB NOT NULL
);
-- Covers the metadata filter's reads (a scan of every document's metadata, or a look-up of
-- some), which the wide rows (text, vectors, token ids) slowed 4x on RAG24's 6,011.
CREATE INDEX IF NOT EXISTS documents_metadata ON documents (key, metadata);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    query TEXT NOT NULL,
    id TEXT NOT NULL,
    grade REAL NOT NULL,
    kind TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


# Document keys are counted up from 1 and stay far below 2**48; a passage's number sits above.
PASSAGE_SHIFT = 48
DOCUMENT_MASK = (1 << PASSAGE_SHIFT) - 1
VECTOR_BYTES = 4  # float32
# Values bound in one ``IN (...)``: SQLite caps the parameters of a statement.
IN_CHUNK = 500
# Ids a filtered listing reads per query: their index yields about 4,000 in a millisecond.
LIST_WINDOW = 1024
METADATA_INDEX = "documents_metadata"  # SCHEMA's
DOCUMENT_COLUMNS = "key, id, text, metadata, token_ids"  # what stored_document reads


def passage_key(key: int, passage: int) -> int:
    return key | (passage << PASSAGE_SHIFT)


def document_keys(keys: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """The document each vector key belongs to."""
    return np.asarray(keys, dtype=np.uint64) & np.uint64(DOCUMENT_MASK)


class StoreError(RequestError):
    """A write the store cannot honour. Reads never raise it.

    StoreError                                 (and its branch of engine.errors)
    ├── InvalidDocuments   an id twice in one batch   InvalidArgument
    ├── StoreReadOnly      cannot be written          FailedPrecondition
    ├── StoreFull          the disk is full           Exhausted
    └── StoreBusy          another process holds the  Retryable
                           database's write lock
    """


class InvalidDocuments(StoreError, InvalidArgument):
    pass


class StoreReadOnly(StoreError, FailedPrecondition):
    pass


class StoreFull(StoreError, Exhausted):
    pass


class StoreBusy(StoreError, Retryable):
    pass


class UnknownFeedbackIds(InvalidArgument):
    """Feedback names a document the store does not hold."""


# A busy store waits out SQLite's own timeout (5 s) before it says so; a retry a second
# later usually finds the other writer's transaction done.
BUSY_RETRY_S = 1.0


class StoreUnavailable(Exception):
    """The store cannot be opened at all (start-up refuses, saying why)."""


def unwritable(exc: sqlite3.Error) -> StoreError:
    """Names why a write failed, so callers can tell a full disk from a read-only one."""
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_FULL" or "disk is full" in str(exc):
        return StoreFull(f"the document store is out of disk space: {exc}")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in str(exc):
        return StoreBusy(
            f"the document store is busy: another connection holds its write lock ({exc}); "
            "retry shortly",
            retry_after_s=BUSY_RETRY_S,
        )
    return StoreReadOnly(f"the document store cannot be written: {exc}")


@dataclass(frozen=True)
class Feedback:
    """One label on a (query, stored document) pair: a grade (0 to MAX_FEEDBACK_GRADE) or a
    click (grade 1), and when it arrived (ISO 8601)."""

    query: str
    id: str
    grade: float
    kind: str  # "label" or "click"
    at: str


@dataclass(frozen=True)
class NewDocument:
    id: str
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredDocument:
    key: int
    id: str
    text: str
    metadata: dict[str, Any]
    token_ids: NDArray[np.int32]


@dataclass(frozen=True)
class Upserted:
    """Keys written, and the keys they replaced (documents re-sent under an existing id)."""

    keys: list[int]
    replaced: list[int]


class DocumentStore:
    """One SQLite file. Not thread-safe: its owner calls it from one thread at a time (the
    server from its single store thread, which need not be the thread that opened it)."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        uri = f"file:{path}"
        if read_only:
            # Read-only, a WAL database needs its -shm file. Where the folder is writable,
            # SQLite makes one and sees a writer's later commits. Where it is not (a read-only
            # mount) and no -wal is left (a clean close), nothing can change the file, so it
            # is opened immutable; after a crash the -wal holds acknowledged writes and is read.
            wal = path.with_name(path.name + "-wal")
            immutable = not os.access(path.parent, os.W_OK) and not wal.exists()
            uri += "?mode=ro&immutable=1" if immutable else "?mode=ro"
        try:
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the document store {path}: {exc}") from exc
        if not read_only:
            # WAL lets replicas read while the writer commits; synchronous=FULL makes a commit
            # durable before it is acknowledged.
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def get_meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        with self._transaction():
            self._put_meta(name, value)

    def _put_meta(self, name: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta(name, value) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def _transaction(self) -> _Transaction:
        self.require_writable()
        return _Transaction(self.db)

    def require_writable(self) -> None:
        if self.read_only:
            raise StoreReadOnly(
                f"the collection at {self.path.parent} is open read-only (a replica of a "
                "published root, a folder that cannot be written, or --read-only): reads are "
                "served, writes are refused; send them to the writer"
            )

    def add_feedback(self, items: Sequence[Feedback]) -> int:
        """Records labels in one transaction, all or none: an id the store does not hold
        fails the whole call (``UnknownFeedbackIds``) and nothing is written. Feedback is
        not a document change, so the generation stays (the indexes are unaffected).
        Returns how many labels the store holds in all."""
        with self._transaction():
            unknown = [item.id for item in items if not self._keys_for([item.id])]
            if unknown:
                raise UnknownFeedbackIds(
                    f"{len(unknown)} feedback document ids are not stored: "
                    f"{', '.join(map(repr, unknown[:5]))}{' …' if len(unknown) > 5 else ''} "
                    "(nothing in this call was recorded)"
                )
            self.db.executemany(
                "INSERT INTO feedback(query, id, grade, kind, at) VALUES(?, ?, ?, ?, ?)",
                [(item.query, item.id, item.grade, item.kind, item.at) for item in items],
            )
            return int(self.db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])

    def feedback_count(self) -> int:
        try:
            return int(self.db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])
        except sqlite3.OperationalError:  # no feedback table: a collection made before it
            return 0

    def feedback_labels(self) -> list[tuple[str, str, float]]:
        """Every recorded (query, document id, grade), oldest first; none where the store
        predates feedback."""
        try:
            rows = self.db.execute("SELECT query, id, grade FROM feedback ORDER BY seq")
            return [(str(query), str(item), float(grade)) for query, item, grade in rows]
        except sqlite3.OperationalError:  # no feedback table: a collection made before it
            return []

    def upsert(
        self,
        documents: Sequence[NewDocument],
        vectors: Sequence[NDArray[np.float32]],
        token_ids: Sequence[NDArray[np.int32]],
    ) -> Upserted:
        """Writes documents in one transaction; an id seen before gets a fresh key.
        ``vectors[i]``: document i's passage vectors, one row each (or one vector)."""
        if not (len(documents) == len(vectors) == len(token_ids)):
            raise InvalidDocuments("documents, vectors and token ids differ in count")
        ids = [document.id for document in documents]
        if len(set(ids)) != len(ids):
            duplicate = next(item for item in ids if ids.count(item) > 1)
            raise InvalidDocuments(f"id {duplicate!r} appears twice in one batch; send it once")
        with self._transaction():
            replaced = self._keys_for(ids)
            if replaced:
                self.db.executemany(
                    "DELETE FROM documents WHERE key = ?", [(key,) for key in replaced]
                )
            first = int(self.get_meta("next_key") or 1)
            keys = list(range(first, first + len(documents)))
            self.db.executemany(
                "INSERT INTO documents(key, id, text, metadata, token_ids, vector) "
                "VALUES(?, ?, ?, ?, ?, ?)",
                [
                    (
                        key,
                        document.id,
                        document.text,
                        json.dumps(dict(document.metadata), ensure_ascii=False, allow_nan=False),
                        np.asarray(tokens, dtype=np.int32).tobytes(),
                        np.asarray(vector, dtype=np.float32).tobytes(),
                    )
                    for key, document, tokens, vector in zip(
                        keys, documents, token_ids, vectors, strict=True
                    )
                ],
            )
            self._put_meta("next_key", str(first + len(documents)))
            self._bump_generation()
        return Upserted(keys=keys, replaced=replaced)

    def replace_token_ids(
        self, keys: Sequence[int], token_ids: Sequence[NDArray[np.int32]]
    ) -> None:
        with self._transaction():
            self.db.executemany(
                "UPDATE documents SET token_ids = ? WHERE key = ?",
                [
                    (np.asarray(tokens, dtype=np.int32).tobytes(), int(key))
                    for key, tokens in zip(keys, token_ids, strict=True)
                ],
            )

    def delete(self, ids: Sequence[str], *, matching: MetadataFilter | None = None) -> list[int]:
        """Removes documents by external id, and every document ``matching`` a filter, in one
        transaction (a write between the match and the delete cannot slip in); returns the
        keys that existed."""
        with self._transaction():
            keys = self._keys_for(ids)
            if matching is not None:
                keys = list(dict.fromkeys([*keys, *self.keys_matching(matching)]))
            self.db.executemany("DELETE FROM documents WHERE key = ?", [(key,) for key in keys])
            if keys:
                self._bump_generation()
        return keys

    def _bump_generation(self) -> None:
        self._put_meta("generation", str(self.generation + 1))

    def _keys_for(self, ids: Sequence[str]) -> list[int]:
        keys: list[int] = []
        for chunk, marks in _in_chunks(ids):
            rows = self.db.execute(f"SELECT key FROM documents WHERE id IN ({marks})", chunk)
            keys.extend(int(row[0]) for row in rows)
        return keys

    def stored_ids(self, ids: Sequence[str]) -> set[str]:
        """Those of ``ids`` stored, read from the id index alone (no row is read)."""
        found: set[str] = set()
        for chunk, marks in _in_chunks(ids):
            rows = self.db.execute(f"SELECT id FROM documents WHERE id IN ({marks})", chunk)
            found.update(row[0] for row in rows)
        return found

    def by_ids(self, ids: Sequence[str]) -> dict[str, StoredDocument]:
        return {document.id: document for document in self._select("id", ids)}

    def by_keys(self, keys: Sequence[int]) -> dict[int, StoredDocument]:
        return {document.key: document for document in self._select("key", [int(k) for k in keys])}

    def _select(self, column: str, values: Sequence[object]) -> Iterator[StoredDocument]:
        for chunk, marks in _in_chunks(values):
            rows = self.db.execute(
                f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE {column} IN ({marks})", chunk
            )
            yield from map(stored_document, rows)

    def listed(
        self,
        *,
        after: str | None,
        prefix: str,
        matching: MetadataFilter | None,
        limit: int,
        scan: int,
    ) -> tuple[list[StoredDocument], str | None]:
        """Up to ``limit`` documents in id order, past ``after`` (from the first if None),
        whose id starts with ``prefix`` and whose metadata ``matching`` passes, reading at
        most ``scan`` ids; and the id to go on after, None once nothing is left."""
        bound, past = (after, ">") if after is not None else (prefix, ">=")
        if matching is None:
            # One past the page says whether more remain.
            rows = self.db.execute(
                f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE id {past} ? ORDER BY id LIMIT ?",
                (bound, limit + 1),
            ).fetchall()
            documents = [stored_document(row) for row in rows if str(row[1]).startswith(prefix)]
            if len(documents) > limit:
                return documents[:limit], documents[limit - 1].id
            return documents, None
        # A filter: ids from their own index a window at a time (no row is read), then the
        # metadata of those with the prefix, so a page costs what it reads, not the store.
        kept: list[tuple[int, str]] = []  # (key, id)
        scanned = 0
        while scanned < scan:
            window = min(LIST_WINDOW, scan - scanned)
            rows = self.db.execute(
                f"SELECT key, id FROM documents WHERE id {past} ? ORDER BY id LIMIT ?",
                (bound, window),
            ).fetchall()
            scanned += len(rows)
            with_prefix = [
                (int(key), str(item)) for key, item in rows if str(item).startswith(prefix)
            ]
            passing = self.passing([key for key, _ in with_prefix], matching)
            kept.extend((key, item) for key, item in with_prefix if key in passing)
            if len(kept) > limit:
                # One past the page: the next page starts after this page's last document.
                return self._in_order(kept[:limit]), kept[limit - 1][1]
            if len(rows) < window or not str(rows[-1][1]).startswith(prefix):
                return self._in_order(kept), None
            bound, past = str(rows[-1][1]), ">"
        return self._in_order(kept), bound  # its share of ids read: the next page goes on

    def passing(self, keys: Sequence[int], wanted: MetadataFilter) -> set[int]:
        """Which of the documents ``keys`` exist and match ``wanted``, their metadata read
        through the metadata index where the store has it (a collection written before it
        was added has not, until opened writable), never the rest of their rows."""
        passing: set[int] = set()
        for chunk, marks in _in_chunks(keys):
            passing.update(
                self._keys_where(
                    wanted, f"key IN ({marks})", chunk, index=self._through_metadata_index
                )
            )
        return passing

    @cached_property
    def _through_metadata_index(self) -> str:
        # SQLite looks a key up in the table, whose wide rows (texts, vectors, token ids)
        # cost 2.5x the narrow index on RAG24: name the index where it exists.
        exists = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (METADATA_INDEX,)
        ).fetchone()
        return f" INDEXED BY {METADATA_INDEX}" if exists else ""

    def _in_order(self, keys: Sequence[tuple[int, str]]) -> list[StoredDocument]:
        found = self.by_keys([key for key, _ in keys])
        return [found[key] for key, _ in keys if key in found]

    def keys_matching(self, wanted: MetadataFilter) -> list[int]:
        """Keys of every document whose metadata matches ``wanted``.

        The filter narrows the scan in SQL (``json_each``) where it can; every row that
        returns is checked in Python as well, so SQL's looser comparisons decide nothing."""
        return self._keys_where(wanted)

    def _keys_where(
        self,
        wanted: MetadataFilter,
        condition: str | None = None,
        parameters: Sequence[Any] = (),
        *,
        index: str = "",
    ) -> list[int]:
        """Keys of the rows meeting ``condition`` whose metadata matches ``wanted``: narrowed
        in SQL where the filter allows, every row that returns checked in Python."""
        conditions, bound = ([condition], list(parameters)) if condition else ([], [])
        narrowed = narrowing(wanted)
        if narrowed is not None:
            conditions.append(f"({narrowed[0]})")
            bound.extend(narrowed[1])
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self.db.execute(f"SELECT key, metadata FROM documents{index}{where}", bound)
        return [int(key) for key, metadata in rows if wanted.matches(json.loads(metadata))]

    def keys_with_tokens(self, at_least: int) -> list[int]:
        """Keys of the documents stored with at least ``at_least`` reranker ids."""
        rows = self.db.execute(
            "SELECT key FROM documents WHERE length(token_ids) >= ? ORDER BY key",
            (at_least * np.dtype(np.int32).itemsize,),
        )
        return [int(row[0]) for row in rows]

    def keys(self) -> NDArray[np.uint64]:
        rows = self.db.execute("SELECT key FROM documents ORDER BY key").fetchall()
        return np.array([row[0] for row in rows], dtype=np.uint64)

    def vectors(
        self, ndim: int, keys: Sequence[int] | None = None, *, batch: int = 4096
    ) -> Iterator[tuple[NDArray[np.uint64], NDArray[np.float32]]]:
        """Yields (vector keys, vectors) in batches, every passage of each document: all
        documents, or only those of the document ``keys``."""
        for rows in self._rows("vector", keys, batch):
            yield _unpack_vectors(rows, ndim)

    def vector_keys(self, ndim: int) -> NDArray[np.uint64]:
        """Every passage's key in the vector index, in document key order."""
        rows = self.db.execute("SELECT key, length(vector) FROM documents ORDER BY key").fetchall()
        return _passage_keys([int(key) for key, _ in rows], _counts(rows, ndim))

    def vector_count(self, ndim: int) -> int:
        """How many vectors the index should hold (documents' passages, all together)."""
        total = self.db.execute("SELECT COALESCE(SUM(length(vector)), 0) FROM documents")
        return int(total.fetchone()[0]) // (VECTOR_BYTES * ndim)

    def texts(
        self, keys: Sequence[int] | None = None, *, batch: int = 4096
    ) -> Iterator[tuple[list[int], list[str]]]:
        """Yields (keys, texts) in batches: all documents, or only ``keys``."""
        for rows in self._rows("text", keys, batch):
            yield [int(row[0]) for row in rows], [str(row[1]) for row in rows]

    def _rows(
        self, column: str, keys: Sequence[int] | None, batch: int
    ) -> Iterator[list[tuple[Any, Any]]]:
        """(key, ``column``) rows in key order, in batches: all documents, or only ``keys``."""
        if keys is None:
            cursor = self.db.execute(f"SELECT key, {column} FROM documents ORDER BY key")
            while rows := cursor.fetchmany(batch):
                yield rows
            return
        for chunk, marks in _in_chunks([int(key) for key in keys]):
            rows = self.db.execute(
                f"SELECT key, {column} FROM documents WHERE key IN ({marks}) ORDER BY key", chunk
            ).fetchall()
            if rows:
                yield rows


def stored_document(row: tuple[Any, ...]) -> StoredDocument:
    """A row of DOCUMENT_COLUMNS."""
    key, external, text, metadata, tokens = row
    return StoredDocument(
        key=int(key),
        id=str(external),
        text=str(text),
        metadata=json.loads(metadata),
        token_ids=np.frombuffer(tokens, dtype=np.int32),
    )


def _in_chunks(values: Sequence[Any]) -> Iterator[tuple[list[Any], str]]:
    """``values`` in chunks of at most IN_CHUNK, each with its ``IN (...)`` placeholders."""
    for start in range(0, len(values), IN_CHUNK):
        chunk = list(values[start : start + IN_CHUNK])
        yield chunk, ",".join("?" * len(chunk))


def _unpack_vectors(
    rows: list[tuple[int, bytes]], ndim: int
) -> tuple[NDArray[np.uint64], NDArray[np.float32]]:
    vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32)
    counts = _counts([(key, len(blob)) for key, blob in rows], ndim)
    return _passage_keys([int(row[0]) for row in rows], counts), vectors.reshape(-1, ndim)


def _counts(rows: Sequence[tuple[Any, int]], ndim: int) -> NDArray[np.int64]:
    """Passages per document from (key, vector blob length) rows."""
    sizes = np.array([size for _, size in rows], dtype=np.int64)
    if (sizes % (VECTOR_BYTES * ndim)).any():
        raise ValueError(f"a stored vector is not a multiple of {ndim} dimensions")
    return sizes // (VECTOR_BYTES * ndim)


def _passage_keys(keys: Sequence[int], counts: NDArray[np.int64]) -> NDArray[np.uint64]:
    """``passage_key(k, p)`` for each document ``k`` and each of its passages ``p``."""
    documents = np.repeat(np.asarray(keys, dtype=np.uint64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    passages = (np.arange(len(documents)) - starts).astype(np.uint64)
    return documents | (passages << np.uint64(PASSAGE_SHIFT))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise unwritable(exc) from exc
        return self.db

    def __exit__(self, kind: object, value: BaseException | None, traceback: object) -> None:
        if kind is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback()
                raise unwritable(exc) from exc
            return
        self._rollback()
        if isinstance(value, sqlite3.OperationalError):
            # Read-only files and full disks surface here, mid-statement.
            raise unwritable(value) from value

    def _rollback(self) -> None:
        # SQLite rolls back by itself on some errors (SQLITE_FULL at COMMIT): then there is
        # no transaction left, and a second ROLLBACK would fail with an unhelpful error.
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
