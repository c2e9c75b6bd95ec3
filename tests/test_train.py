"""`tandem train` with real weights: a short run from all-MiniLM-L6-v2's backbone through
export and the held-out report, resume after a kill, and bad input refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tandem.artifact import read_manifest
from tandem.cli import main
from tandem.encoders import BiEncoder
from tandem.server.engine.collection import Collection
from tandem.server.engine.pairs import PairTokenizer
from tandem.server.engine.store import NewDocument
from tandem.server.replication.models import held_out_lead
from tandem.training.fit import CHECKPOINT_FILES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
TOPICS = 4


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, bi_int8, ce_int8, data):
    """A collection of the segments of the first TOPICS RAG24 topics, with those topics and
    their UMBRELA judgements as TREC files."""
    folder = tmp_path_factory.mktemp("train")
    topics = data.topics[:TOPICS]
    judged = {doc for topic in topics for doc in data.umbrela.get(topic.id, {})}
    segments = [segment for segment in data.segments if segment.id in judged]
    collection = Collection(
        folder / "collection",
        embedder=BiEncoder(bi_int8[0]),
        pairs=PairTokenizer.from_artifact(ce_int8[0]),
    )
    try:
        collection.upsert([NewDocument(s.id, s.text) for s in segments])
        collection.checkpoint()
    finally:
        collection.close()
    queries = folder / "topics.tsv"
    queries.write_text("".join(f"{t.id}\t{t.query}\n" for t in topics), encoding="utf-8")
    qrels = folder / "qrels.txt"
    qrels.write_text(
        "".join(
            f"{topic.id} 0 {doc} {grade}\n"
            for topic in topics
            for doc, grade in data.umbrela[topic.id].items()
        ),
        encoding="utf-8",
    )
    held = folder / "held.tsv"
    held.write_text(f"{topics[0].id}\t{topics[0].query}\n", encoding="utf-8")
    return folder, queries, qrels, held


def quick_flags(labelled, bi_int8, out: Path, *extra: str) -> list[str]:
    folder, queries, qrels, held = labelled
    return [
        "--collection", str(folder / "collection"), "--queries", str(queries),
        "--qrels", str(qrels), "--eval-queries", str(held), "--bi-encoder", str(bi_int8[0]),
        "--out", str(out), "--negatives", "2", "--list-size", "6", "--max-length", "96",
        "--batch-size", "2", "--eval-depth", "10", "--precisions", "int8",
        "--verify-queries", "2", "--verify-candidates", "10",
        # A few steps on three topics leave scores with little spread, which INT8 noise
        # reorders: the bars are the export's mechanics here, not a quality claim.
        "--min-mean-spearman", "0.5", "--min-topk-overlap", "0.5", *extra,
    ]  # fmt: skip


def test_a_short_run_trains_exports_and_reports_on_held_out_queries(
    labelled, bi_int8, ce_int8, minilm_path, tmp_path, capsys
):
    out = tmp_path / "run"
    flags = quick_flags(labelled, bi_int8, out, "--epochs", "1", "--base", str(minilm_path),
                        "--compare", str(ce_int8[0]), "--pseudo-queries", "2")  # fmt: skip
    assert main(["train", *flags]) == 0
    report = json.loads((out / "train.json").read_text(encoding="utf-8"))
    assert report["base"]["kind"] == "new-head"
    assert report["split"]["held_out_queries"] == 1
    # Queries made from the collection's text are trained on, never held out or scored.
    assert report["split"]["train_queries"] == TOPICS - 1
    assert report["pseudo_queries"]["made"] == 2
    # One epoch of 3 training topics and 2 made queries, 2 lists a step.
    assert report["training"]["steps"] == 3
    systems = [row["system"] for row in report["evaluation"]["rows"]]
    assert systems == [
        "hybrid (stage 1 alone)", "dense (stage 1 alone)", f"{ce_int8[0].name} (reranker)",
        "trained (INT8 artifact)",
    ]  # fmt: skip
    rows = {row["system"]: row for row in report["evaluation"]["rows"]}
    # Every system reorders the same candidates: their recall is the first stage's.
    assert len({row["recall"] for row in rows.values() if "dense" not in row["system"]}) == 1
    assert all(0.0 <= row["ndcg_at_10"] <= 1.0 for row in rows.values())
    assert rows["trained (INT8 artifact)"]["ms_per_pair"] > 0
    tests = report["evaluation"]["paired_tests"]
    assert set(tests) == set(systems) - {"trained (INT8 artifact)"}
    assert 0.0 < tests["hybrid (stage 1 alone)"]["ndcg@10"]["p_value"] <= 1.0
    manifest = read_manifest(out / "reranker-int8")
    assert manifest.verified
    # Exported at the length it trained at (--max-length 96), not the base's 512.
    assert manifest.max_length == 96
    training = manifest.extra["training"]
    assert training["recipe"]["loss"] == "lambda"
    assert training["labels"]["sha256"] == report["labels"]["sha256"]
    assert training["held_out"]["ndcg_at_10"] == rows["trained (INT8 artifact)"]["ndcg_at_10"]
    # What `tandem models publish` and the server judge the artifact by, read back.
    lead = held_out_lead(manifest)
    assert lead is not None
    assert (lead.first_stage, lead.queries) == ("hybrid", 1)
    assert lead.stage1 == rows["hybrid (stage 1 alone)"]["ndcg_at_10"]
    assert lead.difference == tests["hybrid (stage 1 alone)"]["ndcg@10"]["mean_difference"]
    # As many training queries as were held out (one of the three) are scored too.
    seen = report["evaluation"]["training_queries"]
    assert seen["queries"] == 1
    assert seen["held_out_stage1_to_trained"] == tests["hybrid (stage 1 alone)"]["ndcg@10"]
    assert 0.0 < seen["stage1_to_trained"]["p_value"] <= 1.0
    assert (out / "train.png").stat().st_size > 1000
    markdown = (out / "train.md").read_text(encoding="utf-8")
    assert "| system | nDCG@10 |" in markdown
    assert "on 1 query it trained on" in markdown
    assert "trained (INT8 artifact)" in capsys.readouterr().out


def test_a_killed_run_resumes_from_its_last_epoch(labelled, bi_int8, minilm_path, tmp_path):
    out = tmp_path / "run"
    # Six epochs of two steps: the kill comes within half a second of the first checkpoint,
    # long before the second can finish (two steps and a 270 MB save).
    flags = quick_flags(labelled, bi_int8, out, "--epochs", "6", "--base", str(minilm_path))
    command = [sys.executable, "-m", "tandem.cli", "train", *flags]
    log = tmp_path / "first-run.log"
    with log.open("w") as sink:
        child = subprocess.Popen(command, stderr=sink, env=dict(os.environ))
        checkpoints = out / "checkpoints"
        deadline = time.monotonic() + 600
        while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
            assert child.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.5)
        child.send_signal(signal.SIGKILL)  # maybe mid-save: that checkpoint is then retrained
        child.wait(timeout=60)
    complete = [
        int(path.name.split("-")[1])
        for path in checkpoints.glob("checkpoint-*")
        if all((path / name).is_file() for name in CHECKPOINT_FILES)
    ]
    # The same command again: the same recipe, so it resumes (another would be refused).
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=1500,
                             env=dict(os.environ))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((out / "train.json").read_text(encoding="utf-8"))
    if complete:
        assert "resuming from" in resumed.stderr
        assert report["training"]["resumed_from"].endswith(f"checkpoint-{max(complete)}")
    else:  # killed while writing the first checkpoint: nothing finished, nothing to resume
        assert "cut off mid-save" in resumed.stderr
    assert report["training"]["steps"] == 6 * 2  # every epoch trained, once


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda flags, folder: _replace(flags, "--qrels", str(folder / "missing.qrels")),
            "no such qrels file",
        ),
        (lambda flags, folder: _without(flags, "--qrels"), "--queries needs --qrels"),
        (lambda flags, folder: _empty_split(flags, folder), "no held-out query"),
        (lambda flags, folder: _labels_naming(flags, folder, "not-in-the-collection"), "not in"),
        (
            lambda flags, folder: _replace(flags, "--collection", str(folder / "nowhere")),
            "is not a collection",
        ),
        (lambda flags, folder: [*flags, "--pseudo-queries", "-1"], "--pseudo-queries >= 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(labelled, bi_int8, tmp_path, capsys, change, message):
    flags = change(quick_flags(labelled, bi_int8, tmp_path / "out"), tmp_path)
    assert main(["train", *flags]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("tandem train: error: ")
    assert message in error[-1]
    assert not (tmp_path / "out" / "checkpoints").exists()


def _replace(flags: list[str], name: str, value: str) -> list[str]:
    flags = list(flags)
    flags[flags.index(name) + 1] = value
    return flags


def _without(flags: list[str], name: str) -> list[str]:
    position = flags.index(name)
    return flags[:position] + flags[position + 2 :]


def _empty_split(flags: list[str], folder: Path) -> list[str]:
    nobody = folder / "nobody.tsv"
    nobody.write_text("no-such-topic\tnothing\n", encoding="utf-8")
    return _replace(flags, "--eval-queries", str(nobody))


def _labels_naming(flags: list[str], folder: Path, document_id: str) -> list[str]:
    labels = folder / "labels.jsonl"
    lines = [{"id": f"q{n}", "query": f"kelp {n}", "positives": [document_id]} for n in (1, 2)]
    labels.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    held = folder / "held.tsv"
    held.write_text("q1\tkelp 1\n", encoding="utf-8")
    flags = _replace(_without(_without(flags, "--qrels"), "--queries"), "--eval-queries", str(held))
    return [*flags, "--labels", str(labels)]


def test_the_same_seed_trains_the_same_weights(minilm_path, tmp_path):
    from safetensors.numpy import load_file

    from tandem.training.base import Base, with_new_head
    from tandem.training.fit import Listed, Recipe, train

    lists = [
        Listed("what is kelp", ["Kelp is a large brown seaweed.", "Dogs bark at night.",
                                "Kelp forests grow in cold water."], [3.0, 0.0, 2.0]),
        Listed("why do reefs bleach", ["Warm water makes corals expel their algae.",
                                       "The stock market fell."], [3.0, 0.0]),
    ]  # fmt: skip
    base = Base(str(minilm_path), str(minilm_path), "new-head", None)

    def weights(seed: int, name: str) -> dict:
        out = tmp_path / name
        start = with_new_head(base, out / "start", seed=seed)
        recipe = Recipe(
            base=str(minilm_path), loss="lambda", epochs=1, batch_size=1, learning_rate=1e-4,
            warmup_ratio=0.0, max_length=32, negatives=0, margin=None, list_size=3,
            distill=0.0, seed=seed, data_sha256="test",
        )  # fmt: skip
        folder, measured = train(lists, recipe, checkpoint=start, out=out, device="cpu",
                                 bf16=False, threads=2)  # fmt: skip
        assert measured["steps"] == 2
        return load_file(str(folder / "model.safetensors"))

    first, again, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert first.keys() == again.keys()
    assert all((first[name] == again[name]).all() for name in first)
    assert any((first[name] != other[name]).any() for name in first)
