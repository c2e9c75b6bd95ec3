"""One writer publishes versions of a collection; read-only replicas follow a pointer.

A published root holds immutable versions and a pointer to the newest::

    root/versions/000007/documents.sqlite     a consistent snapshot of the writer's store
    root/versions/000007/vectors.usearch      its index, at the snapshot's generation
    root/versions/000007/vectors.usearch.json the index's sidecar (generation, count, sha256)
    root/versions/000007/lexical/             the BM25 index (tantivy segments)
    root/versions/000007/lexical.json         its sidecar (generation, count)
    root/CURRENT                              "000007": written last

Publishing writes a version under a temporary name, fsyncs every file, renames it into
``versions/`` and fsyncs the folder, and only then replaces ``CURRENT`` the same way. A
replica that reads ``CURRENT`` therefore finds a complete version, and the index checksum
in the sidecar is checked again on open. Old versions are pruned after ``keep`` newer ones;
a replica still reading one keeps its open files (POSIX unlink semantics).

The snapshot uses SQLite's online backup, so the writer may go on writing (and serving)
while it runs; the writer's index files may lag its store, so each of the version's indexes
is repaired against the snapshot, not copied blindly. The lexical index is copied from the
writer's segments and caught up by key; should a merge remove a segment mid-copy, it is
rebuilt from the snapshot's text instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from tandem.durable import fsync_dir, fsync_file, write_text_atomically
from tandem.server.engine.index import IndexSettings, load_consistent
from tandem.server.engine.store import DocumentStore

log = logging.getLogger(__name__)

POINTER = "CURRENT"
VERSIONS = "versions"
STORE_NAME = "documents.sqlite"
INDEX_NAME = "vectors.usearch"
LEXICAL_NAME = "lexical"


class PublishError(Exception):
    """The source cannot be published (missing, or not a collection)."""


def is_published_root(folder: Path) -> bool:
    return (folder / POINTER).is_file()


def current_version(root: Path) -> str:
    return (root / POINTER).read_text(encoding="utf-8").strip()


def version_folder(root: Path, version: str) -> Path:
    return root / VERSIONS / version


def publish(source: Path, root: Path, *, keep: int = 3) -> str:
    """Publishes the collection in ``source`` as the next version under ``root``."""
    check_keep(keep)
    source_store = source / STORE_NAME
    if not source_store.is_file():
        raise PublishError(f"{source} holds no {STORE_NAME}: not a collection")
    ndim, settings = _index_shape(source / (INDEX_NAME + ".json"))
    written: dict[str, int] = {}

    def write(staging: Path) -> None:
        _snapshot_store(source_store, staging / STORE_NAME)
        snapshot = DocumentStore(staging / STORE_NAME, read_only=True)
        try:
            index = load_consistent(
                source / INDEX_NAME, snapshot, ndim=ndim, settings=settings, writable=False
            )
            index.save(staging / INDEX_NAME, generation=snapshot.generation)
            _snapshot_lexical(source / LEXICAL_NAME, staging / LEXICAL_NAME, snapshot)
            written.update(generation=snapshot.generation, documents=len(snapshot))
        finally:
            snapshot.close()

    version = publish_version(root / VERSIONS, root / POINTER, write, keep=keep)
    log.info("published", extra={"version": version, **written})
    return version


def publish_version(
    versions: Path, pointer: Path, write: Callable[[Path], None], *, keep: int
) -> str:
    """The one way a version is published (collections and rerankers alike): ``write`` fills
    a staging folder, which is fsynced and renamed into ``versions`` as the next number; only
    then is ``pointer`` replaced, so a follower never reads a half-written version. Versions
    older than the ``keep`` newest are pruned (a reader keeps its open files)."""
    check_keep(keep)
    versions.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in versions.iterdir() if p.name.isdigit())
    version = f"{int(existing[-1]) + 1 if existing else 1:06d}"
    staging = versions / f".{version}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        fsync_tree(staging)
        os.replace(staging, versions / version)
        fsync_dir(versions)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_text_atomically(pointer, version + "\n")
    for old in existing[: max(len(existing) + 1 - keep, 0)]:
        shutil.rmtree(versions / old, ignore_errors=True)
    return version


def check_keep(keep: int) -> None:
    """Refused before any work: pruning to no version would delete the one just published."""
    if keep < 1:
        raise PublishError(f"keep must be at least 1 (got {keep})")


def _snapshot_lexical(source: Path, target: Path, snapshot: DocumentStore) -> None:
    """The version's lexical index, at the snapshot's generation (none where tantivy cannot
    be imported: replicas then serve the dense first stage alone)."""
    try:
        from tandem.server.engine.lexical import copy_segments, load_consistent
    except ImportError as error:
        log.warning("tantivy cannot be imported (%s): the version has no lexical index", error)
        return
    try:
        copy_segments(source, target)
        sidecar = source.with_name(source.name + ".json")
        shutil.copy2(sidecar, target.with_name(target.name + ".json"))
    except OSError as error:  # no lexical index yet, or a merge removed a file mid-copy
        log.info("lexical index not copied (%s): building it from the snapshot", error)
        shutil.rmtree(target, ignore_errors=True)
    load_consistent(target, snapshot, writable=True).close()


def fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():
            fsync_tree(path)
        else:
            fsync_file(path)
    fsync_dir(folder)


def _index_shape(sidecar: Path) -> tuple[int, IndexSettings]:
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        return int(recorded["ndim"]), IndexSettings(**recorded["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PublishError(
            f"{sidecar} is missing or unreadable ({exc}): let the writer save its index "
            "(it does every checkpoint_seconds after writes, and at shutdown), then publish"
        ) from exc


def _snapshot_store(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite store, in rollback-journal mode so that a replica
    can open it from a read-only folder without -wal or -shm files."""
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    writer = sqlite3.connect(target)
    try:
        reader.backup(writer)
        writer.execute("PRAGMA journal_mode=DELETE")
    finally:
        writer.close()
        reader.close()
