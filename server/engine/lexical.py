"""The lexical index: tantivy BM25 over the documents' text, and its repair from the store.

Like the vector index, it is a cache of the store: a folder of tantivy segments beside a
JSON sidecar holding the store generation it was saved at and its document count. Every
write is committed to it right after the store's (so a search sees it at once); start-up
compares the sidecar with the store and catches up by key, or rebuilds a folder that will
not open. Documents are keyed by the store's uint64 key, never by external id, so a stale
entry can never name the wrong text. Text is indexed, not stored: the store keeps it.

Read-only (a replica, a read-only folder), an index that agrees with the store is opened
in place; one that does not is rebuilt in memory from the store, and the folder is left alone.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tantivy
from numpy.typing import NDArray

from tandem.durable import write_text_atomically
from tandem.server.engine.index import Hits
from tandem.server.engine.store import DocumentStore

log = logging.getLogger(__name__)

ANALYZER = "tandem_en"
# Bumped when the schema or the analyzer changes: an index built otherwise is rebuilt.
FORMAT = 1
# tantivy's writer splits this arena among its threads (at least 15 MB each); one thread
# keeps a write's cost off the cores serving searches, and merges run in the background.
WRITER_HEAP_BYTES = 64_000_000
WRITER_THREADS = 1


def analyzer() -> tantivy.TextAnalyzer:
    """Words of letters and digits, lowercased, English stop words dropped, stemmed: a
    product code like "XJ-9000" becomes "xj" and "9000", in documents and queries alike."""
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(40))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.stopword("english"))
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )


def schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_unsigned_field("key", indexed=True, fast=True)
    # Term frequencies without positions: BM25 needs no more, and positions would double
    # the index for phrase queries nobody sends here.
    builder.add_text_field("text", tokenizer_name=ANALYZER, index_option="freq")
    return builder.build()


class LexicalCorrupt(Exception):
    """The lexical index folder is missing, unreadable, or of another format."""


class LexicalWriteFailed(OSError):
    """tantivy could not commit (a full or read-only disk): an OSError, as for the vector
    index's saves, so the callers that survive those survive this."""


class LexicalIndex:
    """One tantivy index. Not thread-safe: its owner calls it from one thread at a time
    (the server's store lane), like the vector index."""

    def __init__(self, index: tantivy.Index, *, writable: bool) -> None:
        self.analyzer = analyzer()
        index.register_tokenizer(ANALYZER, self.analyzer)
        self.index = index
        self.schema = index.schema
        self.writer = self._open_writer() if writable else None
        self.index.reload()
        self.searcher = index.searcher()

    @classmethod
    def in_memory(cls) -> LexicalIndex:
        return cls(tantivy.Index(schema()), writable=True)

    @classmethod
    def create(cls, folder: Path) -> LexicalIndex:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return cls(tantivy.Index(schema(), path=str(folder), reuse=False), writable=True)

    @classmethod
    def open(cls, folder: Path, *, writable: bool) -> tuple[LexicalIndex, dict[str, Any]]:
        """Opens a saved index with its sidecar; raises ``LexicalCorrupt`` where either is
        missing, unreadable or of another format."""
        try:
            sidecar = json.loads(_sidecar(folder).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LexicalCorrupt(f"{_sidecar(folder)} is missing or unreadable: {exc}") from exc
        if sidecar.get("format") != FORMAT:
            raise LexicalCorrupt(f"{folder} is of format {sidecar.get('format')}, not {FORMAT}")
        if not (folder / "meta.json").is_file():
            raise LexicalCorrupt(f"{folder} holds no tantivy index")
        try:
            return cls(tantivy.Index.open(str(folder)), writable=writable), sidecar
        except BaseException as exc:
            if not _unreadable(exc):
                raise
            raise LexicalCorrupt(f"{folder} cannot be opened: {exc}") from exc

    def __len__(self) -> int:
        return int(self.searcher.num_docs)

    def add(self, keys: Sequence[int], texts: Sequence[str]) -> None:
        """Adds documents; they are searchable after ``commit``."""
        writer = self._writer()
        with _writing("add documents to"):
            for key, text in zip(keys, texts, strict=True):
                document = tantivy.Document()
                document.add_unsigned("key", int(key))
                document.add_text("text", text)
                writer.add_document(document)

    def remove(self, keys: Iterable[int]) -> None:
        wanted = [int(key) for key in keys]
        if wanted:
            # By query, not delete_documents_by_term: that makes a signed term from a Python
            # int, which matches nothing in an unsigned field (tantivy 0.27), silently.
            with _writing("remove documents from"):
                self._writer().delete_documents_by_query(
                    tantivy.Query.term_set_query(self.schema, "key", wanted)
                )

    def commit(self) -> None:
        """Makes every add and remove so far durable and searchable (about 15 ms here)."""
        with _writing("commit"):
            self._writer().commit()
        self.index.reload()
        self.searcher = self.index.searcher()

    def renew_writer(self) -> None:
        """A fresh writer, after one failed (tantivy stops a writer whose commit failed);
        what the old one held uncommitted is gone, so the caller catches up from the store."""
        self.writer = None  # dropping it releases the folder's writer lock
        with _writing("open a writer on"):
            self.writer = self._open_writer()

    def _open_writer(self) -> tantivy.IndexWriter:
        return self.index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=WRITER_THREADS)

    def _writer(self) -> tantivy.IndexWriter:
        if self.writer is None:
            raise RuntimeError("this lexical index was opened read-only")
        return self.writer

    def terms(self, query: str) -> list[str]:
        return list(dict.fromkeys(self.analyzer.analyze(query)))

    def search(self, query: str, count: int) -> Hits:
        """The ``count`` best documents by BM25 (any query term may match), best first."""
        terms = self.terms(query)
        if not terms or count <= 0 or len(self) == 0:
            return Hits(np.zeros(0, np.uint64), np.zeros(0, np.float32))
        matched = tantivy.Query.boolean_query(
            [
                (tantivy.Occur.Should, tantivy.Query.term_query(self.schema, "text", term))
                for term in terms
            ]
        )
        found = self.searcher.search(matched, min(count, len(self)), count=False).hits
        keys = self.searcher.fast_field_values("key", [address for _, address in found])
        return Hits(
            np.asarray(keys, dtype=np.uint64), np.asarray([s for s, _ in found], np.float32)
        )

    def keys(self) -> NDArray[np.uint64]:
        if len(self) == 0:
            return np.zeros(0, np.uint64)
        found = self.searcher.search(tantivy.Query.all_query(), len(self), count=False).hits
        keys = self.searcher.fast_field_values("key", [address for _, address in found])
        return np.sort(np.asarray(keys, dtype=np.uint64))

    def catch_up(self, store: DocumentStore) -> tuple[int, int]:
        """Makes the index hold exactly the store's documents; returns (removed, added)."""
        stored = store.keys()
        indexed = self.keys()
        extra = np.setdiff1d(indexed, stored)
        missing = np.setdiff1d(stored, indexed)
        self.remove(extra.tolist())
        for keys, texts in store.texts(missing.tolist()):
            self.add(keys, texts)
        self.commit()
        return len(extra), len(missing)

    def save(self, folder: Path, *, generation: int) -> None:
        """Commits, then records the store generation the index now reflects. The sidecar is
        written after the commit, so it never claims more than the segments hold."""
        self.commit()
        sidecar = {"format": FORMAT, "generation": generation, "count": len(self)}
        write_text_atomically(_sidecar(folder), json.dumps(sidecar, indent=2) + "\n")

    def close(self) -> None:
        """Lets background merges finish and releases the folder's writer lock."""
        if self.writer is not None:
            self.writer.wait_merging_threads()  # consumes the writer
            self.writer = None


