"""`tandem index build`: batches, progress, resume after an interruption, and bad corpus lines."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest

from tandem.cli import main
from tandem.encoders import BiEncoder, CrossEncoder
from tandem.server.engine.collection import Collection
from tandem.server.engine.index import IndexSettings, VectorIndex
from tandem.server.engine.indexer import CorpusError, Progress, build
from tandem.server.engine.lexical import LexicalIndex
from tandem.server.engine.pairs import PairTokenizer

pytestmark = pytest.mark.slow


def write_corpus(path: Path, data, count: int, *, extra: list[str] | None = None) -> Path:
    lines = [
        json.dumps({"id": s.id, "text": s.text, "metadata": {"source": "rag24"}})
        for s in data.segments[:count]
    ]
    lines += extra or []
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


class InterruptAfter(Progress):
    """Stands in for Ctrl-C: stops the build after ``batches`` committed batches."""

    def __init__(self, total: int, batches: int) -> None:
        super().__init__(total, stream=io.StringIO(), every=0.0)
        self.left = batches

    def update(self, done: int, added: int, *, final: bool = False) -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt


def open_collection(folder: Path, bi_int8, ce_int8) -> Collection:
    return Collection(
        folder,
        embedder=BiEncoder(bi_int8[0]),
        pairs=PairTokenizer.for_reranker(CrossEncoder(ce_int8[0])),
        settings=IndexSettings(),
    )


def test_build_resumes_after_an_interruption(tmp_path: Path, data, bi_int8, ce_int8) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl.gz", data, 100)
    collection = open_collection(tmp_path / "c", bi_int8, ce_int8)
    with pytest.raises(KeyboardInterrupt):
        build(collection, corpus, batch_size=16, progress=InterruptAfter(100, batches=3))
    assert len(collection) == 48  # three whole batches were committed before the stop
    collection.close()

    reopened = open_collection(tmp_path / "c", bi_int8, ce_int8)
    stream = io.StringIO()
    report = build(reopened, corpus, batch_size=16, progress=Progress(100, stream=stream))
    assert (report.total, report.added, report.skipped) == (100, 52, 48)
    assert len(reopened) == 100
    assert "100/100 docs" in stream.getvalue()
    assert "docs/s" in stream.getvalue()
    stored = reopened.get([data.segments[99].id])[data.segments[99].id]
    assert stored.metadata == {"source": "rag24"}
    assert len(stored.token_ids) > 0
    reopened.close()
    index, _ = VectorIndex.open(
        tmp_path / "c" / "vectors.usearch", ndim=384, settings=IndexSettings()
    )
    assert index.documents == 100  # some segments pass 256 tokens: more passages
    lexical, sidecar = LexicalIndex.open(tmp_path / "c" / "lexical", writable=False)
    assert len(lexical) == 100  # built beside the vectors, batch by batch
    assert sidecar["generation"] > 0


def test_bad_line_stops_with_its_number_and_keeps_earlier_batches(
    tmp_path: Path, data, bi_int8, ce_int8
) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl.gz", data, 20, extra=['{"id": 7, "text": "x"}'])
    collection = open_collection(tmp_path / "c", bi_int8, ce_int8)
    with pytest.raises(CorpusError, match=r"c\.jsonl\.gz:21: \"id\" must be a non-empty string"):
        build(collection, corpus, batch_size=8, progress=Progress(21, stream=io.StringIO()))
    assert len(collection) == 16
    collection.close()


def test_cli_reports_a_missing_corpus(tmp_path: Path, bi_int8, ce_int8, capsys) -> None:
    code = main(
        ["index", "build", "--corpus", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "c"),
         "--bi-encoder", str(bi_int8[0]), "--reranker", str(ce_int8[0])]
    )  # fmt: skip
    assert code == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_builds_a_collection(tmp_path: Path, data, bi_int8, ce_int8, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl.gz", data, 30)
    code = main(
        ["index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "c"),
         "--bi-encoder", str(bi_int8[0]), "--reranker", str(ce_int8[0]), "--batch-size", "10",
         "--dtype", "f16", "--connectivity", "8", "--expansion-search", "32"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "30 documents added, 0 already present" in out
    _, sidecar = VectorIndex.open(
        tmp_path / "c" / "vectors.usearch", ndim=384, settings=IndexSettings(dtype="f16")
    )
    # RAG24 segments past 256 tokens have a second passage.
    assert sidecar["count"] >= 30
    passages = f"the vector index holds {sidecar['count']} passages"
    assert f"{passages}, the lexical (BM25) index 30 documents" in out
    assert sidecar["settings"]["connectivity"] == 8
    assert sidecar["settings"]["expansion_search"] == 32


def test_compaction_rebuilds_only_live_vectors(tmp_path: Path, data, bi_int8, ce_int8) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl.gz", data, 40)
    collection = open_collection(tmp_path / "c", bi_int8, ce_int8)
    build(collection, corpus, batch_size=20, progress=Progress(40, stream=io.StringIO()))
    removed = [segment.id for segment in data.segments[:10]]
    assert len(collection.delete(removed)) == 10
    collection.compact()
    stored = sorted(collection.store.vector_keys(384).tolist())
    assert sorted(collection.index.keys().tolist()) == stored
    _, sidecar = VectorIndex.open(
        tmp_path / "c" / "vectors.usearch", ndim=384, settings=IndexSettings()
    )
    assert sidecar["count"] == collection.store.vector_count(384) >= 30
    assert sidecar["generation"] == collection.store.generation
    collection.close()
