"""`tandem bench serving`: Tandem and the seeds' pipeline, side by side, in one run.

Everything runs on this machine, one server at a time, with the same load generator
(``tandem.benchmarks.load``) and the same RAG24 topics as queries:

1. bare INT8 session: pairs/s of the cross-encoder alone on pre-tokenized RAG24 pairs,
   batches of 16 (the ceiling the server is measured against);
2. throughput, closed loop: Tandem (budget 0, so every candidate is scored) against the
   baseline (``tandem.benchmarks.baseline_server``: torch FP32, numpy cosine, no batching) at each
   ``recall_k``, top_n 5: rerank pairs/s and p99, and their ratios;
3. the budget: Tandem, open loop, ``rerank_budget_ms=100``, rising offered load: the highest
   load where p99 <= 150 ms, and the mean number of candidates reranked at it;
4. retrieve-only against two-stage, p50 at concurrency 1.

Writes ``serving.json`` and two plots beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tandem.benchmarks.encoders import machine
from tandem.benchmarks.load import (
    CallShape,
    Level,
    LevelReport,
    format_report,
    plot,
    sweep,
    topic_queries,
)

P99_TARGET_MS = 150.0
BARE_BATCH = 16
# Throughput runs queue several calls behind each other on the baseline; they must not time out.
THROUGHPUT_TIMEOUT_S = 300.0


def bare_session_pairs_per_second(
    reranker: Path,
    bi_encoder: Path,
    collection: Path,
    queries: Sequence[str],
    *,
    recall_k: int,
    threads: int,
) -> float:
    """The cross-encoder session alone, on the pairs a search would score, pre-tokenized."""
    from tandem.encoders import BiEncoder, CrossEncoder
    from tandem.server.engine.collection import STORE_NAME
    from tandem.server.engine.index import fold_passages
    from tandem.server.engine.store import DocumentStore, document_keys

    embedder = BiEncoder(bi_encoder, threads=threads)
    model = CrossEncoder(reranker, threads=threads)
    store = DocumentStore(collection / STORE_NAME, read_only=True)
    try:
        keys, vectors = zip(*store.vectors(embedder.dimension), strict=True)
        all_keys = np.concatenate(keys)
        matrix = np.concatenate(vectors)
        documents = np.unique(document_keys(all_keys)).tolist()
        texts = {key: doc.text for key, doc in store.by_keys(documents).items()}
    finally:
        store.close()
    batches = []
    for query in queries:
        vector = embedder.embed([query], prompt=embedder.prompt(role="query"))[0]
        similarities = (matrix @ vector).astype(np.float32)
        nearest = fold_passages(all_keys, similarities).keys[:recall_k]
        candidates = [texts[int(key)] for key in nearest]
        # Sorted by pair length: the bare session at its best, with the least padding.
        lengths = [
            len(e.ids) for e in model.tokenizer.encode_batch([(query, c) for c in candidates])
        ]
        candidates = [candidates[i] for i in np.argsort(lengths, kind="stable")]
        for start in range(0, recall_k, BARE_BATCH):
            batches.append(model.tokenize_pairs(query, candidates[start : start + BARE_BATCH]))
    model.forward(batches[0])  # warm-up
    started = time.perf_counter()
    pairs = 0
    for batch in batches:
        model.forward(batch)
        pairs += len(batch)
    return pairs / (time.perf_counter() - started)


class Process:
    """A server in a child process, its log in a file, stopped with SIGTERM."""

    def __init__(
        self,
        command: list[str],
        log: Path,
        ready: str,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.handle = log.open("w")
        self.process = subprocess.Popen(
            command, stdout=self.handle, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
        self.port = self._wait_for(ready)

    def _wait_for(self, marker: str, timeout: float = 900) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early; see {self.log}")
            for line in self.log.read_text().splitlines():
                if marker in line:
                    return _port_of(line)
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s; see {self.log}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.handle.close()


def http_address(server: Process) -> str:
    """The HTTP base address a Tandem server's "serving" log line gives (--http-port)."""
    serving = next(
        json.loads(line)
        for line in server.log.read_text().splitlines()
        if '"msg": "serving"' in line
    )
    return str(serving["http"])


def _port_of(line: str) -> int:
    if line.startswith("READY"):
        return int(line.split()[1])
    return int(json.loads(line)["address"].rsplit(":", 1)[1])


