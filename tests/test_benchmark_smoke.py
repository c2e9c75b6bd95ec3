"""Each benchmark's smoke mode runs end to end (CI keeps the commands working; no numbers)."""

from __future__ import annotations

import argparse
import gc
import json
import math
import weakref
from pathlib import Path

import pytest

from tandem import relevance
from tandem.benchmarks import (
    batcher,
    bulk_embed,
    dimensions,
    encoders,
    filters,
    http_overhead,
    listing,
    load,
    long_documents,
    peers,
    quality,
    quantization,
    rerank_depth,
    runtimes,
    serving,
    stage1,
    swap,
    vector_search,
)
from tandem.export.pipeline import default_runtime

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
    assert f"| {default_runtime('int8')} int8 | 8 |" in table
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


@pytest.fixture(scope="module")
def small_collection(tmp_path_factory, bi_int8, ce_int8, data) -> Path:
    from tandem.encoders import BiEncoder
    from tandem.server.engine.collection import Collection
    from tandem.server.engine.index import IndexSettings
    from tandem.server.engine.pairs import PairTokenizer
    from tandem.server.engine.store import NewDocument

    folder = tmp_path_factory.mktemp("bench-collection")
    collection = Collection(
        folder,
        embedder=BiEncoder(bi_int8[0]),
        pairs=PairTokenizer.from_artifact(ce_int8[0]),
        settings=IndexSettings(),
    )
    collection.upsert([NewDocument(s.id, s.text) for s in data.segments[:60]])
    collection.checkpoint()
    collection.close()
    return folder


def bench_args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_load_generator_smoke(tmp_path, small_collection, bi_int8, ce_int8, capsys) -> None:
    from serving import ServerThread, settings_for

    running = ServerThread(settings_for(small_collection, bi_int8[0], ce_int8[0]))
    try:
        out = tmp_path / "load.json"
        for mode in ("open", "closed"):
            argv = ["--smoke", "--address", running.address, "--mode", mode, "--levels", "2",
                    "--recall-k", "10", "--out", str(out)]  # fmt: skip
            assert load.main(bench_args(load, argv)) == 0
            level = json.loads(out.read_text())["levels"][0]
            assert level["ok"] > 0
            assert level["errors"] == {}
            assert {"p50", "p90", "p99", "max"} <= set(level["latency_ms"])
            assert level["candidates_mean"] == 10
    finally:
        running.stop()
    reports = [load.LevelReport(**level)]
    load.plot({"tandem": reports}, tmp_path / "load.png", title="smoke", budget_ms=100)
    assert (tmp_path / "load.png").stat().st_size > 0
    assert "QPS offered" in capsys.readouterr().out


def test_serving_benchmark_smoke(tmp_path, small_collection, bi_int8, ce_int8, reranker_path):
    argv = ["--smoke", "--collection", str(small_collection), "--bi-encoder", str(bi_int8[0]),
            "--reranker", str(ce_int8[0]), "--reranker-source", str(reranker_path),
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]  # fmt: skip
    assert serving.main(bench_args(serving, argv)) == 0
    result = json.loads((tmp_path / "serving_smoke.json").read_text())
    assert result["bare_int8_pairs_per_s"] > 0
    assert result["ratios"]["5"]["baseline_pairs_per_s"] > 0
    assert result["ratios"]["5"]["tandem_pairs_per_s"] > 0
    assert set(result["retrieve_only_speedup_p50"]) == {"two_stage_budget_100", "two_stage_full"}


def test_swap_benchmark_smoke(tmp_path, small_collection, bi_int8, ce_int8, ce_other, capsys):
    # ce_other: the same reranker in the other INT8 runtime, so its id differs.
    argv = ["--smoke", "--collection", str(small_collection), "--bi-encoder", str(bi_int8[0]),
            "--reranker", str(ce_int8[0]), "--new", str(ce_other[0]),
            "--out", str(tmp_path / "swap.json")]  # fmt: skip
    assert swap.main(bench_args(swap, argv)) == 0
    result = json.loads((tmp_path / "swap_smoke.json").read_text())
    assert result["before"] != result["after"]
    assert result["after"].startswith("000002@")
    assert result["one_switch"]
    assert result["failed"] == []
    assert "one switch: True" in capsys.readouterr().out


def test_http_overhead_benchmark_smoke(bi_int8, ce_int8, capsys) -> None:
    argv = ["--smoke", "--words", "5", "--bi-encoder", str(bi_int8[0]), "--reranker",
            str(ce_int8[0])]  # fmt: skip
    assert http_overhead.main(bench_args(http_overhead, argv)) == 0
    table = capsys.readouterr().out
    assert "| callers | gRPC pairs/s | HTTP pairs/s |" in table
    assert "HTTP / gRPC" in table
    assert "HTTP's extra cost per call (median of the pairs' differences)" in table


