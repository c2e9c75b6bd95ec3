"""A collection on disk: the document store, the vector index kept consistent with it, and writes.

A write commits to the store first (that is the acknowledgement), then updates the in-memory
index. The index file is saved by ``checkpoint``; if the process dies before that, start-up
repairs the index from the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from server.index import IndexSettings, VectorIndex, load_consistent, rebuild
from server.pairs import PairTokenizer
from server.store import DocumentStore, NewDocument, StoredDocument, StoreUnavailable, Upserted
from tandem.encoders import BiEncoder

log = logging.getLogger(__name__)

STORE_NAME = "documents.sqlite"
INDEX_NAME = "vectors.usearch"
TOKENIZER_KEY = "reranker_tokenizer"
EMBEDDER_KEY = "bi_encoder"


@dataclass(frozen=True)
class CollectionPaths:
    folder: Path

    @property
    def store(self) -> Path:
        return self.folder / STORE_NAME

    @property
    def index(self) -> Path:
        return self.folder / INDEX_NAME


@dataclass(frozen=True)
class Prepared:
    """Documents with their vectors and reranker token ids, ready to commit."""

    documents: list[NewDocument]
    vectors: NDArray[np.float32]
    token_ids: list[NDArray[np.int32]]
    truncated: NDArray[np.bool_]  # text cut to the bi-encoder's max length


class CollectionError(Exception):
    """The collection on disk was built with other models than the ones being served."""


class Collection:
    def __init__(
        self,
        folder: Path,
        *,
        embedder: BiEncoder,
        pairs: PairTokenizer | None,
        settings: IndexSettings,
        read_only: bool = False,
        version: str | None = None,
    ) -> None:
        self.paths = CollectionPaths(folder)
        self.version = version  # the published version, for a replica (server.publish)
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
        try:
            self.store = DocumentStore(self.paths.store, read_only=read_only)
        except StoreUnavailable as exc:
            raise CollectionError(str(exc)) from exc
        self._check_embedder()
        self._retokenize_if_stale()
        self.index: VectorIndex = load_consistent(
            self.paths.index, self.store, ndim=embedder.dimension, settings=settings,
            writable=not read_only,
        )  # fmt: skip

    def close(self) -> None:
        self.store.close()

    def __len__(self) -> int:
        return len(self.store)

    def _check_embedder(self) -> None:
        fingerprint = self.embedder.manifest.files.get("model.onnx", "")
        recorded = self.store.get_meta(EMBEDDER_KEY)
        if recorded is None:
            if not self.read_only:
                self.store.set_meta(EMBEDDER_KEY, fingerprint)
        elif recorded != fingerprint:
            raise CollectionError(
                f"{self.paths.folder} was embedded with another bi-encoder (model sha256 "
                f"{recorded[:12]}…); serve that model, or rebuild the collection with this one"
            )

    def _tokenizer_fingerprint(self) -> str:
        if self.pairs is None:
            return ""
        spec = f"{self.pairs.tokenizer.to_str()}|{self.pairs.template.max_length}"
        return hashlib.sha256(spec.encode()).hexdigest()

    def _retokenize_if_stale(self) -> None:
        """Stored reranker ids must come from the reranker being served; redo them if not."""
        fingerprint = self._tokenizer_fingerprint()
        if self.store.get_meta(TOKENIZER_KEY) == fingerprint or self.pairs is None:
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
            keys = self.store.keys().tolist()
            for start in range(0, len(keys), 1000):
                documents = self.store.by_keys(keys[start : start + 1000])
                ordered = list(documents.values())
                self.store.replace_token_ids(
                    [doc.key for doc in ordered],
                    self.pairs.tokenize([doc.text for doc in ordered]),
                )
        self.store.set_meta(TOKENIZER_KEY, fingerprint)

    def upsert(self, documents: Sequence[NewDocument], *, batch_size: int = 32) -> Upserted:
        """Embeds, tokenizes and commits ``documents``; durable once this returns."""
        return self.commit(self.prepare(documents, batch_size=batch_size))

    def prepare(self, documents: Sequence[NewDocument], *, batch_size: int = 32) -> Prepared:
        """The model work of an upsert. Touches neither store nor index, so it may run on
        another thread than ``commit`` (the server keeps it off the store's thread)."""
        texts = [document.text for document in documents]
        vectors, truncated = self.embedder.encode(texts, batch_size=batch_size)
        if self.pairs is not None:
            token_ids = self.pairs.tokenize(texts)
        else:
            token_ids = [np.zeros(0, dtype=np.int32) for _ in texts]
        return Prepared(list(documents), vectors, token_ids, truncated)

    def commit(self, prepared: Prepared) -> Upserted:
        written = self.store.upsert(prepared.documents, prepared.vectors, prepared.token_ids)
        self.index.remove(written.replaced)
        self.index.add(np.asarray(written.keys, dtype=np.uint64), prepared.vectors)
        return written

    def delete(self, ids: Sequence[str]) -> list[int]:
        keys = self.store.delete(ids)
        self.index.remove(keys)
        return keys

    def get(self, ids: Sequence[str]) -> dict[str, StoredDocument]:
        return self.store.by_ids(ids)

    def checkpoint(self) -> None:
        """Saves the index at the store's generation, so the next start-up need not repair."""
        if self.read_only:
            return  # nothing was written, and nothing could be
        self.index.save(self.paths.index, generation=self.store.generation)

    def compact(self) -> None:
        """Rebuilds the index from the store, dropping the graph's deleted slots."""
        self.index = rebuild(self.store, ndim=self.embedder.dimension, settings=self.index.settings)
        self.checkpoint()
