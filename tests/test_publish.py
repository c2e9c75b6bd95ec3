"""Publishing versions for replicas: complete versions only, the pointer last, old ones
pruned; a replica-side collection opens a version read-only with its index memory-mapped."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tandem.cli import main
from tandem.encoders import BiEncoder
from tandem.server.engine.collection import Collection
from tandem.server.engine.index import IndexSettings
from tandem.server.engine.store import NewDocument, StoreReadOnly
from tandem.server.replication.publish import (
    PublishError,
    current_version,
    is_published_root,
    publish,
    version_folder,
)


@pytest.fixture(scope="module")
def embedder(bi_int8) -> BiEncoder:
    return BiEncoder(bi_int8[0])


def writer_with(folder: Path, embedder: BiEncoder, texts: list[str]) -> None:
    collection = Collection(folder, embedder=embedder, pairs=None, settings=IndexSettings())
    try:
        collection.upsert([NewDocument(f"d{i}", text) for i, text in enumerate(texts)])
        collection.checkpoint()
    finally:
        collection.close()


def open_version(root: Path, embedder: BiEncoder) -> Collection:
    version = current_version(root)
    return Collection(
        version_folder(root, version), embedder=embedder, pairs=None,
        settings=IndexSettings(), read_only=True, version=version,
    )  # fmt: skip


def test_versions_are_complete_pointed_to_last_and_pruned(tmp_path, embedder):
    writer, root = tmp_path / "writer", tmp_path / "root"
    writer_with(writer, embedder, ["alpha beta", "gamma delta"])
    assert publish(writer, root, keep=2) == "000001"
    assert is_published_root(root)
    assert current_version(root) == "000001"
    writer_with(writer, embedder, ["alpha beta", "gamma delta", "epsilon zeta"])
    assert publish(writer, root, keep=2) == "000002"
    assert publish(writer, root, keep=2) == "000003"
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["000002", "000003"]
    folder = version_folder(root, "000003")
    assert {p.name for p in folder.iterdir()} == {
        "documents.sqlite", "vectors.usearch", "vectors.usearch.json", "lexical", "lexical.json"
    }  # fmt: skip
    # Rollback-journal mode: a replica can open it from a read-only folder, no -wal or -shm.
    with sqlite3.connect(folder / "documents.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    replica = open_version(root, embedder)
    try:
        assert replica.read_only
        assert replica.version == "000003"
        assert len(replica.index) == 3 == len(replica.store) == len(replica.lexical)
        assert replica.lexical.writer is None  # opened in place, read-only
        assert replica.get(["d2"])["d2"].text == "epsilon zeta"
        (key,) = replica.lexical.search("zeta", 5).keys
        assert replica.store.by_keys([int(key)])[int(key)].id == "d2"
        with pytest.raises(StoreReadOnly):
            replica.upsert([NewDocument("d9", "refused")])
    finally:
        replica.close()


def test_the_index_is_repaired_to_the_snapshot_not_copied(tmp_path, embedder):
    """The writer's index file lags its store (it saves every checkpoint_seconds): the
    version's index must hold exactly the snapshot's documents."""
    writer, root = tmp_path / "writer", tmp_path / "root"
    writer_with(writer, embedder, ["one", "two"])
    collection = Collection(writer, embedder=embedder, pairs=None, settings=IndexSettings())
    collection.upsert([NewDocument("late", "written after the last index save")])
    collection.close()  # no checkpoint: the index file still has 2 vectors, the store 3
    publish(writer, root)
    replica = open_version(root, embedder)
    try:
        assert len(replica.index) == 3 == len(replica.lexical)
        hits = replica.index.search(embedder.embed(["written after the last index save"])[0], 1)
        assert replica.store.by_keys([int(hits.keys[0])])[int(hits.keys[0])].id == "late"
        (key,) = replica.lexical.search("written", 5).keys
        assert replica.store.by_keys([int(key)])[int(key)].id == "late"
    finally:
        replica.close()


def test_a_writer_without_a_lexical_index_publishes_one(tmp_path, embedder):
    """A collection from before the lexical index, or one whose segments are gone: the
    version gets one built from the snapshot, which the replica opens in place."""
    writer, root = tmp_path / "writer", tmp_path / "root"
    writer_with(writer, embedder, ["one fish", "two fish", "red fish"])
    shutil.rmtree(writer / "lexical")
    (writer / "lexical.json").unlink()
    publish(writer, root)
    replica = open_version(root, embedder)
    try:
        assert replica.lexical.writer is None
        assert len(replica.lexical) == 3
        assert len(replica.lexical.search("red", 5).keys) == 1
    finally:
        replica.close()


def test_a_version_left_half_written_is_never_pointed_to(tmp_path, embedder):
    writer, root = tmp_path / "writer", tmp_path / "root"
    writer_with(writer, embedder, ["one"])
    publish(writer, root)
    staging = root / "versions" / ".000002.tmp"  # a publisher that died mid-copy
    staging.mkdir()
    (staging / "documents.sqlite").write_bytes(b"half")
    assert current_version(root) == "000001"
    assert publish(writer, root) == "000002"  # the next publish starts over cleanly
    assert not staging.exists()
    replica = open_version(root, embedder)
    replica.close()


def test_publish_command_reports_bad_input(tmp_path, capsys):
    assert main(["index", "publish", "--collection", str(tmp_path / "nothing"),
                 "--root", str(tmp_path / "root")]) == 2  # fmt: skip
    assert "not a collection" in capsys.readouterr().err
    with pytest.raises(PublishError, match="keep"):
        publish(tmp_path, tmp_path / "root", keep=0)
