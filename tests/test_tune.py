"""`tandem tune`: its agreement, depth-cost and recommendation arithmetic on hand-built
cases, and the command end to end on a small collection with real models."""

from __future__ import annotations

import json
import math

import pytest

from tandem.cli import main
from tandem.encoders import BiEncoder
from tandem.relevance import InputError, read_queries
from tandem.server.engine.collection import Collection
from tandem.server.engine.fusion import FirstStage, Fusion
from tandem.server.engine.pairs import PairTokenizer
from tandem.server.engine.store import NewDocument
from tandem.tune import (
    QueryRun,
    agreement,
    candidates,
    recommend,
    reference,
    render,
    summarize,
    top,
)

# The reranker prefers a > b > c > d > e > x; dense found them worst first, lexical found a.
SCORES = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0, "x": 0.0}


def run(query_id: str = "q1", *, ms_per_pair: float = 2.0, stage1: float = 10.0) -> QueryRun:
    return QueryRun(
        query_id=query_id,
        dense=["e", "d", "c", "b", "a"],
        lexical=["a", "x"],
        scores=SCORES,
        rerank_ms_per_pair=ms_per_pair,
        stage1_ms={"dense": stage1, "lexical": stage1 / 2, "hybrid": stage1 * 2},
    )


def test_agreement_counts_the_deep_top_n_kept() -> None:
    deep = reference(run(), 2)
    assert deep == ["a", "b"]  # over dense and lexical together
    assert top(SCORES, ["e", "d", "c", "b"], 2) == ["b", "c"]
    assert agreement(SCORES, ["e", "d"], deep) == 0.0
    assert agreement(SCORES, ["e", "d", "c", "b"], deep) == 0.5
    assert agreement(SCORES, ["e", "d", "c", "b", "a"], deep) == 1.0
    assert agreement(SCORES, ["a"], deep) == 0.5  # fewer candidates than top_n
    assert agreement(SCORES, ["e"], []) == 1.0


def test_candidates_follow_each_first_stage() -> None:
    fusion = Fusion()
    assert candidates(run(), FirstStage.DENSE, 2, fusion) == ["e", "d"]
    assert candidates(run(), FirstStage.LEXICAL, 1, fusion) == ["a"]
    # Depth 2: dense e, d and lexical a, x. Ranks tie pairwise (1/61, 1/62); dense first.
    assert candidates(run(), FirstStage.HYBRID, 2, fusion) == ["e", "a"]
    assert candidates(run(), FirstStage.HYBRID, 3, fusion) == ["e", "a", "d"]


def test_summary_rows_recommendation_and_budget() -> None:
    runs = [run("q1", ms_per_pair=2.0, stage1=10.0), run("q2", ms_per_pair=4.0, stage1=20.0)]
    qrels = {"q1": {"a": 3, "b": 2, "x": 0}, "q2": {"z": 1}}  # q2 has nothing graded >= 2
    rows = summarize(
        runs, stages=[FirstStage.DENSE, FirstStage.LEXICAL], depths=[2, 4, 5], top_n=2,
        fusion=Fusion(), qrels=qrels,
    )  # fmt: skip
    by = {(row.first_stage, row.recall_k): row for row in rows}
    assert by["dense", 2].agreement == 0.0
    assert by["dense", 4].agreement == 0.5
    assert by["dense", 5].agreement == 1.0
    assert by["dense", 5].full_agreement == 1.0
    assert by["lexical", 2].agreement == 0.5  # lexical holds only a and x
    # The rerank cost: candidates x ms per pair (4 x 2 and 4 x 4 ms at depth 4).
    assert by["dense", 4].rerank_ms_p50 == pytest.approx(12.0)
    assert by["dense", 4].rerank_ms_p95 == pytest.approx(8 + 0.95 * 8)
    # Only q1 is judged: its recall at depth 4 is b alone of {a, b}; lexical finds a.
    assert by["dense", 4].recall == 0.5
    assert by["lexical", 2].recall == 0.5
    ideal = 3 + 2 / math.log2(3)
    assert by["dense", 5].ndcg_at_10 == pytest.approx(ideal / ideal)
    assert by["dense", 2].ndcg_at_10 == 0.0
    choice = recommend(rows, runs, target=0.95)
    assert choice is not None
    assert (choice.first_stage, choice.recall_k) == ("dense", 5)
    # 95th percentiles: dense stage 1 = 10 + .95 x 10 = 19.5 ms; rerank = 10 + .95 x 10 = 19.5.
    assert choice.budget_ms == 40
    assert recommend(rows, runs, target=0.5).recall_k == 2  # lexical at 2 keeps half
    assert recommend(rows, runs, target=1.0).recall_k == 5
    assert "Recommended: --first-stage dense, recall_k 5" in render(
        rows, choice, target=0.95, top_n=2
    )
    assert "No recall_k tried" in render(rows, None, target=0.95, top_n=2)


def test_query_files_in_each_format(tmp_path) -> None:
    topics = tmp_path / "topics.tsv"
    topics.write_text("t1\twhat is kelp\n\nt2\twhy do reefs bleach\n", encoding="utf-8")
    assert read_queries(topics) == [("t1", "what is kelp"), ("t2", "why do reefs bleach")]
    lines = tmp_path / "queries.jsonl"
    lines.write_text('{"id": "a", "query": "kelp"}\n{"text": "reef"}\n', encoding="utf-8")
    assert read_queries(lines) == [("a", "kelp"), ("2", "reef")]
    plain = tmp_path / "queries.txt"
    plain.write_text("kelp forests\nreef\n", encoding="utf-8")
    assert read_queries(plain) == [("1", "kelp forests"), ("2", "reef")]
    with pytest.raises(InputError, match="no such file"):
        read_queries(tmp_path / "missing.txt")


@pytest.mark.slow
def test_tune_runs_end_to_end_on_a_small_collection(tmp_path, bi_int8, ce_int8, data, capsys):
    folder = tmp_path / "collection"
    collection = Collection(
        folder,
        embedder=BiEncoder(bi_int8[0]),
        pairs=PairTokenizer.from_artifact(ce_int8[0]),
    )
    try:
        collection.upsert([NewDocument(s.id, s.text) for s in data.segments[:60]])
        collection.checkpoint()
    finally:
        collection.close()
    queries = tmp_path / "topics.tsv"
    queries.write_text(
        "".join(f"{topic.id}\t{topic.query}\n" for topic in data.topics[:3]), encoding="utf-8"
    )
    out = tmp_path / "tune"
    code = main([
        "tune", "--collection", str(folder), "--queries", str(queries),
        "--bi-encoder", str(bi_int8[0]), "--reranker", str(ce_int8[0]),
        "--deep", "20", "--depths", "5,10,20", "--top-n", "3", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "tune.json").read_text(encoding="utf-8"))
    assert report["queries"] == 3
    assert len(report["rows"]) == 9  # three depths for each of three first stages
    deepest = [row for row in report["rows"] if row["recall_k"] == 20]
    # At the deep depth a side holds everything it retrieved; the hybrid pool holds both.
    assert all(0.0 <= row["agreement"] <= 1.0 for row in report["rows"])
    assert max(row["agreement"] for row in deepest) > 0.0
    assert (out / "tune.png").stat().st_size > 1000
    assert "| first stage | recall_k |" in (out / "tune.md").read_text(encoding="utf-8")
    assert "recall_k" in capsys.readouterr().out
    assert main(["tune", "--collection", str(folder), "--queries", str(queries),
                 "--deep", "10", "--depths", "20"]) == 2  # fmt: skip