def test_rerank_depth_benchmark_smoke(small_collection, bi_int8, ce_int8, capsys) -> None:
    # The A/B path too: this checkout served twice, once as the tree to compare against.
    here = Path(__file__).resolve().parents[1]
    argv = ["--smoke", "--bi-encoder", str(bi_int8[0]), "--reranker", str(ce_int8[0]),
            "--collection", str(small_collection), "--against", str(here)]  # fmt: skip
    assert rerank_depth.main(bench_args(rerank_depth, argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    rerank_head, search_head = (line for line in lines if line.startswith("| R") or
                                line.startswith("| S"))  # fmt: skip
    assert rerank_head.startswith("| Rerank: passages sent | this: reranked (mean) |")
    assert search_head.startswith("| Search: recall_k | this: reranked (mean) |")
    assert "against: tokenize ms" in rerank_head
    assert [line.split(" | ")[0] for line in lines if line[2:3].isdigit()] == ["| 3", "| 12"] * 2


def test_bulk_embed_benchmark_smoke(
    tmp_path, small_collection, bi_int8, ce_int8, data, capsys
) -> None:
    import gzip

    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": s.text}) + "\n" for s in data.segments[:40])
    argv = ["--smoke", "--bi-encoder", str(bi_int8[0]), "--reranker", str(ce_int8[0]),
            "--collection", str(small_collection), "--corpus", str(corpus)]  # fmt: skip
    assert bulk_embed.main(bench_args(bulk_embed, argv)) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| this |")]  # fmt: skip
    assert [row[1] for row in rows] == list(bulk_embed.PHASES)
    searched, beside, embedded = rows
    assert int(searched[2].split(" / ")[0]) > 0  # searches answered alone
    for row in (searched, beside):  # answered / refused / failed: none failed
        assert row[2].endswith(" / 0")
    for row in (beside, embedded):
        answered, failed = (int(n) for n in row[5].split(" / "))
        # Index-time Embeds wait their turn: none is refused past the SDK's retries.
        assert answered > 0
        assert failed == 0


def test_runtimes_benchmark_smoke(tmp_path, bi_int8, ce_int8, capsys) -> None:
    out = tmp_path / "runtimes.json"
    argv = ["--smoke", "--rerankers", str(ce_int8[0]), "--bi-encoders", str(bi_int8[0]),
            "--out", str(out)]  # fmt: skip
    assert runtimes.main(bench_args(runtimes, argv)) == 0
    result = json.loads(out.read_text())
    row = result["rerankers"][str(ce_int8[0])]
    assert row["pairs_per_s"] > 0
    assert 0 < row["parity"]["mean_spearman"] <= 1  # 2 queries: the command, not the bar
    assert result["bi_encoders"][str(bi_int8[0])]["docs_per_s"] > 0
    assert "| reranker runtime | pairs/s |" in capsys.readouterr().out


def test_long_documents_benchmark_smoke(tmp_path, bi_int8, ce_int8) -> None:
    argv = ["--smoke", "--bi-encoder", str(bi_int8[0]), "--reranker", str(ce_int8[0]),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "long.json"),
            "--budget-depth", "6"]  # fmt: skip
    assert long_documents.main(bench_args(long_documents, argv)) == 0
    result = json.loads((tmp_path / "long_documents_smoke.json").read_text())
    assert 0 < result["documents"] <= 60
    assert result["topics"] >= 1
    assert result["documents_past_one_window"] > 0
    assert set(result["held_out"]) >= {
        "passages_maxp",
        "first_window_first_window",
        "stage1_segments",
    }
    assert result["indexed"]["passages"]["vectors"] > result["indexed"]["first_window"]["vectors"]
    assert result["depth"] == 4
    assert result["in_budget"]["maxp"]["of_documents"] == 6


def test_quantization_benchmark_smoke(request, tmp_path, reranker_path, capsys) -> None:
    # The recipes are OpenVINO's: its export is the default on some CPUs, the other on the rest.
    template = request.getfixturevalue(
        "ce_int8" if default_runtime("int8") == "openvino" else "ce_other"
    )
    out = tmp_path / "quantization.json"
    argv = ["--smoke", "--source", str(reranker_path), "--template", str(template[0]),
            "--out", str(out)]  # fmt: skip
    assert quantization.main(bench_args(quantization, argv)) == 0
    row = json.loads(out.read_text())["rows"]["export"]
    assert 0 < row["top5_overlap"] <= 1
    assert row["pairs_per_s"] > 0
    assert "| export: tandem export's recipe" in capsys.readouterr().out


def test_peers_benchmark_smoke(tmp_path, bi_int8, ce_int8, reranker_path, capsys) -> None:
    argv = ["--smoke", "--bi-encoder", str(bi_int8[0]), "--reranker", str(ce_int8[0]),
            "--reranker-source", str(reranker_path), "--infinity", str(tmp_path / "absent"),
            "--out", str(tmp_path), "--cpu-precisions", "auto", "f32"]  # fmt: skip
    assert peers.main(bench_args(peers, argv)) == 0
    result = json.loads((tmp_path / "peers_smoke.json").read_text())
    assert "is missing" in result["infinity"]
    grpc_row = result["rows"]["Tandem gRPC"]
    assert grpc_row["pairs_per_s_1"] > 0
    assert grpc_row["runtime"] == ce_int8[1].runtime
    assert grpc_row["runtime_choice"]
    # The same Tandem served again with f32 pinned, saying so (OpenVINO names a precision).
    pinned = result["rows"]["Tandem --cpu-precision f32 gRPC"]
    assert pinned["pairs_per_s_1"] > 0
    if pinned["runtime"] == "openvino":
        assert (pinned["inference_precision"], pinned["runtime_choice"]) == (
            "f32",
            "pinned: --cpu-precision f32",
        )
    # Tandem's INT8 ranks like FP32 on most of these short passages.
    assert grpc_row["top5_overlap_with_fp32"] >= 0.6
    assert "Tandem HTTP (Cohere /v1/rerank)" in capsys.readouterr().out


def test_quality_benchmark_smoke(tmp_path, bi_int8, ce_int8, reranker_path, minilm_path) -> None:
    # INT8 exports stand in the FP32 slots: the smoke run checks the command, not the numbers.
    argv = ["--smoke", "--bi-encoder-int8", str(bi_int8[0]), "--reranker-int8", str(ce_int8[0]),
            "--bi-encoder-fp32", str(bi_int8[0]), "--reranker-fp32", str(ce_int8[0]),
            "--bi-encoder-source", str(minilm_path), "--reranker-source", str(reranker_path),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "quality.json")]  # fmt: skip
    assert quality.main(bench_args(quality, argv)) == 0
    result = json.loads((tmp_path / "quality_smoke.json").read_text())
    assert set(result["metrics"]) == {"retrieve_only", "two_stage_int8", "two_stage_fp32",
                                      "reference"}  # fmt: skip
    assert result["metrics"]["reference"]["umbrela"]["topics"] == 3
    assert 0 <= result["metrics"]["two_stage_int8"]["umbrela"]["ndcg@10"] <= 1
    assert result["stand_in_warning"] is True


