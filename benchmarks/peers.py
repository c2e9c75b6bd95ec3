"""`tandem bench peers`: Tandem beside other rerank servers, on the same requests, in one run.

Each request is a RAG24 topic and 50 passages cut to about 100 tokens (their first 70
words), all scored, top_n 5: Tandem over gRPC ``Rerank`` and over Cohere's ``/v1/rerank``,
Infinity (``infinity_emb v2``, its own virtual environment, torch int8 and FP32 engines)
over its Cohere-shaped ``/rerank``, optionally an older Tandem checkout over gRPC, and the
seeds' pipeline (sentence-transformers ``CrossEncoder.predict``, FP32, in process). Servers
run one at a time on this machine, closed loop at each concurrency; each reply's top 5 is
compared with the FP32 reference's top 5 for the same request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from tandem import rag24
from tandem.benchmarks.encoders import machine
from tandem.benchmarks.http_overhead import (
    TOP_N,
    Case,
    Refused,
    closed_loop,
    refusal,
    rerank_request,
)
from tandem.benchmarks.load import CallShape, Level, sweep, topic_queries
from tandem.benchmarks.serving import Process, git_commit
from tandem.devices import CPU_PRECISIONS
from tandem.export import reference
from tandem.export.texts import rerank_cases
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

DOCUMENTS = 50
WORDS = 70  # ~100 tokens of RAG24 text
TIMEOUT_S = 300.0
INFINITY = Path(".cache/infinity/bin/infinity_emb")
Send = Callable[[Case], Awaitable[list[int]]]


def requests(count: int) -> list[Case]:
    """RAG24 topics with their 50 nearest segments by BM25, each cut to ``WORDS`` words."""
    cases = rerank_cases(rag24.load(), queries=count, candidates=DOCUMENTS, part="verify")
    return [
        Case(case.query, [" ".join(text.split()[:WORDS]) for text in case.documents])
        for case in cases
    ]


def reference_top(source: Path, work: list[Case], threads: int) -> dict[str, list[int]]:
    scores = reference.score(
        source, [(case.query, case.documents) for case in work], max_length=512, threads=threads
    )
    return {case.query: top(values) for case, values in zip(work, scores, strict=True)}


def top(values: Any) -> list[int]:
    return [int(i) for i in np.argsort(-np.asarray(values), kind="stable")[:TOP_N]]


def grpc_sender(port: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]

    async def send(case: Case) -> list[int]:
        try:
            reply = await stub.Rerank(rerank_request(case))
        except grpc.aio.AioRpcError as error:
            raise refusal(error) from error
        if reply.reranked_count != len(case.documents):
            raise RuntimeError(f"scored {reply.reranked_count} of {len(case.documents)}")
        return [result.index for result in reply.results]

    return send, channel.close


def http_sender(base: str, path: str, model: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(
        base_url=base, timeout=TIMEOUT_S, limits=httpx.Limits(max_connections=64)
    )

    async def send(case: Case) -> list[int]:
        reply = await client.post(
            path,
            json={"model": model, "query": case.query, "documents": case.documents,
                  "top_n": TOP_N, "return_documents": False},
        )  # fmt: skip
        if reply.status_code == 429:
            raise Refused(float(reply.headers.get("retry-after", "1")))
        reply.raise_for_status()
        return [int(result["index"]) for result in reply.json()["results"]]

    return send, client.aclose


async def measure(
    send: Send, work: list[Case], want: dict[str, list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    overlaps = []
    for case in work:
        got = await retrying(send, case)
        overlaps.append(len(set(got) & set(want[case.query])) / TOP_N)
    rows: dict[str, Any] = {"top5_overlap_with_fp32": round(float(np.mean(overlaps)), 3)}

    async def scored(case: Case) -> int:
        await send(case)
        return len(case.documents)

    for callers in args.callers:
        await closed_loop(scored, work, callers=callers, seconds=2.0)  # warm-up
        loop = await closed_loop(scored, work, callers=callers, seconds=args.seconds)
        rows[f"pairs_per_s_{callers}"] = round(loop.pairs / loop.seconds, 1)
        rows[f"p50_ms_{callers}"] = round(float(np.median(loop.latencies)) * 1000, 1)
        print(f"  {callers} callers: {rows[f'pairs_per_s_{callers}']} pairs/s", flush=True)
    return rows


async def measure_with(
    opener: Callable[[], tuple[Send, Callable[[], Awaitable[None]]]],
    work: list[Case],
    want: dict[str, list[int]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Opens the client inside the running loop (gRPC's aio channel belongs to its loop)."""
    send, close = opener()
    try:
        return await measure(send, work, want, args)
    finally:
        await close()


