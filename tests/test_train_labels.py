"""`tandem train`'s inputs: label files, the held-out split, mined negatives (no models)."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from tandem.training.labels import (
    Judged,
    LabelError,
    from_feedback,
    from_jsonl,
    from_trec,
    split,
    text_key,
)
from tandem.training.pools import Pool, hard_negatives, teacher_scores
from tandem.training.run import serve_length


def test_json_lines_take_ids_texts_and_graded_scores(tmp_path) -> None:
    path = tmp_path / "labels.jsonl"
    lines = [
        {"query": "what is kelp", "positives": ["d1", {"text": "Kelp is a seaweed."}]},
        {"id": "q2", "query": "reefs", "positives": [{"id": "d2"}], "negatives": ["d3"],
         "scores": [2.5, 0.25]},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    first, second = from_jsonl(path)
    key = text_key("Kelp is a seaweed.")
    assert first.grades == {"d1": 1.0, key: 1.0}
    assert first.texts == {key: "Kelp is a seaweed."}
    assert first.ids == ["d1"]  # a text is not a collection id
    assert second.query_id == "q2"
    assert second.grades == {"d2": 2.5, "d3": 0.25}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ('{"positives": ["d1"]}', '"query" must be a non-empty string'),
        ('{"query": "q", "positives": []}', '"positives" must be a non-empty list'),
        ('{"query": "q", "positives": [7]}', "each item is an id string"),
        ('{"query": "q", "positives": ["d"], "scores": [1, 2]}', "must list 1 numbers"),
        ('{"query": "q", "positives": ["d"], "scores": [-1]}', ">= 0"),
    ],
)
def test_bad_json_lines_name_the_line_and_the_fix(tmp_path, line, message) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(LabelError, match=message) as error:
        from_jsonl(path)
    assert f"{path}:1" in str(error.value) or message == "not JSON"


def test_trec_labels_need_their_qrels_and_a_matching_query(tmp_path) -> None:
    topics = tmp_path / "topics.tsv"
    topics.write_text("t1\twhat is kelp\nt2\twhy do reefs bleach\n", encoding="utf-8")
    with pytest.raises(LabelError, match="no such qrels file"):
        from_trec(topics, tmp_path / "missing.qrels")
    qrels = tmp_path / "qrels"
    qrels.write_text("t2 0 d1 3\nt2 0 d2 0\nt9 0 d1 1\n", encoding="utf-8")
    (judged,) = from_trec(topics, qrels)  # t1 has no judgement: nothing to learn from
    assert (judged.query_id, judged.grades) == ("t2", {"d1": 3.0, "d2": 0.0})
    qrels.write_text("t9 0 d1 1\n", encoding="utf-8")
    with pytest.raises(LabelError, match="do their query ids match"):
        from_trec(topics, qrels)


def test_feedback_keeps_the_latest_label_per_pair() -> None:
    (judged,) = from_feedback([("kelp", "d1", 1.0), ("kelp", "d2", 0.0), ("kelp", "d1", 3.0)])
    assert judged.grades == {"d1": 3.0, "d2": 0.0}
    with pytest.raises(LabelError, match="no feedback yet"):
        from_feedback([])


def test_split_is_seeded_stable_and_disjoint() -> None:
    judged = [Judged(f"q{number}", f"query {number}", {"d": 1.0}) for number in range(400)]
    train, held = split(judged, eval_fraction=0.5, seed=0)
    assert {item.query_id for item in train}.isdisjoint(item.query_id for item in held)
    assert len(train) + len(held) == 400
    assert 150 < len(held) < 250
    again = split(list(reversed(judged)), eval_fraction=0.5, seed=0)[1]
    assert {item.query_id for item in again} == {item.query_id for item in held}
    other = split(judged, eval_fraction=0.5, seed=1)[1]
    assert {item.query_id for item in other} != {item.query_id for item in held}
    with pytest.raises(LabelError, match="between 0 and 1"):
        split(judged, eval_fraction=1.0, seed=0)


def test_hard_negatives_skip_every_labelled_document_and_honour_the_margin() -> None:
    item = Judged("q", "kelp", {"pos": 2.0, "neg": 0.0})
    pool = Pool(
        first_stage=["close", "pos", "neg", "far", "farther"],
        dense=["close", "pos", "neg", "far"],
        teacher={"close": 0.81, "pos": 0.8, "neg": 0.7, "far": 0.5},
    )
    assert hard_negatives(item, pool, count=2, margin=None) == ["close", "far"]
    # "close" scores above the positive: as likely relevant as not, so the margin drops it.
    assert hard_negatives(item, pool, count=5, margin=0.1) == ["far", "farther"]
    scaled = teacher_scores(pool, ["close", "far", "farther"])
    assert scaled["close"] == 1.0
    assert scaled["farther"] == 0.0


def test_held_out_rows_and_paired_tests_on_a_hand_built_case() -> None:
    from tandem.training.evaluate import System, first_stage_systems, measure

    held = [
        Judged("q1", "one", {"a": 3.0, "b": 1.0}),
        Judged("q2", "two", {"c": 2.0}),
        Judged("q3", "three", {"z": 0.0}),  # nothing relevant: not scored
    ]
    pools = {
        "q1": Pool(first_stage=["x", "b", "a"], dense=["b", "x", "a"]),
        "q2": Pool(first_stage=["y", "c"], dense=["c", "y"]),
        "q3": Pool(first_stage=["z"], dense=["z"]),
    }
    systems = first_stage_systems(held, pools, depth=3, name="hybrid")
    candidates = {q: pools[q].first_stage for q in pools}
    trained = System("trained", {"q1": ["a", "b", "x"], "q2": ["c", "y"], "q3": ["z"]},
                     candidates, ms_per_pair=1.5)  # fmt: skip
    rows, tests, scored = measure([*systems, trained], held, trained="trained", relevant=2,
                                  depth=3)  # fmt: skip
    assert scored == 2
    by_name = {row.system: row for row in rows}
    assert by_name["trained"].mrr_at_10 == 1.0
    assert by_name["hybrid (stage 1 alone)"].mrr_at_10 == (1 / 3 + 1 / 2) / 2
    assert by_name["hybrid (stage 1 alone)"].recall == by_name["trained"].recall == 1.0
    assert by_name["trained"].ndcg_at_10 > by_name["hybrid (stage 1 alone)"].ndcg_at_10
    assert set(tests) == {"hybrid (stage 1 alone)", "dense (stage 1 alone)"}
    assert tests["hybrid (stage 1 alone)"]["ndcg@10"]["mean_difference"] > 0


def lead(difference: float, p_value: float) -> dict[str, float]:
    return {"mean_difference": difference, "ci_low": 0.0, "ci_high": 0.0, "p_value": p_value}


@pytest.mark.parametrize(
    ("train", "held", "memorised", "says"),
    [
        # The figures of RESULTS' "What a reranker trained here learned": ahead on its own
        # queries, behind held out beyond chance.
        (lead(0.03, 0.01), lead(-0.175, 0.0001), True, "learned its training queries"),
        (lead(-0.02, 0.2), lead(-0.1, 0.001), False, "has not fitted them yet"),
        (lead(0.05, 0.01), lead(0.02, 0.04), False, "+0.020 held out."),
        # Behind held out, but within chance: no verdict.
        (lead(0.05, 0.01), lead(-0.01, 0.4), False, "-0.010 held out."),
    ],
)
def test_the_report_tells_memorising_from_not_yet_fitting(train, held, memorised, says) -> None:
    from tandem.training.evaluate import Generalisation

    found = Generalisation(40, train, held)
    assert found.memorised is memorised
    assert says in found.sentence()
    assert f"on 40 queries it trained on, {held['mean_difference']:+.3f} held out" in (
        found.sentence()
    )


def test_the_training_sample_is_seeded_and_keeps_order() -> None:
    from tandem.training.evaluate import training_sample

    train = [Judged(f"q{n}", f"query {n}", {"d": 1.0}) for n in range(50)]
    sample = training_sample(train, count=10, seed=3)
    assert len(sample) == 10
    assert [item.query_id for item in sample] == sorted(
        (item.query_id for item in sample), key=lambda name: int(name[1:])
    )
    assert sample == training_sample(train, count=10, seed=3)
    assert sample != training_sample(train, count=10, seed=4)
    assert training_sample(train[:5], count=10, seed=3) == train[:5]


def test_compared_artifacts_of_the_same_name_are_told_apart_by_their_parents() -> None:
    from pathlib import Path

    from tandem.training.run import distinct_names

    runs = [Path("/work/run-a/reranker-int8"), Path("/work/run-b/reranker-int8")]
    assert distinct_names(runs) == ["run-a/reranker-int8", "run-b/reranker-int8"]
    assert distinct_names([Path("artifacts/cross-encoder"), runs[0]]) == [
        "cross-encoder",
        "reranker-int8",
    ]
    assert distinct_names([Path("x"), Path("a/x")]) == ["x", "a/x"]


def test_a_rerun_of_a_finished_run_reports_no_rate_rather_than_a_made_up_one() -> None:
    from tandem.training.evaluate import Row
    from tandem.training.report import render

    training = {"pairs_per_epoch": 3720, "seconds": 0.4, "device": "cpu", "threads": 2,
                "bf16": True, "resumed_from": "out/checkpoints/checkpoint-390"}  # fmt: skip
    summary = {
        "evaluation": {"queries": 137, "relevant": 2, "depth": 30},
        "split": {"rule": "a rule", "train_queries": 156},
        "first_stage": {"mode": "hybrid"},
        "recipe": {"epochs": 5, "loss": "lambda"},
        "base": {"source": "minilm", "kind": "new-head"},
    }
    rows = [Row("trained", 0.5, 0.5, 0.9, 12.0, "")]
    resumed = render({**summary, "training": {**training, "pairs_per_second": None}}, rows, {},
                     trained="trained")  # fmt: skip
    assert "resumed after its last epoch, from out/checkpoints/checkpoint-390" in resumed
    assert "pairs/s" not in resumed
    timed = render({**summary, "training": {**training, "pairs_per_second": 24.3}}, rows, {},
                   trained="trained")  # fmt: skip
    assert (
        "Training: 3,720 pairs an epoch, 5 epochs, 0.0 min at 24.3 pairs/s (cpu, 2 threads, "
        "bf16 on)" in timed
    )


def test_the_artifact_serves_at_the_length_it_trained_at_unless_told(caplog) -> None:
    def length(trained: int, served: int | None) -> int:
        return serve_length(argparse.Namespace(max_length=trained, serve_max_length=served))

    with caplog.at_level(logging.WARNING, logger="tandem.training.run"):
        assert length(128, None) == 128
        assert length(256, 128) == 128
        assert not caplog.records
        assert length(128, 512) == 512
    assert "--serve-max-length 512 is longer than the 128 tokens it trains at" in caplog.text