@contextmanager
def _writing(action: str) -> Iterator[None]:
    try:
        yield
    except ValueError as error:  # tantivy reports I/O errors, and a stopped writer, so
        raise LexicalWriteFailed(f"the lexical index could not {action}: {error}") from error


def load_consistent(folder: Path, store: DocumentStore, *, writable: bool = True) -> LexicalIndex:
    """Returns a lexical index that agrees with the store, repairing or rebuilding it.

    ``writable``: the repair is made in ``folder`` and saved. Otherwise an index that agrees
    is opened in place, and any other is rebuilt in memory."""
    try:
        index, sidecar = LexicalIndex.open(folder, writable=writable)
    except LexicalCorrupt as exc:
        if len(store):
            log.warning("lexical index %s unusable (%s): rebuilding from the store", folder, exc)
        return _rebuilt(folder, store, writable=writable)
    if sidecar.get("generation") == store.generation and len(index) == len(store):
        return index
    if not writable:
        log.warning(
            "lexical index %s is at generation %s, store at %s: rebuilt in memory",
            folder, sidecar.get("generation"), store.generation,
        )  # fmt: skip
        return _rebuilt(folder, store, writable=False)
    removed, added = index.catch_up(store)
    log.warning(
        "lexical index %s is at generation %s, store at %s: removed %d and added %d documents",
        folder, sidecar.get("generation"), store.generation, removed, added,
    )  # fmt: skip
    index.save(folder, generation=store.generation)
    return index


def _rebuilt(folder: Path, store: DocumentStore, *, writable: bool) -> LexicalIndex:
    index = LexicalIndex.create(folder) if writable else LexicalIndex.in_memory()
    for keys, texts in store.texts():
        index.add(keys, texts)
    if writable:
        index.save(folder, generation=store.generation)  # commits
    else:
        index.commit()
    return index


def copy_segments(source: Path, target: Path) -> None:
    """Copies an index folder without its lock files (a publish snapshot starts from it)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith(".tantivy-"):
            shutil.copy2(path, target / path.name)


def _unreadable(error: BaseException) -> bool:
    """tantivy reports unreadable files as ValueError (or OSError: a lock file it cannot
    create on a read-only mount), and panics on some truncated ones (pyo3's
    PanicException, which derives from BaseException and cannot be imported)."""
    return isinstance(error, ValueError | OSError) or type(error).__name__ == "PanicException"


def _sidecar(folder: Path) -> Path:
    return folder.with_name(folder.name + ".json")