async def retrying(send: Send, case: Case) -> list[int]:
    while True:
        try:
            return await send(case)
        except Refused as refused:
            await asyncio.sleep(refused.delay_s)


def wait_http(base: str, process: Any, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early; see {log}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"not ready after {timeout} s; see {log}")


def run_infinity(
    dtype: str, args: argparse.Namespace, work: list[Case], want: dict[str, list[int]], logs: Path
) -> dict[str, Any]:
    import subprocess

    port = 7997
    log = logs / f"infinity-{dtype}.log"
    command = [
        str(args.infinity), "v2", "--model-id", str(args.reranker_source), "--engine", "torch",
        "--dtype", dtype, "--device", "cpu", "--port", str(port), "--no-model-warmup",
    ]  # fmt: skip
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }
    with log.open("w") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=environment
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base, process, log)
            opener = partial(http_sender, base, "/rerank", str(args.reranker_source))
            return asyncio.run(measure_with(opener, work, want, args))
        finally:
            process.terminate()
            process.wait(timeout=60)


def run_tandem(
    name: str,
    root: Path | None,
    reranker: Path,
    args: argparse.Namespace,
    work: list[Case],
    want: dict[str, list[int]],
    logs: Path,
    *,
    http: bool,
    collection: Path | None = None,
    bi_encoder: Path | None = None,
    serve_flags: tuple[str, ...] = (),
) -> dict[str, dict[str, Any]]:
    """The rerank rows for one Tandem, each saying how its reranker runs (Info); with
    ``collection``, also how deep its Search reads within the default 100 ms budget at
    concurrency 1 (recall_k 100), over that collection."""
    scratch = Path(tempfile.mkdtemp(prefix="tandem-peers-"))
    command = [
        sys.executable, "-m", "tandem.cli", "serve", "--port", "0", "--metrics-port", "-1",
        "--http-port", "18080" if http else "-1", "--collection", str(collection or scratch),
        "--bi-encoder", str(bi_encoder or args.bi_encoder), "--reranker", str(reranker),
        "--threads", str(args.threads), *serve_flags,
    ]  # fmt: skip
    environment = dict(os.environ)
    if root is not None:  # an older checkout, ahead of the installed package
        environment["PYTHONPATH"] = str(root)
    results: dict[str, dict[str, Any]] = {}
    server = Process(command, logs / f"{name}.log", '"msg": "serving"', env=environment)
    try:
        openers = {f"{name} gRPC": partial(grpc_sender, server.port)}
        if http:
            openers[f"{name} HTTP (Cohere /v1/rerank)"] = partial(
                http_sender, "http://127.0.0.1:18080", "/v1/rerank", "rerank"
            )
        runs_as = reranker_runs_as(server.port)
        for label, opener in openers.items():
            print(label, runs_as, flush=True)
            results[label] = {**asyncio.run(measure_with(opener, work, want, args)), **runs_as}
        if collection is not None:
            results[f"{name} gRPC"]["search_depth"] = search_depth(server.port, args)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def reranker_runs_as(port: int) -> dict[str, str]:
    """What the server's Info says its reranker runs on, in what precision, and why."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]
        model = stub.Info(pb.InfoRequest(), timeout=30).reranker
    return {
        "runtime": model.runtime,
        "inference_precision": model.inference_precision,
        "runtime_choice": model.runtime_choice,
    }


def search_depth(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Search, recall_k 100, the 100 ms budget, one caller: candidates reranked per call,
    after as long again of the same calls as warm-up (a server that has run for a while has
    seen its batch shapes, and its batcher has learned their cost)."""
    shape = CallShape(recall_k=100, top_n=5, budget_ms=100)
    warm_up, level = (Level("closed", 1, args.seconds, 10_000) for _ in range(2))
    report = asyncio.run(sweep(f"127.0.0.1:{port}", [warm_up, level], topic_queries(), shape))[1]
    print(f"  Search within 100 ms: {report.reranked} reranked of 100", flush=True)
    return {"reranked": report.reranked, "latency_ms": report.latency_ms, "calls": report.ok}


