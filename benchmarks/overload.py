"""`tandem bench overload` and `tandem bench soak`: shedding, recovery and memory under load.

- overload: measure capacity (the highest open-loop rate, doubling or halving then one
  bisection, at which the server refuses at most 1% of calls and keeps p99 within the budget
  plus 50 ms, ``rerank_budget_ms=100``), then offer 2x and 5x that as open-loop Poisson load.
  The server
  must stay up, refuse the excess with RESOURCE_EXHAUSTED, keep the p99 of the calls it
  admits within the budget plus 50 ms, and answer normally as soon as the load stops.
- soak: 70% of capacity for minutes, sampling the server's resident memory; after warm-up
  it must grow by less than 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tandem.benchmarks.encoders import machine
from tandem.benchmarks.load import (
    CallShape,
    Level,
    LevelReport,
    format_report,
    sweep,
    topic_queries,
)

BUDGET_MS = 100
ADMITTED_P99_LIMIT_MS = BUDGET_MS + 50
SOAK_MAX_GROWTH = 0.10  # resident memory after warm-up, as a fraction
CAPACITY_START_QPS = 16.0
CAPACITY_MIN_QPS = 1.0
CAPACITY_MAX_REFUSED = 0.01


@dataclass
class OverloadReport:
    capacity_qps: float
    levels: list[dict[str, Any]]
    recovery: dict[str, Any]
    alive: bool


def _run(port: int, levels: list[Level], queries: list[str], shape: CallShape) -> list[LevelReport]:
    return asyncio.run(sweep(f"127.0.0.1:{port}", levels, queries, shape, pause_s=0))


def within_slo(report: LevelReport) -> bool:
    refused = sum(report.errors.values())
    return (
        report.ok > 0
        and refused <= CAPACITY_MAX_REFUSED * report.sent
        and report.latency_ms["p99"] <= ADMITTED_P99_LIMIT_MS
    )


def capacity(
    port: int, queries: list[str], *, seconds: float, depth_floor: float | None = None
) -> float:
    """The highest offered rate served within the SLO: from the start rate, double (or, when
    the start rate already fails, halve) until the outcome flips, then try the midpoint once.
    A closed loop would not do: its callers retry a refusal at once, so it measures how fast
    the server refuses. Halving matters on a shared machine: one stall of its cores can fail
    the start rate, and a capacity search that only climbs would then find none.

    With ``depth_floor``, a rate passes only if the calls also reranked at least that many
    candidates on average, and a floor out of reach even at the lowest rate gives 0.0."""
    shape = CallShape(recall_k=100, top_n=5, budget_ms=BUDGET_MS)

    def passes(qps: float) -> bool:
        report = _run(port, [Level("open", qps, seconds, 1_000_000)], queries, shape)[0]
        print(f"capacity probe: {format_report(report)}", flush=True)
        deep = depth_floor is None or report.reranked.get("mean", 0.0) >= depth_floor
        return within_slo(report) and deep

    if passes(CAPACITY_START_QPS):
        passed, failed = CAPACITY_START_QPS, CAPACITY_START_QPS * 2
        while passes(failed):
            passed, failed = failed, failed * 2
    else:
        passed, failed = CAPACITY_START_QPS / 2, CAPACITY_START_QPS
        while not passes(passed):
            if passed <= CAPACITY_MIN_QPS:
                if depth_floor is not None:
                    return 0.0
                raise RuntimeError(f"the server missed its SLO even at {passed:g} QPS")
            passed, failed = passed / 2, passed
    middle = (passed + failed) / 2
    return middle if passes(middle) else passed


def overload(
    port: int, queries: list[str], *, capacity_qps: float, factors: tuple[float, ...],
    seconds: float, alive: Any,
) -> OverloadReport:  # fmt: skip
    shape = CallShape(recall_k=100, top_n=5, budget_ms=BUDGET_MS, timeout_s=5.0)
    levels = []
    for factor in factors:
        offered = Level("open", capacity_qps * factor, seconds, 1_000_000)
        report = _run(port, [offered], queries, shape)[0]
        print(f"{factor:g}x capacity: {format_report(report)}", flush=True)
        levels.append({"factor": factor, **asdict(report)})
    started = time.perf_counter()
    recovery = _run(port, [Level("closed", 1, 5.0, 50)], queries, shape)[0]
    print(f"right after: {format_report(recovery)}", flush=True)
    return OverloadReport(
        capacity_qps=capacity_qps,
        levels=levels,
        recovery={**asdict(recovery), "began_after_s": time.perf_counter() - started},
        alive=bool(alive()),
    )


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def soak(
    port: int, pid: int, queries: list[str], *, qps: float, seconds: float, warm_up_s: float,
    sample_s: float = 10.0,
) -> dict[str, Any]:  # fmt: skip
    shape = CallShape(recall_k=100, top_n=5, budget_ms=BUDGET_MS)
    samples: list[tuple[float, int]] = []
    reports = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        level = Level("open", qps, sample_s, 1_000_000)
        reports.append(_run(port, [level], queries, shape)[0])
        samples.append((time.perf_counter() - started, rss_bytes(pid)))
        print(f"t={samples[-1][0]:.0f}s rss={samples[-1][1] / 2**20:.1f} MiB "
              f"{format_report(reports[-1])}", flush=True)  # fmt: skip
    after_warm_up = next(rss for t, rss in samples if t >= warm_up_s)
    final = samples[-1][1]
    return {
        "qps": qps,
        "seconds": seconds,
        "rss_after_warm_up_mib": after_warm_up / 2**20,
        "rss_final_mib": final / 2**20,
        "growth": (final - after_warm_up) / after_warm_up,
        "samples": [{"t": t, "rss_mib": rss / 2**20} for t, rss in samples],
        "errors": sum(sum(r.errors.values()) for r in reports),
        "ok": sum(r.ok for r in reports),
        "p99_ms_worst_window": max(r.latency_ms.get("p99", 0.0) for r in reports),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tandem.benchmarks import serving

    serving.add_arguments(parser)
    parser.add_argument("--what", choices=("overload", "soak", "depth"), default="overload")
    parser.add_argument(
        "--depth-floors", type=float, nargs="+", default=[10.0, 20.0],
        help="depth: the highest load whose calls rerank at least this many on average",
    )  # fmt: skip
    parser.add_argument(
        "--max-tokens-per-doc", type=int, default=0,
        help="the server's per-document token cap (0: off): trades passage length for depth",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=60.0, help="per overload level")
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    parser.add_argument("--capacity-seconds", type=float, default=10.0, help="per probed rate")


def main(args: argparse.Namespace) -> int:
    from tandem.benchmarks.serving import git_commit, start_tandem

    queries = topic_queries()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = ["--max-tokens-per-doc", str(args.max_tokens_per_doc)]
    server = start_tandem(args, args.out / "logs" / f"{args.what}.log", extra=extra)
    try:
        record: dict[str, Any] = {
            "machine": machine(),
            "commit": git_commit(),
            "command": " ".join(sys.argv),
        }
        if args.what == "depth":
            # Capacity at each depth floor, beside capacity by latency alone.
            floors = {"latency_only": None, **{f"{f:g}": f for f in args.depth_floors}}
            record["capacity_qps_at_depth"] = {
                name: capacity(
                    server.port, queries, seconds=args.capacity_seconds, depth_floor=floor
                )
                for name, floor in floors.items()
            }
            record["max_tokens_per_doc"] = args.max_tokens_per_doc
            print(json.dumps(record["capacity_qps_at_depth"]), flush=True)
            return _write(args, record)
        measured = capacity(server.port, queries, seconds=args.capacity_seconds)
        if args.what == "overload":
            report = overload(
                server.port, queries, capacity_qps=measured, factors=(2.0, 5.0),
                seconds=args.seconds, alive=lambda: server.process.poll() is None,
            )  # fmt: skip
            record.update(asdict(report))
        else:
            record["capacity_qps"] = measured
            record.update(
                soak(
                    server.port,
                    server.process.pid,
                    queries,
                    qps=0.7 * measured,
                    seconds=args.soak_seconds,
                    warm_up_s=30.0,
                )
            )
    finally:
        server.stop()
    return _write(args, record)


def _write(args: argparse.Namespace, record: dict[str, Any]) -> int:
    name = args.what if args.what != "depth" else f"depth_cap{args.max_tokens_per_doc}"
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0
