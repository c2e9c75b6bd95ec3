"""The encoder benchmark's smoke mode runs end to end on real exports (numbers are not asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import encoders

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