def seeds_pipeline(
    args: argparse.Namespace, work: list[Case], want: dict[str, list[int]]
) -> dict[str, Any]:
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(args.threads)
    model = CrossEncoder(
        str(args.reranker_source), device="cpu", model_kwargs={"dtype": torch.float32}
    )
    overlaps, pairs, started, position = [], 0, time.perf_counter(), 0
    for case in work:
        scores = model.predict(
            [(case.query, text) for text in case.documents], show_progress_bar=False
        )
        overlaps.append(len(set(top(scores)) & set(want[case.query])) / TOP_N)
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        case = work[position % len(work)]
        model.predict([(case.query, text) for text in case.documents], show_progress_bar=False)
        pairs += len(case.documents)
        position += 1
    return {
        "top5_overlap_with_fp32": round(float(np.mean(overlaps)), 3),
        "pairs_per_s_1": round(pairs / (time.perf_counter() - started), 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = requests(args.requests)
    want = reference_top(Path(args.reranker_source), work, args.threads)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "machine": machine(),
        "commit": git_commit(),
        "command": " ".join(sys.argv),
        "requests": len(work),
        "documents": DOCUMENTS,
        "words_per_document": WORDS,
    }
    rows: dict[str, Any] = {}
    print("seeds' pipeline", flush=True)
    rows["seeds' pipeline (sentence-transformers FP32, in process)"] = seeds_pipeline(
        args, work, want
    )
    for position, precision in enumerate(args.cpu_precisions):
        rows.update(
            run_tandem(
                "Tandem" if precision == "auto" else f"Tandem --cpu-precision {precision}",
                None, args.reranker, args, work, want, logs, http=position == 0,
                collection=args.collection, serve_flags=("--cpu-precision", precision),
            )
        )  # fmt: skip
    if args.old_checkout is not None:
        old = run_tandem(
            f"Tandem@{args.old_label}",
            args.old_checkout,
            args.old_reranker or args.reranker,
            args,
            work,
            want,
            logs,
            http=False,
            collection=args.old_collection,
            bi_encoder=args.old_bi_encoder,
        )
        rows.update(old)
    if args.infinity.is_file():
        for dtype in ("int8", "float32"):
            print(f"Infinity {dtype}", flush=True)
            rows[f"Infinity 0.0.78 torch {dtype}"] = run_infinity(dtype, args, work, want, logs)
    else:
        out["infinity"] = f"not measured: {args.infinity} is missing (see benchmarks/README)"
    out["rows"] = rows
    return out


def table(out: dict[str, Any], callers: list[int]) -> str:
    head = " | ".join(f"pairs/s, {c} caller{'s' if c > 1 else ''}" for c in callers)
    lines = [
        f"| server | runs as | {head} | top-5 overlap with FP32 | Search: reranked in 100 ms |",
        "|---" * (len(callers) + 4) + "|",
    ]
    for name, row in out["rows"].items():
        cells = " | ".join(str(row.get(f"pairs_per_s_{c}", "—")) for c in callers)
        runs_as = " ".join(filter(None, (row.get("runtime"), row.get("inference_precision"))))
        reranked = row.get("search_depth", {}).get("reranked", {})
        depth = (
            f"{reranked['mean']:.2f} (p10 {reranked['p10']:g}, p90 {reranked['p90']:g})"
            if reranked
            else ""
        )
        lines.append(
            f"| {name} | {runs_as} | {cells} | {row['top5_overlap_with_fp32']} | {depth} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker", type=Path, default=Path("artifacts/cross-encoder"))
    parser.add_argument(
        "--reranker-source", type=Path, default=Path("../shared/models/stand-in-reranker")
    )
    parser.add_argument(
        "--infinity", type=Path, default=INFINITY, help="infinity_emb in its own venv"
    )
    parser.add_argument(
        "--old-checkout", type=Path, help="an older Tandem checkout, served over gRPC"
    )
    parser.add_argument("--old-label", default="old")
    parser.add_argument("--old-reranker", type=Path, help="the artifact the old checkout serves")
    parser.add_argument(
        "--old-bi-encoder", type=Path, help="the bi-encoder the old checkout serves"
    )
    parser.add_argument(
        "--collection", type=Path, help="also measure Search's depth within 100 ms over this"
    )
    parser.add_argument("--old-collection", type=Path, help="the same, for the old checkout")
    parser.add_argument(
        "--cpu-precisions",
        nargs="+",
        choices=["auto", *CPU_PRECISIONS],
        default=["auto"],
        help="serve this Tandem once per --cpu-precision (HTTP on the first only)",
    )
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="seconds: 2 requests, 1 caller")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        args.requests, args.callers, args.seconds = 2, [1], 1.0
    out = run(args)
    name = "peers_smoke.json" if args.smoke else "peers.json"
    (args.out / name).write_text(json.dumps(out, indent=2) + "\n")
    print(table(out, args.callers))
    return 0
