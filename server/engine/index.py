"""The vector index: usearch HNSW (cosine) with atomic saves, and its repair from the store.

The index is a cache of the store's vectors: one per passage of each document (keys from
``store.passage_key``); searches ask for documents, each once, by its best passage. Its file
is written beside a small JSON sidecar holding the store generation it reflects, its vector
count and its sha256; start-up compares those with the store and repairs (or rebuilds)
rather than serve a mismatch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from usearch.index import Index

from tandem.durable import fsync_file, sha256_file, write_text_atomically
from tandem.server.engine.store import DocumentStore, document_keys, passage_key

log = logging.getLogger(__name__)

VectorDType = Literal["f32", "f16", "i8"]


@dataclass(frozen=True)
class IndexSettings:
    """How documents become vectors, and the HNSW graph's parameters. Larger graph values
    buy recall with memory (connectivity) or time."""

    dtype: VectorDType = "i8"  # i8 held recall@100 0.95-0.98 at ef=64 here, at 1/4 of f32 memory
    connectivity: int = 16  # graph degree M
    expansion_add: int = 128  # ef at build time
    expansion_search: int = 64  # ef at query time; 256 lifts recall@100 at 1M to 0.97
    # Below this many vectors a brute-force scan is cheap (about 9 ms for 100k on 2 cores,
    # far less at this size) and exact, so the graph is not consulted.
    exact_below: int = 10_000
    # A document longer than the bi-encoder's window is embedded as overlapping passages, up
    # to this many (64 windows of 256 tokens reach about 14,000 tokens: some 25 pages); past
    # them the text is not embedded (the upsert counts it truncated), but BM25 and the
    # reranker still read it. 1: the first window only.
    max_passages: int = 64
    passage_overlap: int = 32  # tokens a passage shares with the one before

    def __post_init__(self) -> None:
        if self.max_passages < 1:
            raise ValueError(f"max_passages must be at least 1 (got {self.max_passages})")
        if self.passage_overlap < 0:
            raise ValueError(f"passage_overlap must be >= 0 (got {self.passage_overlap})")


class IndexCorrupt(Exception):
    """The index file is missing, unreadable or does not match its sidecar."""


@dataclass(frozen=True)
class Hits:
    """Search results for one query, best first."""

    keys: NDArray[np.uint64]
    similarities: NDArray[np.float32]


class VectorIndex:
    def __init__(
        self, ndim: int, settings: IndexSettings, *, index: Index | None = None, removed: int = 0
    ) -> None:
        self.ndim = ndim
        self.settings = settings
        # Vectors removed since the graph was built: usearch keeps their slots until a rebuild.
        self.removed = removed
        self.index = index or Index(
            ndim=ndim,
            metric="cos",
            dtype=settings.dtype,
            connectivity=settings.connectivity,
            expansion_add=settings.expansion_add,
            expansion_search=settings.expansion_search,
        )

    def __len__(self) -> int:
        return len(self.index)

    def keys(self) -> NDArray[np.uint64]:
        """Every vector's key (a passage's; see ``store.passage_key``)."""
        return np.asarray(self.index.keys, dtype=np.uint64)

    @property
    def documents(self) -> int:
        """How many documents the vectors belong to (each has its passage 0)."""
        keys = self.keys()
        return int(np.count_nonzero(document_keys(keys) == keys))

    def add(self, keys: NDArray[np.uint64], vectors: NDArray[np.float32]) -> None:
        if len(keys):
            self.index.add(keys, np.ascontiguousarray(vectors, dtype=np.float32))

    def remove(self, keys: Iterable[int]) -> None:
        """Removes these vector keys (passages)."""
        present = [int(key) for key in keys if self.index.contains(int(key))]
        if present:
            self.index.remove(present)
            self.removed += len(present)

    def remove_documents(self, keys: Iterable[int]) -> None:
        """Removes every passage of these documents. A document's passages are numbered
        from 0 without gaps (they are added and removed together), so the first key missing
        ends it."""
        passages = []
        for key in keys:
            number = 0
            while self.index.contains(passage_key(int(key), number)):
                passages.append(passage_key(int(key), number))
                number += 1
        self.remove(passages)

    @property
    def removed_fraction(self) -> float:
        """The share of the graph's slots held by removed vectors."""
        total = len(self) + self.removed
        return self.removed / total if total else 0.0

    def search_documents(self, vector: NDArray[np.float32], count: int) -> Hits:
        """The ``count`` nearest documents, each once, by its nearest passage: it looks at
        more passages until ``count`` documents are among them or it has seen them all."""
        fetch = count
        while True:
            hits = self.search(vector, fetch)
            best = fold_passages(hits.keys, hits.similarities)
            if len(best.keys) >= count or fetch >= len(self):
                return Hits(best.keys[:count], best.similarities[:count])
            # The passages seen so far predict how many more cover ``count`` documents.
            fetch = min(len(self), max(fetch * 2, fetch * count // max(len(best.keys), 1) + 1))

    def search(self, vector: NDArray[np.float32], count: int) -> Hits:
        """The ``count`` nearest passages (vector keys)."""
        if len(self) == 0 or count <= 0:
            return Hits(np.zeros(0, np.uint64), np.zeros(0, np.float32))
        matches = self.index.search(
            np.asarray(vector, dtype=np.float32),
            min(count, len(self)),
            # Asking for every vector is a scan anyway, and the graph can miss some of them.
            exact=len(self) < self.settings.exact_below or count >= len(self),
        )
        keys = np.asarray(matches.keys, dtype=np.uint64)
        similarities = 1.0 - np.asarray(matches.distances, dtype=np.float32)
        return Hits(keys, similarities.astype(np.float32))

    def save(self, path: Path, *, generation: int) -> None:
        """Writes ``path`` and its sidecar atomically: temporary file, fsync, rename."""
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            self.index.save(str(temporary))
            fsync_file(temporary)
            digest = sha256_file(temporary)
            os.replace(temporary, path)
        except BaseException:
            # A full disk must not also keep a half-written copy filling it.
            temporary.unlink(missing_ok=True)
            raise
        sidecar = {
            "generation": generation,
            "count": len(self),
            "sha256": digest,
            "ndim": self.ndim,
            "removed": self.removed,
            "settings": asdict(self.settings),
        }
        write_text_atomically(_sidecar(path), json.dumps(sidecar, indent=2) + "\n")

    @classmethod
    def open(
        cls, path: Path, *, ndim: int, settings: IndexSettings, view: bool = False
    ) -> tuple[VectorIndex, dict[str, Any]]:
        """Opens a saved index (memory-mapped when ``view``) after checking its sidecar."""
        sidecar_path = _sidecar(path)
        if not path.is_file() or not sidecar_path.is_file():
            raise IndexCorrupt(f"{path} or its sidecar is missing")
        try:
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise IndexCorrupt(f"{sidecar_path} is unreadable: {exc}") from exc
        if sidecar.get("sha256") != sha256_file(path):
            raise IndexCorrupt(f"{path} does not match the checksum in its sidecar")
        if (
            sidecar.get("ndim") != ndim
            or sidecar.get("settings", {}).get("dtype") != settings.dtype
        ):
            raise IndexCorrupt(f"{path} was built for other settings ({sidecar.get('settings')})")
        try:
            loaded = Index.restore(str(path), view=view)
        except (RuntimeError, ValueError) as exc:
            raise IndexCorrupt(f"{path} cannot be loaded: {exc}") from exc
        if loaded is None or len(loaded) != sidecar.get("count"):
            raise IndexCorrupt(f"{path} holds a different number of vectors than recorded")
        if not view:
            # usearch defines this setter after the getter; mypy reads the property as read-only.
            loaded.expansion_search = settings.expansion_search  # type: ignore[misc]
        return cls(ndim, settings, index=loaded, removed=int(sidecar.get("removed", 0))), sidecar


def fold_passages(keys: NDArray[np.uint64], similarities: NDArray[np.float32]) -> Hits:
    """Passage hits folded into document hits: each document once, with its best passage's
    similarity, best first."""
    order = np.argsort(-similarities, kind="stable")
    documents = document_keys(keys)[order]
    _, first = np.unique(documents, return_index=True)
    kept = np.sort(first)  # positions in ``order``, so still best first
    return Hits(documents[kept], similarities[order][kept].astype(np.float32))


def recorded_settings(path: Path) -> IndexSettings | None:
    """The settings an index file's sidecar records (None: no readable sidecar)."""
    try:
        sidecar = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        return IndexSettings(**sidecar["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rebuild(store: DocumentStore, *, ndim: int, settings: IndexSettings) -> VectorIndex:
    index = VectorIndex(ndim, settings)
    for keys, vectors in store.vectors(ndim):
        index.add(keys, vectors)
    return index


def catch_up(index: VectorIndex, store: DocumentStore) -> tuple[int, int]:
    """Makes ``index`` hold exactly the store's vectors; returns (removed, added). Keys are
    never reused, so a replaced document shows up as one key gone and one new."""
    stored = store.vector_keys(index.ndim)
    indexed = index.keys()
    extra = np.setdiff1d(indexed, stored)
    missing = np.setdiff1d(stored, indexed)
    index.remove(extra.tolist())
    for keys, vectors in store.vectors(index.ndim, np.unique(document_keys(missing)).tolist()):
        wanted = np.isin(keys, missing)
        index.add(keys[wanted], vectors[wanted])
    return len(extra), len(missing)


def load_consistent(
    path: Path, store: DocumentStore, *, ndim: int, settings: IndexSettings, writable: bool = True
) -> VectorIndex:
    """Returns an index that agrees with the store, repairing or rebuilding it if needed.

    ``writable``: the repair is saved. Otherwise (a read-only collection, a replica) an index
    that agrees is memory-mapped rather than loaded, and a repair stays in memory."""
    vectors = store.vector_count(ndim)
    try:
        if not writable:
            view, sidecar = VectorIndex.open(path, ndim=ndim, settings=settings, view=True)
            if sidecar["generation"] == store.generation and len(view) == vectors:
                return view
        index, sidecar = VectorIndex.open(path, ndim=ndim, settings=settings)
    except IndexCorrupt as exc:
        if len(store):
            log.warning("index %s unusable (%s): rebuilding from the store", path, exc)
        index = rebuild(store, ndim=ndim, settings=settings)
        if writable:
            index.save(path, generation=store.generation)
        return index
    if sidecar["generation"] == store.generation and len(index) == vectors:
        return index
    removed, added = catch_up(index, store)
    log.warning(
        "index %s is at generation %s, store at %s: removed %d and added %d vectors",
        path, sidecar["generation"], store.generation, removed, added,
    )  # fmt: skip
    if writable:
        index.save(path, generation=store.generation)
    return index


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")