def test_stage1_benchmark_smoke(tmp_path, bi_int8, ce_int8) -> None:
    argv = ["--smoke", "--bi-encoder", str(bi_int8[0]), "--reranker", str(ce_int8[0]),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "stage1.json"),
            "--baseline-bi-encoder", str(bi_int8[0])]  # fmt: skip
    assert stage1.main(bench_args(stage1, argv)) == 0
    result = json.loads((tmp_path / "stage1_smoke.json").read_text())
    assert result["served_hybrid_matches_offline_fusion"] is True
    assert result["topics"] == {"all": 8, "fit": 4, "held_out": 4}
    assert set(result["alone"]["held_out"]["umbrela"]) == {"dense", "lexical", "hybrid",
                                                           "hybrid_rrf60"}  # fmt: skip
    assert set(result["latency_ms"]) == {"dense", "lexical", "hybrid"}
    assert result["index_bytes"]["lexical"] > 0
    assert 0 <= result["reranked_held_out"]["umbrela"]["hybrid"]["ndcg@10"] <= 1
    assert 0 <= result["hybrid_vs_dense_held_out"]["umbrela"]["ndcg@10"]["p_value"] <= 1
    # The same bi-encoder as its own baseline, in a collection of its own: the same rankings.
    against_itself = result["dense_vs_baseline_held_out"]["umbrela"]
    assert against_itself["recall@20"]["mean_difference"] == 0
    assert result["baseline"]["dense_held_out"] == {
        source: result["alone"]["held_out"][source]["dense"] for source in ("umbrela", "nist")
    }


def test_dimensions_benchmark_smoke(tmp_path, bi_int8) -> None:
    argv = ["--smoke", "--bi-encoder", str(bi_int8[0]), "--sizes", "128,64",
            "--out", str(tmp_path / "dimensions.json")]  # fmt: skip
    assert dimensions.main(bench_args(dimensions, argv)) == 0
    result = json.loads((tmp_path / "dimensions_smoke.json").read_text())
    rows = {(row["dimensions"], row["dtype"]): row for row in result["sizes"]}
    assert set(rows) == {(size, dtype) for size in (384, 128, 64) for dtype in ("f32", "i8")}
    assert rows[(128, "i8")]["bytes"] == 128
    assert rows[(384, "f32")]["bytes"] == 1536
    # The full f32 vector is the baseline: against itself it differs by exactly 0.
    against_itself = rows[(384, "f32")]["umbrela"]["against_full_f32"]
    assert against_itself["ndcg@10"]["mean_difference"] == 0
    assert 0 <= rows[(64, "i8")]["umbrela"]["recall@20"] <= 1


