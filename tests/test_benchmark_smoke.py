"""Each benchmark's smoke mode runs end to end (CI keeps the commands working; no numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import batcher, encoders, vector_search

pytestmark = pytest.mark.slow


def test_encoder_benchmark_smoke(tmp_path: Path, bi_int8, ce_int8, reranker_path, capsys) -> None:
    # The smoke run reuses the INT8 exports in the FP32 slots: it checks the command, not speed.
    for kind, folder in (("bi-encoder", bi_int8[0]), ("cross-encoder", ce_int8[0])):
        for precision in ("fp32", "int8"):
            (tmp_path / f"{kind}-{precision}").symlink_to(folder)
    out = tmp_path / "results"
    code = encoders.main(
        ["--smoke", "--artifacts", str(tmp_path), "--reranker", str(reranker_path),
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    assert "| onnxruntime int8 | 8 |" in table
    assert "torch fp32 (sentence-transformers encode)" in table
    assert not out.exists()


def test_batcher_benchmark_smoke(tmp_path: Path, ce_int8, reranker_path, capsys) -> None:
    (tmp_path / "cross-encoder-int8").symlink_to(ce_int8[0])
    out = tmp_path / "batcher.json"
    code = batcher.main(
        ["--smoke", "--artifacts", str(tmp_path), "--reranker", str(reranker_path),
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    assert "through the batcher" in capsys.readouterr().out
    assert json.loads(out.read_text())["requests"] == 2


def test_vector_search_benchmark_smoke(capsys) -> None:
    code = vector_search.main(
        ["--data", "random", "--sizes", "3000", "--queries", "20", "--k", "10", "--ef", "64"]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| usearch HNSW i8, ef=64 |" in table
    assert "| numpy brute force f32 |" in table
