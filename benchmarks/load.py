"""`tandem bench load`: an asyncio gRPC load generator for any server speaking tandem.v1.

Two modes, each bounded by both a duration and a request count:
- open loop: Poisson arrivals at a target rate. Latency is measured from each call's
  *scheduled* arrival, so a server that falls behind cannot hide it (no coordinated
  omission);
- closed loop: a fixed number of callers, each sending its next call when the last returns.

A run sweeps one or more levels (rates or concurrencies) and reports, per level, p50/p90/p99
and max latency of successful calls, achieved QPS, errors by status code and the
distribution of the reranked count; it writes JSON and a PNG of latency against load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

# Calls outstanding at once in open loop. Past this the server is hopelessly behind, and
# more tasks would only measure this process's memory.
MAX_OUTSTANDING = 5000
MODES = {"two-stage": pb.SEARCH_MODE_TWO_STAGE, "retrieve-only": pb.SEARCH_MODE_RETRIEVE_ONLY}


@dataclass(frozen=True)
class CallShape:
    """What every Search call asks for."""

    recall_k: int = 100
    top_n: int = 5
    budget_ms: int = 100
    mode: str = "two-stage"
    timeout_s: float = 10.0
    # Closed loop: how long a caller waits after RESOURCE_EXHAUSTED before its next call, as
    # the server asks. 0 retries at once, which measures how fast the server refuses.
    backoff_s: float = 0.0


@dataclass(frozen=True)
class Level:
    kind: str  # "open" (value = offered QPS) or "closed" (value = concurrency)
    value: float
    duration_s: float
    max_requests: int


@dataclass
class LevelReport:
    kind: str
    value: float
    offered_qps: float | None
    sent: int
    ok: int
    seconds: float
    achieved_qps: float
    latency_ms: dict[str, float]  # as the client saw it, from the scheduled arrival
    # As the server saw it (its Timings.total_ms): the gap to latency_ms is time spent in
    # the network stack, the server's gRPC queue before its handler ran, and client lag.
    server_latency_ms: dict[str, float]
    errors: dict[str, int]
    reranked: dict[str, float]
    candidates_mean: float
    reranked_histogram: dict[int, int] = field(default_factory=dict)


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    server_latencies: list[float] = field(default_factory=list)
    reranked: list[int] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    sent: int = 0


def _request(query: str, shape: CallShape) -> pb.SearchRequest:
    return pb.SearchRequest(
        query=query,
        recall_k=shape.recall_k,
        top_n=shape.top_n,
        rerank_budget_ms=shape.budget_ms,
        mode=MODES[shape.mode],
    )


async def _call(
    stub: tandem_pb2_grpc.RetrievalStub,
    request: pb.SearchRequest,
    sample: Sample,
    *,
    since: float,
    shape: CallShape,
    metadata: Sequence[tuple[str, str]],
) -> None:
    sample.sent += 1
    try:
        reply = await stub.Search(request, timeout=shape.timeout_s, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        sample.errors[error.code().name] += 1
        if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and shape.backoff_s:
            await asyncio.sleep(shape.backoff_s)
        return
    sample.latencies.append(time.perf_counter() - since)
    sample.server_latencies.append(reply.timings.total_ms / 1000)
    sample.reranked.append(reply.reranked_count)
    sample.candidates.append(reply.candidates)


async def run_level(
    stub: tandem_pb2_grpc.RetrievalStub,
    level: Level,
    queries: Sequence[str],
    shape: CallShape,
    *,
    seed: int = 0,
    metadata: Sequence[tuple[str, str]] = (),
) -> LevelReport:
    rng = random.Random(seed)
    sample = Sample()
    started = time.perf_counter()
    stop_at = started + level.duration_s
    if level.kind == "open":
        tasks: set[asyncio.Task[None]] = set()
        scheduled = started
        for _ in range(level.max_requests):
            scheduled += rng.expovariate(level.value)
            if scheduled >= stop_at:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= MAX_OUTSTANDING:
                sample.errors["CLIENT_BACKLOG"] += 1
                continue
            request = _request(rng.choice(queries), shape)
            task = asyncio.create_task(
                _call(stub, request, sample, since=scheduled, shape=shape, metadata=metadata)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    else:

        async def caller(worker: int) -> None:
            local = random.Random(seed * 1000 + worker)
            while time.perf_counter() < stop_at and sample.sent < level.max_requests:
                request = _request(local.choice(queries), shape)
                await _call(
                    stub, request, sample, since=time.perf_counter(), shape=shape,
                    metadata=metadata,
                )  # fmt: skip

        await asyncio.gather(*(caller(worker) for worker in range(int(level.value))))
    seconds = time.perf_counter() - started
    return summarize(level, sample, seconds)


def milliseconds_quantiles(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {}
    latencies = np.asarray(seconds) * 1000
    return {
        "p50": float(np.percentile(latencies, 50)),
        "p90": float(np.percentile(latencies, 90)),
        "p99": float(np.percentile(latencies, 99)),
        "max": float(latencies.max()),
        "mean": float(latencies.mean()),
    }


def summarize(level: Level, sample: Sample, seconds: float) -> LevelReport:
    reranked = np.asarray(sample.reranked, dtype=np.float64)
    return LevelReport(
        kind=level.kind,
        value=level.value,
        offered_qps=level.value if level.kind == "open" else None,
        sent=sample.sent,
        ok=len(sample.latencies),
        seconds=seconds,
        achieved_qps=len(sample.latencies) / seconds if seconds else 0.0,
        latency_ms=milliseconds_quantiles(sample.latencies),
        server_latency_ms=milliseconds_quantiles(sample.server_latencies),
        errors=dict(sample.errors),
        reranked=(
            {
                "mean": float(reranked.mean()),
                "p10": float(np.percentile(reranked, 10)),
                "p50": float(np.percentile(reranked, 50)),
                "p90": float(np.percentile(reranked, 90)),
            }
            if len(reranked)
            else {}
        ),
        candidates_mean=float(np.mean(sample.candidates)) if sample.candidates else 0.0,
        reranked_histogram=dict(sorted(Counter(sample.reranked).items())),
    )


@contextlib.contextmanager
def settled_heap() -> Iterator[None]:
    """Keeps Python's cyclic garbage collector off the objects that existed before the load.

    A full collection walks every tracked object: in a process that has imported torch and
    transformers (the test suite's) that is ~400,000 objects and a 250-440 ms pause, which
    delays every call scheduled meanwhile. The latency measured would be the load
    generator's, not the server's. Frozen objects are skipped (``gc.freeze``), so the
    collections that still run walk only what the load itself allocates.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def sweep(
    address: str,
    levels: Sequence[Level],
    queries: Sequence[str],
    shape: CallShape,
    *,
    token: str | None = None,
    pause_s: float = 1.0,
) -> list[LevelReport]:
    metadata = [("authorization", f"Bearer {token}")] if token else []
    reports = []
    with settled_heap():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]
            for position, level in enumerate(levels):
                reports.append(
                    await run_level(stub, level, queries, shape, seed=position, metadata=metadata)
                )
                await asyncio.sleep(pause_s)  # let the queue drain between levels
    return reports