def test_listing_benchmark_smoke(tmp_path, small_collection) -> None:
    argv = ["--smoke", "--collection", str(small_collection), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "listing.json")]  # fmt: skip
    assert listing.main(bench_args(listing, argv)) == 0
    result = json.loads((tmp_path / "listing_smoke.json").read_text())
    walks = result["walks"]
    metadata = filters.synthetic_metadata(result["documents"], result["seed"])
    for limit in (100, 1000):
        assert walks[f"everything, {limit}"]["documents"] == result["documents"] == 60
        assert walks[f"OFFSET paging, {limit}"]["documents"] == 60
        for name, raw in listing.WALKS.items():
            if raw is not None:
                wanted = filters.compiled(raw)
                matching = sum(wanted.matches(m) for m in metadata)
                assert walks[f"{name}, {limit}"]["documents"] == matching, name
    assert result["served"] is None


def test_filters_benchmark_smoke(tmp_path, small_collection, bi_int8, ce_int8) -> None:
    argv = ["--smoke", "--collection", str(small_collection), "--bi-encoder", str(bi_int8[0]),
            "--reranker", str(ce_int8[0]), "--work", str(tmp_path / "work"), "--scans", "2",
            "--out", str(tmp_path / "filters.json")]  # fmt: skip
    assert filters.main(bench_args(filters, argv)) == 0
    result = json.loads((tmp_path / "filters_smoke.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"none", *filters.FILTERS}
    assert rows["none"]["matching"] == result["documents"] == 60
    assert rows["none"]["dense"]["p50_ratio"] == 1
    for name, row in rows.items():
        assert 0 <= row["matching"] <= 60, name
        assert 0 <= row["dense"]["recall"] <= 1, name
    # The source collection keeps its own metadata: the bench rewrote only its copy.
    from tandem.server.engine.store import DocumentStore

    store = DocumentStore(small_collection / "documents.sqlite", read_only=True)
    try:
        assert all(not d.metadata for d in store.by_keys(store.keys().tolist()).values())
    finally:
        store.close()


def test_paired_test_finds_a_consistent_difference_and_not_noise() -> None:
    from tandem.relevance import paired_test

    better = paired_test([0.1, 0.2, 0.3, 0.4] * 10, [0.2, 0.3, 0.4, 0.5] * 10, seed=1)
    assert better["mean_difference"] == pytest.approx(0.1)
    assert better["p_value"] < 0.01
    assert better["ci_low"] == pytest.approx(0.1)
    same = paired_test([0.1, 0.5] * 10, [0.5, 0.1] * 10, seed=1)
    assert same["mean_difference"] == pytest.approx(0.0)
    assert same["p_value"] > 0.5


def test_ranking_metrics_on_a_hand_made_case() -> None:
    grades = {"a": 3, "b": 0, "c": 2, "d": 1}
    ranking = ["b", "c", "a"]
    ideal = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert relevance.ndcg_at(ranking, grades) == pytest.approx((2 / math.log2(3) + 3 / 2) / ideal)
    assert relevance.mrr_at(ranking, grades, relevant=2) == 0.5
    assert relevance.recall_at(ranking, grades, relevant=2, k=2) == 0.5


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_load_generator_keeps_the_collector_off_objects_that_predate_the_load() -> None:
    survivor = _Cycle()  # alive when the load starts
    predates = weakref.ref(survivor)
    with load.settled_heap():
        assert gc.get_freeze_count() > 0
        del survivor  # garbage now, but frozen: a collection does not walk it (the pause)
        during = _Cycle()
        made_during = weakref.ref(during)
        del during
        gc.collect()
        assert made_during() is None  # what the load itself drops is still collected
        assert predates() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert predates() is None


def test_bench_replicas_finds_the_nginx_config_or_says_where_it_looked(tmp_path, monkeypatch):
    from tandem.benchmarks import nginx

    assert nginx.find_config({}) == nginx.ROOT / "deploy" / "nginx" / "tandem.conf"
    monkeypatch.setattr(nginx, "ROOT", tmp_path / "site-packages")  # an installed wheel
    elsewhere = tmp_path / "work"
    with pytest.raises(nginx.NginxMissing, match="set TANDEM_NGINX_CONFIG"):
        nginx.find_config({}, cwd=elsewhere)
    shipped = tmp_path / "tandem.conf"
    shipped.write_text("events {}\n")
    assert nginx.find_config({"TANDEM_NGINX_CONFIG": str(shipped)}, cwd=elsewhere) == shipped
