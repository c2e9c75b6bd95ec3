"""The store and the index stay consistent through add, remove, save, reopen and crashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tandem.server.engine.filters import parse_filter
from tandem.server.engine.index import (
    IndexCorrupt,
    IndexSettings,
    VectorIndex,
    fold_passages,
    load_consistent,
)
from tandem.server.engine.store import (
    DocumentStore,
    NewDocument,
    StoreError,
    document_keys,
    passage_key,
)

DIM = 16
SETTINGS = IndexSettings(dtype="f32", exact_below=0)


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def add_documents(store: DocumentStore, ids: list[str], seed: int = 0):
    docs = [
        NewDocument(id=item, text=f"text of {item}", metadata={"n": i})
        for i, item in enumerate(ids)
    ]
    tokens = [np.arange(i + 1, dtype=np.int32) for i in range(len(ids))]
    vectors = unit_vectors(len(ids), seed)
    return store.upsert(docs, vectors, tokens), vectors


@pytest.fixture
def store(tmp_path: Path):
    opened = DocumentStore(tmp_path / "docs.sqlite")
    yield opened
    opened.close()


def test_upsert_get_delete_round_trip(store: DocumentStore) -> None:
    written, _ = add_documents(store, ["a", "b", "c"])
    assert written.keys == [1, 2, 3]
    assert written.replaced == []
    got = store.by_ids(["b", "missing"])
    assert list(got) == ["b"]
    assert got["b"].text == "text of b"
    assert got["b"].metadata == {"n": 1}
    assert got["b"].token_ids.tolist() == [0, 1]
    assert store.stored_ids(["c", "missing", "a", "c"]) == {"a", "c"}
    assert store.delete(["a", "nope"]) == [1]
    assert store.stored_ids(["a", "b"]) == {"b"}
    assert len(store) == 2
    assert store.generation == 2


def test_reupsert_gets_a_fresh_key(store: DocumentStore) -> None:
    add_documents(store, ["a", "b"])
    again, _ = add_documents(store, ["a"], seed=5)
    assert again.keys == [3]
    assert again.replaced == [1]
    assert store.by_ids(["a"])["a"].key == 3
    assert store.keys().tolist() == [2, 3]


def test_duplicate_ids_in_one_batch_are_refused_whole(store: DocumentStore) -> None:
    add_documents(store, ["keep"])
    with pytest.raises(StoreError, match="'x' appears twice"):
        add_documents(store, ["x", "y", "x"])
    assert store.keys().tolist() == [1]


def test_index_search_finds_nearest_and_survives_reopen(tmp_path: Path, store) -> None:
    written, vectors = add_documents(store, [f"d{i}" for i in range(200)])
    index = load_consistent(tmp_path / "vectors.usearch", store, ndim=DIM, settings=SETTINGS)
    hits = index.search(vectors[17], 5)
    assert int(hits.keys[0]) == written.keys[17]
    assert hits.similarities[0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(hits.similarities) <= 1e-6)
    reopened, sidecar = VectorIndex.open(tmp_path / "vectors.usearch", ndim=DIM, settings=SETTINGS)
    assert sidecar["generation"] == store.generation
    assert sorted(reopened.keys().tolist()) == written.keys


def test_crash_between_store_commit_and_index_save_is_repaired(tmp_path: Path, store) -> None:
    path = tmp_path / "vectors.usearch"
    add_documents(store, [f"d{i}" for i in range(50)])
    load_consistent(path, store, ndim=DIM, settings=SETTINGS)
    # The store commits more writes; the process dies before the index is saved again.
    store.delete(["d3", "d4"])
    later, later_vectors = add_documents(store, ["n1", "n2"], seed=9)
    repaired = load_consistent(path, store, ndim=DIM, settings=SETTINGS)
    assert sorted(repaired.keys().tolist()) == store.keys().tolist()
    assert int(repaired.search(later_vectors[1], 1).keys[0]) == later.keys[1]
    _, sidecar = VectorIndex.open(path, ndim=DIM, settings=SETTINGS)
    assert sidecar["generation"] == store.generation


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_index_file_is_rebuilt_from_the_store(
    tmp_path: Path, store, damage, caplog
) -> None:
    path = tmp_path / "vectors.usearch"
    add_documents(store, [f"d{i}" for i in range(30)])
    load_consistent(path, store, ndim=DIM, settings=SETTINGS)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "delete":
        path.unlink()
    else:
        content = bytearray(path.read_bytes())
        content[len(content) // 2] ^= 0xFF
        path.write_bytes(bytes(content))
    with pytest.raises(IndexCorrupt):
        VectorIndex.open(path, ndim=DIM, settings=SETTINGS)
    rebuilt = load_consistent(path, store, ndim=DIM, settings=SETTINGS)
    assert sorted(rebuilt.keys().tolist()) == store.keys().tolist()
    assert "rebuilding from the store" in caplog.text


def test_exact_search_below_threshold_matches_brute_force(tmp_path: Path, store) -> None:
    _, vectors = add_documents(store, [f"d{i}" for i in range(300)])
    exact = load_consistent(
        tmp_path / "v.usearch",
        store,
        ndim=DIM,
        settings=IndexSettings(dtype="f32", exact_below=10_000),
    )
    query = unit_vectors(1, 77)[0]
    brute = np.argsort(-(vectors @ query))[:20] + 1
    assert exact.search(query, 20).keys.tolist() == brute.tolist()


def test_view_opens_read_only_memory_map(tmp_path: Path, store) -> None:
    written, vectors = add_documents(store, [f"d{i}" for i in range(40)])
    load_consistent(tmp_path / "v.usearch", store, ndim=DIM, settings=SETTINGS)
    view, _ = VectorIndex.open(tmp_path / "v.usearch", ndim=DIM, settings=SETTINGS, view=True)
    assert int(view.search(vectors[5], 1).keys[0]) == written.keys[5]


def test_read_only_store_refuses_writes_but_reads(tmp_path: Path, store) -> None:
    add_documents(store, ["a"])
    reader = DocumentStore(tmp_path / "docs.sqlite", read_only=True)
    try:
        assert reader.by_ids(["a"])["a"].text == "text of a"
        with pytest.raises(StoreError, match="cannot be written"):
            reader.delete(["a"])
    finally:
        reader.close()


@pytest.mark.parametrize(
    "key", ["plain", "a.b[0]", "café", "", "\x00", 'quo"te', "back\\slash", "\n"]
)
def test_keys_matching_takes_any_metadata_key(store: DocumentStore, key: str) -> None:
    """A key SQLite's JSON paths cannot hold (found by the fuzzer: a NUL) is matched in Python."""
    documents = [
        NewDocument(id="hit", text="t", metadata={key: "x", "n": 1}),
        NewDocument(id="miss", text="t", metadata={key: "y", "n": 1}),
        NewDocument(id="absent", text="t", metadata={"n": 1}),
    ]
    written = store.upsert(documents, unit_vectors(3, 1), [np.arange(2, dtype=np.int32)] * 3)
    for raw, expected in (
        ({key: "x"}, [written.keys[0]]),
        ({key: "x", "n": 1}, [written.keys[0]]),
        ({key: {"$in": ["x", "y"]}, "n": {"$lt": 2}}, written.keys[:2]),
        ({key: "z"}, []),
    ):
        wanted = parse_filter(raw)
        assert wanted is not None
        assert store.keys_matching(wanted) == expected