def start_tandem(
    args: argparse.Namespace,
    log: Path,
    *,
    collection: Path | None = None,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Process:
    """A Tandem server on ``args``' models; paths absolute, so that it may run from ``cwd``."""
    command = [
        sys.executable, "-m", "tandem.cli", "serve", "--port", "0", "--metrics-port", "-1",
        "--http-port", "-1", "--collection", str(Path(collection or args.collection).resolve()),
        "--bi-encoder", str(Path(args.bi_encoder).resolve()),
        "--reranker", str(Path(args.reranker).resolve()), "--threads", str(args.threads), *extra,
    ]  # fmt: skip
    return Process(command, log, '"msg": "serving"', env=env, cwd=cwd)


def start_baseline(args: argparse.Namespace, log: Path) -> Process:
    command = [
        sys.executable, "-m", "tandem.benchmarks.baseline_server", "--port", "0",
        "--collection", str(args.collection), "--reranker", args.reranker_source,
        "--threads", str(args.threads), "--workers", "1", "--cache", str(args.cache),
    ]  # fmt: skip
    return Process(command, log, "READY")


def closed(
    port: int, queries: list[str], shape: CallShape, callers: int, args: argparse.Namespace
) -> LevelReport:
    level = Level("closed", callers, args.duration, args.max_requests)
    return asyncio.run(sweep(f"127.0.0.1:{port}", [level], queries, shape, pause_s=0))[0]


def full_rerank_throughput(
    name: str, port: int, queries: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Closed loop at each recall_k with every candidate reranked (no budget)."""
    reports = {}
    for recall_k in args.recall_ks:
        shape = CallShape(recall_k=recall_k, top_n=5, budget_ms=0, timeout_s=THROUGHPUT_TIMEOUT_S)
        report = closed(port, queries, shape, args.callers, args)
        reports[f"{name}_{recall_k}"] = asdict(report)
        print(f"{name} recall_k={recall_k}: {format_report(report)}")
    return reports


def run(args: argparse.Namespace) -> dict[str, Any]:
    queries = topic_queries()
    out: dict[str, Any] = {
        "machine": machine(),
        "commit": git_commit(),
        "command": " ".join(sys.argv),
    }
    largest = max(args.recall_ks)
    bare = bare_session_pairs_per_second(
        args.reranker, args.bi_encoder, args.collection, queries[: args.bare_queries],
        recall_k=largest,
        threads=args.threads,
    )  # fmt: skip
    out["bare_int8_pairs_per_s"] = bare
    print(f"bare INT8 session: {bare:.1f} pairs/s")
    throughput: dict[str, Any] = {}
    tandem = start_tandem(args, args.out / "logs" / "tandem.log")
    try:
        throughput.update(full_rerank_throughput("tandem", tandem.port, queries, args))
        offered = [Level("open", qps, args.duration, args.max_requests) for qps in args.qps]
        budget_shape = CallShape(recall_k=100, top_n=5, budget_ms=100)
        budget = asyncio.run(sweep(f"127.0.0.1:{tandem.port}", offered, queries, budget_shape))
        for report in budget:
            print(f"budget 100 ms: {format_report(report)}")
        solo: dict[str, LevelReport] = {}
        for name, shape in (
            ("retrieve_only", CallShape(recall_k=100, top_n=5, mode="retrieve-only")),
            ("two_stage_budget_100", CallShape(recall_k=100, top_n=5, budget_ms=100)),
            ("two_stage_full", CallShape(recall_k=100, top_n=5, budget_ms=0, timeout_s=60)),
        ):
            solo[name] = closed(tandem.port, queries, shape, 1, args)
            print(f"concurrency 1, {name}: {format_report(solo[name])}")
    finally:
        tandem.stop()
    baseline = start_baseline(args, args.out / "logs" / "baseline.log")
    try:
        throughput.update(full_rerank_throughput("baseline", baseline.port, queries, args))
        # The baseline has no budget and falls behind at once: its two lowest loads suffice.
        baseline_budget = asyncio.run(
            sweep(f"127.0.0.1:{baseline.port}", offered[:2], queries, budget_shape)
        )
    finally:
        baseline.stop()
    out["throughput"] = throughput
    out["ratios"] = {
        str(recall_k): _ratios(throughput, recall_k, bare) for recall_k in args.recall_ks
    }
    holding = [r for r in budget if r.latency_ms and r.latency_ms["p99"] <= P99_TARGET_MS
               and not r.errors]  # fmt: skip
    out["budget_100ms"] = {
        "levels": [asdict(report) for report in budget],
        "baseline_levels": [asdict(report) for report in baseline_budget],
        "highest_qps_within_p99_150ms": max((r.value for r in holding), default=None),
        "mean_reranked_at_it": max(holding, key=lambda r: r.value).reranked.get("mean")
        if holding
        else None,
    }
    out["concurrency_1"] = {name: asdict(report) for name, report in solo.items()}
    retrieve_p50 = solo["retrieve_only"].latency_ms["p50"]
    out["retrieve_only_speedup_p50"] = {
        name: solo[name].latency_ms["p50"] / retrieve_p50
        for name in ("two_stage_budget_100", "two_stage_full")
    }
    if not args.smoke:
        plot({"tandem": budget, "seed baseline": baseline_budget},
             args.out / "serving_budget.png",
             title="Search, recall_k=100, rerank_budget_ms=100 (baseline: no budget)",
             budget_ms=P99_TARGET_MS)  # fmt: skip
        plot_throughput(out, args.out / "serving_throughput.png", args.recall_ks)
    return out


def _ratios(throughput: dict[str, Any], recall_k: int, bare: float) -> dict[str, float]:
    ours, theirs = throughput[f"tandem_{recall_k}"], throughput[f"baseline_{recall_k}"]
    ours_pairs = ours["achieved_qps"] * recall_k
    theirs_pairs = theirs["achieved_qps"] * recall_k
    return {
        "tandem_pairs_per_s": ours_pairs,
        "baseline_pairs_per_s": theirs_pairs,
        "throughput_ratio": ours_pairs / theirs_pairs if theirs_pairs else float("nan"),
        "p99_ratio": theirs["latency_ms"]["p99"] / ours["latency_ms"]["p99"]
        if ours["latency_ms"] and theirs["latency_ms"]
        else float("nan"),
        "tandem_fraction_of_bare_session": ours_pairs / bare,
    }


def plot_throughput(out: dict[str, Any], path: Path, recall_ks: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    positions = np.arange(len(recall_ks))
    ratios = out["ratios"]
    ours = [ratios[str(k)]["tandem_pairs_per_s"] for k in recall_ks]
    theirs = [ratios[str(k)]["baseline_pairs_per_s"] for k in recall_ks]
    axis.bar(positions - 0.2, theirs, 0.4, label="seed baseline (torch FP32, no batching)")
    axis.bar(positions + 0.2, ours, 0.4, label="Tandem (INT8, batched, via gRPC)")
    axis.axhline(out["bare_int8_pairs_per_s"], color="grey", linestyle="--",
                 label="bare INT8 session")  # fmt: skip
    axis.set_xticks(positions, [f"recall_k={k}" for k in recall_ks])
    axis.set_ylabel("rerank pairs / s")
    axis.set_title("Search throughput, closed loop, every candidate reranked")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def git_commit(tree: Path | None = None) -> str:
    """The checkout's commit, marked "+uncommitted" where tracked files differ from it: a
    figure measured on a working tree is not that commit's."""
    git = ["git", "-C", str(tree or ".")]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+uncommitted" if changed else commit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collection", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker", type=Path, default=Path("artifacts/cross-encoder"))
    parser.add_argument(
        "--reranker-source",
        default=os.environ.get("TANDEM_RERANKER_SOURCE", "../shared/models/stand-in-reranker"),
        help="the checkpoint the baseline loads in torch (what --reranker was exported from)",
    )
    parser.add_argument("--recall-ks", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--qps", type=float, nargs="+", default=[2, 4, 8, 16, 24, 32, 48])
    parser.add_argument("--callers", type=int, default=4, help="closed-loop concurrency")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--bare-queries", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--cache", type=Path, default=Path("artifacts/bench"), help="baseline's torch vectors"
    )
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes; no plots")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        args.recall_ks, args.qps, args.duration = [5], [2.0], 1.5
        args.max_requests, args.bare_queries = 6, 1
    args.out.mkdir(parents=True, exist_ok=True)
    out = run(args)
    name = "serving_smoke.json" if args.smoke else "serving.json"
    (args.out / name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"ratios": out["ratios"], "budget": {
        k: v for k, v in out["budget_100ms"].items() if "levels" not in k},
        "retrieve_only_speedup_p50": out["retrieve_only_speedup_p50"]}, indent=2))  # fmt: skip
    return 0
