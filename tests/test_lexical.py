"""The lexical index beside the vectors: kept consistent with the store through upserts,
replacements, deletes and crashes; fused with the dense ranking by RRF; and reported per hit."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tandem.encoders import BiEncoder
from tandem.server.engine.collection import Collection
from tandem.server.engine.errors import InvalidArgument
from tandem.server.engine.fusion import FirstStage, Fusion, reciprocal_rank_fusion
from tandem.server.engine.index import IndexSettings
from tandem.server.engine.lexical import LexicalIndex, LexicalWriteFailed
from tandem.server.engine.requests import SearchRequest, first_stage
from tandem.server.engine.search import Mode, Searcher
from tandem.server.engine.store import NewDocument, document_keys
from tandem.server.settings import Settings

WORDS = [
    "amber", "basalt", "cedar", "delta", "ember", "fjord",
    "glacier", "harbor", "indigo", "juniper", "kelp", "lagoon",
]  # fmt: skip


@pytest.fixture(scope="module")
def embedder(bi_int8) -> BiEncoder:
    return BiEncoder(bi_int8[0])


def open_collection(folder: Path, embedder: BiEncoder) -> Collection:
    return Collection(folder, embedder=embedder, pairs=None, settings=IndexSettings())


def assert_consistent(collection: Collection) -> None:
    stored = collection.store.keys()
    assert np.array_equal(collection.lexical.keys(), stored)
    assert np.array_equal(np.unique(document_keys(collection.index.keys())), stored)


def test_rrf_arithmetic_by_hand() -> None:
    # dense: 1, 2, 3; lexical: 3, 4. With k=60 and weights 1 and 2:
    #   1: 1/61 = .016393   2: 1/62 = .016129   3: 1/63 + 2/61 = .048660   4: 2/62 = .032258
    fused = reciprocal_rank_fusion(
        [1, 2, 3], [3, 4], Fusion(dense_weight=1.0, lexical_weight=2.0, k=60), limit=3
    )
    assert fused.keys == [3, 4, 1]
    assert fused.scores == pytest.approx([1 / 63 + 2 / 61, 2 / 62, 1 / 61])
    assert fused.dense_ranks == [2, None, 0]
    assert fused.lexical_ranks == [0, 1, None]
    assert (fused.dense_count, fused.lexical_count) == (2, 2)


def test_rrf_ties_go_to_the_better_rank_then_to_dense() -> None:
    fused = reciprocal_rank_fusion([1, 2], [3, 4], Fusion(), limit=4)
    assert fused.keys == [1, 3, 2, 4]  # equal scores by rank; dense first at each rank
    only_lexical = reciprocal_rank_fusion([1, 2], [3], Fusion(dense_weight=0.0), limit=4)
    assert only_lexical.keys == [3]


def test_first_stage_defaults_and_bad_weights() -> None:
    settings = Settings(first_stage="dense", rrf_k=30, lexical_weight=0.5)
    stage, fusion = first_stage(SearchRequest(query="q"), settings)
    assert stage is FirstStage.DENSE
    assert fusion == Fusion(1.0, 0.5, 30)
    stage, fusion = first_stage(
        SearchRequest(query="q", first_stage=FirstStage.HYBRID, dense_weight=2.0), settings
    )
    assert stage is FirstStage.HYBRID
    assert fusion == Fusion(2.0, 0.5, 30)
    for weights in ({"dense_weight": -1.0}, {"lexical_weight": float("nan")},
                    {"dense_weight": 0.0, "lexical_weight": 0.0}):  # fmt: skip
        with pytest.raises(InvalidArgument, match="weight"):
            first_stage(
                SearchRequest(query="q", first_stage=FirstStage.HYBRID, **weights), settings
            )


def test_the_analyzer_splits_codes_and_stems_words() -> None:
    index = LexicalIndex.in_memory()
    assert index.terms("The XJ-9000's batteries are draining") == [
        "xj", "9000", "s", "batteri", "drain"
    ]  # fmt: skip


@pytest.mark.slow
def test_both_indexes_follow_upserts_replacements_deletes_and_crashes(tmp_path, embedder):
    """Random writes, a reopen after a clean close, after no checkpoint at all, and after
    a crash between the store's commit and the indexes' (the store written alone)."""
    folder = tmp_path / "collection"
    rng = random.Random(5)
    collection = open_collection(folder, embedder)
    texts: dict[str, str] = {}
    try:
        for _ in range(30):
            if texts and rng.random() < 0.3:
                gone = rng.sample(sorted(texts), min(len(texts), rng.randint(1, 4)))
                collection.delete(gone)
                for item in gone:
                    texts.pop(item)
            else:
                batch = {
                    f"d{rng.randint(0, 60)}": " ".join(rng.sample(WORDS, 4))
                    for _ in range(rng.randint(1, 6))
                }
                collection.upsert([NewDocument(i, t) for i, t in batch.items()])
                texts.update(batch)
            assert_consistent(collection)
        collection.checkpoint()
    finally:
        collection.close()
    collection = open_collection(folder, embedder)
    try:
        assert_consistent(collection)
        assert len(collection.lexical) == len(texts)
        collection.upsert([NewDocument("late", "zephyr quasar")])  # no checkpoint follows
        collection.delete([sorted(texts)[0]])
    finally:
        collection.close()
    collection = open_collection(folder, embedder)
    try:
        assert_consistent(collection)
        (key,) = collection.lexical.search("quasar", 10).keys
        assert collection.store.by_keys([int(key)])[int(key)].id == "late"
        # A crash after the store's commit: the store alone holds these writes.
        vectors, _ = embedder.encode(["nebula obsidian"])
        collection.store.upsert(
            [NewDocument("crash", "nebula obsidian")], vectors, [np.zeros(0, np.int32)]
        )
        collection.store.delete(["late"])
    finally:
        collection.close()
    collection = open_collection(folder, embedder)
    try:
        assert_consistent(collection)
        assert len(collection.lexical.search("quasar", 10).keys) == 0
        assert len(collection.lexical.search("obsidian", 10).keys) == 1
    finally:
        collection.close()


@pytest.mark.slow
def test_a_write_the_lexical_index_failed_to_take_is_caught_up_from_the_store(
    tmp_path, embedder, monkeypatch
):
    """A full disk fails the lexical commit after the store's: the write stays acknowledged,
    and the next write (or checkpoint) catches the index up from the store."""
    collection = open_collection(tmp_path / "collection", embedder)
    try:
        collection.upsert([NewDocument("a", "kelp forest")])
        working = LexicalIndex.commit

        def full_disk(self: LexicalIndex) -> None:
            raise LexicalWriteFailed("the lexical index could not commit: No space left")

        monkeypatch.setattr(LexicalIndex, "commit", full_disk)
        collection.upsert([NewDocument("b", "coral reef")])  # no error: the store has it
        collection.delete(["a"])
        monkeypatch.setattr(LexicalIndex, "commit", working)
        assert collection.lexical_behind
        assert set(collection.get(["a", "b"])) == {"b"}
        collection.upsert([NewDocument("c", "tide pool")])
        assert not collection.lexical_behind
        assert_consistent(collection)
        assert len(collection.lexical.search("reef", 5).keys) == 1
        assert len(collection.lexical.search("kelp", 5).keys) == 0
    finally:
        collection.close()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["segments", "meta", "sidecar", "folder"])
def test_a_damaged_lexical_index_is_rebuilt_from_the_store(tmp_path, embedder, damage):
    folder = tmp_path / "collection"
    collection = open_collection(folder, embedder)
    collection.upsert([NewDocument(f"d{i}", f"{WORDS[i]} {WORDS[i + 1]}") for i in range(8)])
    collection.checkpoint()
    collection.close()
    lexical = folder / "lexical"
    if damage == "segments":
        for path in lexical.iterdir():
            if path.suffix in (".idx", ".term"):
                path.write_bytes(b"garbage")
    elif damage == "meta":
        (lexical / "meta.json").write_text("{not json", encoding="utf-8")
    elif damage == "sidecar":
        (folder / "lexical.json").unlink()
    else:
        shutil.rmtree(lexical)
    collection = open_collection(folder, embedder)
    try:
        assert_consistent(collection)
        assert len(collection.lexical.search("cedar", 10).keys) == 2
    finally:
        collection.close()


# A toy catalogue: forty support notes share the query's words under other model codes;
# the one note on the asked-for model shares only its code.
CODES = ["HW-1180", "VH-2291", "HX-3302", "HW-5513", "VH-6624", "HX-7735", "HW-8846", "VH-9957"]
PRODUCTS = ["earbuds", "headphones", "speaker", "soundbar", "smartwatch"]
TARGET = "HV-4410 owners: a fix for the power fault ships in firmware 1.3."
QUERY = "HV-4410 battery drains overnight"


def catalogue() -> list[NewDocument]:
    documents = [
        NewDocument(
            f"note-{i}",
            f"The {CODES[i % len(CODES)]} {PRODUCTS[i % len(PRODUCTS)]}: battery drains "
            "overnight even when switched off.",
        )
        for i in range(40)
    ]
    return [*documents, NewDocument("target", TARGET)]


@pytest.mark.slow
def test_hybrid_surfaces_an_exact_code_that_dense_misses(tmp_path, embedder):
    collection = open_collection(tmp_path / "catalogue", embedder)
    collection.upsert(catalogue())
    searcher = Searcher(collection, embedder=embedder, reranker=None, pairs=None, batcher=None)

    async def search(stage: FirstStage):
        return await searcher.search(
            QUERY, recall_k=10, top_n=10, mode=Mode.RETRIEVE_ONLY, first_stage=stage
        )

    try:
        dense, lexical, hybrid = (
            asyncio.run(search(stage))
            for stage in (FirstStage.DENSE, FirstStage.LEXICAL, FirstStage.HYBRID)
        )
    finally:
        collection.close()
    assert "target" not in [hit.id for hit in dense.hits]
    assert lexical.hits[0].id == "target"
    found = {hit.id: hit for hit in hybrid.hits}
    assert "target" in found
    assert found["target"].lexical_rank == 0
    assert found["target"].dense_rank is None
    assert hybrid.first_stage is FirstStage.HYBRID
    assert hybrid.candidates == 10
    assert hybrid.dense_candidates + hybrid.lexical_candidates >= hybrid.candidates
    assert all(hit.dense_rank is not None or hit.lexical_rank is not None for hit in hybrid.hits)
    assert dense.dense_candidates == 10
    assert dense.lexical_candidates == 0
    assert all(hit.dense_rank == hit.stage1_rank for hit in dense.hits)


@pytest.mark.slow
def test_lexical_search_keeps_only_documents_matching_the_filter(tmp_path, embedder):
    collection = open_collection(tmp_path / "filtered", embedder)
    collection.upsert(
        [NewDocument(f"d{i}", f"harbor {WORDS[i % 12]}", {"shelf": i % 7}) for i in range(70)]
    )
    searcher = Searcher(collection, embedder=embedder, reranker=None, pairs=None, batcher=None)
    try:
        result = asyncio.run(
            searcher.search(
                "harbor", recall_k=10, top_n=10, mode=Mode.RETRIEVE_ONLY,
                first_stage=FirstStage.LEXICAL, metadata_filter={"shelf": 3},
            )
        )  # fmt: skip
    finally:
        collection.close()
    assert len(result.hits) == 10  # 10 of the 70 matching "harbor" are on shelf 3
    assert all(hit.metadata["shelf"] == 3 for hit in result.hits)


def test_winner_rank_telemetry_counts_the_pool_tail() -> None:
    """Four reranked hits of 20 candidates, at stage-1 ranks 0, 9, 17 and 19, and one the
    budget left unscored: the histogram takes the four; the tail (ranks 18 and 19) one."""
    from tandem.server.engine.search import Hit, Result
    from tandem.server.metrics import Metrics

    def hit(rank: int, score: float | None) -> Hit:
        return Hit(f"d{rank}", None, {}, 0.5, rank, score)

    hits = [hit(0, 3.0), hit(9, 2.0), hit(17, 1.0), hit(19, 0.5), hit(4, None)]
    result = Result(hits, 4, 20, False, first_stage=FirstStage.HYBRID)
    metrics = Metrics()
    metrics.observe_search(result)
    metrics.observe_search(Result(hits, 0, 0, False))  # no candidates, no stage: ignored
    sample = metrics.registry.get_sample_value
    labels = {"first_stage": "hybrid"}
    assert sample("tandem_winner_stage1_rank_fraction_count", labels) == 4
    assert sample("tandem_winner_stage1_rank_fraction_bucket", {**labels, "le": "0.1"}) == 1
    assert sample("tandem_winner_stage1_rank_fraction_bucket", {**labels, "le": "0.5"}) == 2
    assert sample("tandem_winner_stage1_rank_fraction_bucket", {**labels, "le": "0.9"}) == 3
    assert sample("tandem_winner_stage1_rank_fraction_sum", labels) == pytest.approx(
        (1 + 10 + 18 + 20) / 20
    )
    assert sample("tandem_winners_from_pool_tail_total", labels) == 1


def test_the_default_falls_back_to_dense_without_a_lexical_index() -> None:
    settings = Settings()  # hybrid by default
    stage, _ = first_stage(SearchRequest(query="q"), settings, lexical=False)
    assert stage is FirstStage.DENSE
    asked = SearchRequest(query="q", first_stage=FirstStage.LEXICAL)
    stage, _ = first_stage(asked, settings, lexical=False)
    assert stage is FirstStage.LEXICAL  # named by the call: the search refuses it


NO_TANTIVY = """
import asyncio, sys
from pathlib import Path
sys.modules["tantivy"] = None  # what a platform without its wheel sees: ImportError
from tandem.encoders import BiEncoder
from tandem.server.engine.collection import Collection
from tandem.server.engine.errors import FailedPrecondition
from tandem.server.engine.fusion import FirstStage
from tandem.server.engine.search import Mode, Searcher
from tandem.server.engine.store import NewDocument
from tandem.server.replication.publish import publish
folder, bi = Path(sys.argv[1]), Path(sys.argv[2])
embedder = BiEncoder(bi)
collection = Collection(folder, embedder=embedder, pairs=None)
assert collection.lexical is None
collection.upsert([NewDocument("a", "kelp forest"), NewDocument("b", "coral reef")])
collection.delete(["a"])
collection.checkpoint()
searcher = Searcher(collection, embedder=embedder, reranker=None, pairs=None, batcher=None)
found = asyncio.run(searcher.search("reef", top_n=1, mode=Mode.RETRIEVE_ONLY))
assert [hit.id for hit in found.hits] == ["b"], found
try:
    asyncio.run(searcher.search("reef", mode=Mode.RETRIEVE_ONLY, first_stage=FirstStage.HYBRID))
except FailedPrecondition as error:
    assert "first_stage dense" in str(error)
else:
    raise AssertionError("hybrid without a lexical index was not refused")
collection.close()
publish(folder, folder.parent / "root")
print("served dense alone")
"""


@pytest.mark.slow
def test_without_tantivy_the_dense_first_stage_alone_is_served(tmp_path, bi_int8):
    """The GPU carry leaves tantivy behind (64 MiB), as may a platform without its wheel:
    the collection opens, writes, searches dense and publishes; lexical is refused, and
    when tantivy is back, the next opening builds the index from the store."""
    folder = tmp_path / "collection"
    done = subprocess.run(
        [sys.executable, "-c", NO_TANTIVY, str(folder), str(bi_int8[0])],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "served dense alone" in done.stdout
    assert "tantivy cannot be imported" in done.stderr
    assert not (folder / "lexical").exists()
    collection = Collection(folder, embedder=BiEncoder(bi_int8[0]), pairs=None)
    try:
        assert_consistent(collection)  # built from the store on this opening
        assert len(collection.lexical.search("reef", 5).keys) == 1
    finally:
        collection.close()