def add_passages(store: DocumentStore, counts: dict[str, int], seed: int = 0):
    """Documents of ``counts[id]`` passage vectors each."""
    docs = [NewDocument(id=item, text=f"text of {item}") for item in counts]
    vectors = [unit_vectors(count, seed + i) for i, count in enumerate(counts.values())]
    tokens = [np.zeros(1, dtype=np.int32) for _ in counts]
    return store.upsert(docs, vectors, tokens), vectors


def test_a_documents_passages_share_its_row_and_key(store: DocumentStore) -> None:
    written, vectors = add_passages(store, {"one": 1, "three": 3, "two": 2})
    one, three, two = written.keys
    assert store.vector_count(DIM) == 6
    expected = [one, three, passage_key(three, 1), passage_key(three, 2), two,
                passage_key(two, 1)]  # fmt: skip
    assert store.vector_keys(DIM).tolist() == expected
    keys, stored = next(store.vectors(DIM, [three]))
    assert keys.tolist() == expected[1:4]
    assert np.array_equal(stored, vectors[1])
    assert document_keys(keys).tolist() == [three] * 3
    assert len(store) == 3  # documents, not passages


def test_passages_are_searched_as_documents_and_go_together(tmp_path: Path, store) -> None:
    path = tmp_path / "vectors.usearch"
    counts = {f"d{i}": 1 + i % 4 for i in range(60)}
    written, vectors = add_passages(store, counts)
    index = load_consistent(path, store, ndim=DIM, settings=SETTINGS)
    assert len(index) == sum(counts.values())
    assert index.documents == 60
    # A document's third passage finds the document, once, with that passage's similarity.
    hits = index.search_documents(vectors[7][2], 60)
    assert int(hits.keys[0]) == written.keys[7]
    assert hits.similarities[0] == pytest.approx(1.0, abs=1e-5)
    assert len(set(hits.keys.tolist())) == len(hits.keys) == 60
    assert np.all(np.diff(hits.similarities) <= 1e-6)
    # Kept as the nearest of each document's passages.
    probe = vectors[7][2]
    best = [max(float(v @ probe) for v in group) for group in vectors]
    ranked = sorted(range(60), key=lambda i: -best[i])[:10]
    assert hits.keys[:10].tolist() == [written.keys[i] for i in ranked]
    index.remove_documents([written.keys[7]])
    assert len(index) == sum(counts.values()) - counts["d7"]
    assert written.keys[7] not in index.search_documents(probe, 60).keys.tolist()


def test_a_crash_leaves_passages_the_repair_restores(tmp_path: Path, store) -> None:
    path = tmp_path / "vectors.usearch"
    add_passages(store, {f"d{i}": 2 for i in range(20)})
    load_consistent(path, store, ndim=DIM, settings=SETTINGS)
    # Committed to the store, never saved to the index: a replace, a delete and a new one.
    replaced, vectors = add_passages(store, {"d3": 4, "new": 3}, seed=50)
    store.delete(["d5"])
    repaired = load_consistent(path, store, ndim=DIM, settings=SETTINGS)
    assert sorted(repaired.keys().tolist()) == sorted(store.vector_keys(DIM).tolist())
    assert len(repaired) == 19 * 2 - 2 + 4 + 3
    assert int(repaired.search_documents(vectors[0][3], 1).keys[0]) == replaced.keys[0]
    rebuilt, _ = VectorIndex.open(path, ndim=DIM, settings=SETTINGS)
    assert len(rebuilt) == len(repaired)


def test_fold_passages_keeps_each_documents_best() -> None:
    keys = np.array([passage_key(5, 1), 9, 5, passage_key(9, 2), 3], dtype=np.uint64)
    similarities = np.array([0.9, 0.2, 0.95, 0.7, 0.1], dtype=np.float32)
    folded = fold_passages(keys, similarities)
    assert folded.keys.tolist() == [5, 9, 3]
    assert folded.similarities.tolist() == pytest.approx([0.95, 0.7, 0.1])