def plot(
    series: dict[str, list[LevelReport]], path: Path, *, title: str, budget_ms: float | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, reports in series.items():
        kept = [report for report in reports if report.latency_ms]
        loads = [report.value for report in kept]
        for quantile, style in (("p50", "--"), ("p99", "-")):
            axis.plot(
                loads, [r.latency_ms[quantile] for r in kept], style, marker="o",
                label=f"{name} {quantile}",
            )  # fmt: skip
    if budget_ms:
        axis.axhline(budget_ms, color="grey", linewidth=0.8, label=f"{budget_ms:g} ms")
    kind = next(iter(series.values()))[0].kind if series else "open"
    axis.set_xlabel("offered load (QPS)" if kind == "open" else "concurrency (callers)")
    axis.set_ylabel("latency of successful calls (ms)")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def topic_queries() -> list[str]:
    from tandem import rag24

    return [topic.query for topic in rag24.load().topics]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--token", help="bearer token, if the server wants one")
    parser.add_argument("--mode", choices=("open", "closed"), default="open")
    parser.add_argument(
        "--levels", type=float, nargs="+", default=[1, 2, 4, 8], help="QPS (open) or callers"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--max-requests", type=int, default=10_000, help="calls per level")
    parser.add_argument("--recall-k", type=int, default=100)
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--budget-ms", type=int, default=100, help="0: no deadline")
    parser.add_argument("--search-mode", choices=sorted(MODES), default="two-stage")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load.json"))
    parser.add_argument("--smoke", action="store_true", help="2 s at one level, no plot")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        args.levels, args.duration, args.max_requests = args.levels[:1], 2.0, 20
    shape = CallShape(
        recall_k=args.recall_k, top_n=args.top_n, budget_ms=args.budget_ms, mode=args.search_mode
    )
    levels = [Level(args.mode, value, args.duration, args.max_requests) for value in args.levels]
    reports = asyncio.run(sweep(args.address, levels, topic_queries(), shape, token=args.token))
    for report in reports:
        print(format_report(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"shape": asdict(shape), "levels": [asdict(r) for r in reports]}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    if not args.smoke:
        plot({args.address: reports}, args.out.with_suffix(".png"),
             title=f"Search {args.search_mode}, recall_k={args.recall_k}",
             budget_ms=args.budget_ms or None)  # fmt: skip
    return 0


def format_report(report: LevelReport) -> str:
    latency = report.latency_ms
    unit = "QPS offered" if report.kind == "open" else "callers"
    quantiles = (
        f"p50 {latency['p50']:.1f} p90 {latency['p90']:.1f} p99 {latency['p99']:.1f} "
        f"max {latency['max']:.1f} ms"
        if latency
        else "no successful calls"
    )
    server = report.server_latency_ms
    if server:
        quantiles += f" (server-side p50 {server['p50']:.1f} p99 {server['p99']:.1f})"
    reranked = report.reranked.get("mean", 0.0)
    return (
        f"{report.value:g} {unit}: {report.ok}/{report.sent} ok, {report.achieved_qps:.2f} QPS, "
        f"{quantiles}, reranked mean {reranked:.1f}/{report.candidates_mean:.0f}, "
        f"errors {report.errors or 'none'}"
    )
