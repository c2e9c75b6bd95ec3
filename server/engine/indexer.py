"""`tandem index build`: bulk-loads a JSONL corpus into a collection, in batches, resumably.

Each batch is one store transaction, so an interrupted build keeps every batch it finished;
run the same command again and it skips the ids already stored. The index is checkpointed
every ``checkpoint_every`` documents and at the end, so a resumed build repairs little.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tandem.server.engine.collection import Collection
from tandem.server.engine.store import NewDocument


class CorpusError(Exception):
    """A corpus line is not a JSON object with a string ``id`` and ``text``."""


@dataclass(frozen=True)
class BuildReport:
    total: int
    added: int
    skipped: int
    seconds: float


def open_corpus(path: Path) -> TextIO:
    if not path.is_file():
        raise CorpusError(f"{path}: no such file; pass a .jsonl or .jsonl.gz corpus")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def read_corpus(path: Path) -> Iterator[NewDocument]:
    with open_corpus(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise CorpusError(f"{path}:{number}: expected a JSON object")
            identifier, text = record.get("id"), record.get("text")
            if not isinstance(identifier, str) or not identifier:
                raise CorpusError(f'{path}:{number}: "id" must be a non-empty string')
            if not isinstance(text, str):
                raise CorpusError(f'{path}:{number}: "text" must be a string')
            metadata = record.get("metadata", {})
            if not isinstance(metadata, dict):
                raise CorpusError(f'{path}:{number}: "metadata" must be a JSON object')
            yield NewDocument(id=identifier, text=text, metadata=metadata)


def count_documents(path: Path) -> int:
    with open_corpus(path) as handle:
        return sum(1 for line in handle if line.strip())


class Progress:
    """A one-line progress bar on stderr with docs/s and the time left."""

    def __init__(self, total: int, *, stream: TextIO = sys.stderr, every: float = 0.5) -> None:
        self.total = total
        self.stream = stream
        self.every = every
        self.started = time.monotonic()
        self.shown = 0.0

    def update(self, done: int, added: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.shown < self.every:
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-9)
        rate = added / elapsed
        left = (self.total - done) / rate if rate > 0 else float("inf")
        filled = int(30 * done / max(self.total, 1))
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} docs, "
            f"{rate:,.1f} docs/s, {left:,.0f} s left   "
        )
        if final:
            self.stream.write("\n")
        self.stream.flush()


def build(
    collection: Collection,
    corpus: Path,
    *,
    batch_size: int = 64,
    checkpoint_every: int = 10_000,
    progress: Progress | None = None,
) -> BuildReport:
    total = count_documents(corpus)
    progress = progress or Progress(total)
    started = time.monotonic()
    done = added = skipped = since_checkpoint = 0
    batch: list[NewDocument] = []

    def flush() -> None:
        nonlocal added, skipped, since_checkpoint
        present = set(collection.get([document.id for document in batch]))
        fresh = []
        for document in batch:  # the first occurrence of an id wins, as on a resumed run
            if document.id not in present:
                present.add(document.id)
                fresh.append(document)
        skipped += len(batch) - len(fresh)
        if fresh:
            collection.upsert(fresh)
            added += len(fresh)
            since_checkpoint += len(fresh)
        if since_checkpoint >= checkpoint_every:
            collection.checkpoint()
            since_checkpoint = 0
        batch.clear()

    for document in read_corpus(corpus):
        batch.append(document)
        done += 1
        if len(batch) == batch_size:
            flush()
            progress.update(done, added)
    if batch:
        flush()
    collection.checkpoint()
    progress.update(done, added, final=True)
    return BuildReport(total=done, added=added, skipped=skipped, seconds=time.monotonic() - started)
