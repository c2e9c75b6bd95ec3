"""`tandem bench replicas`: throughput through nginx with 1, 2 and 3 read-only replicas.

The collection is published once (`tandem index publish`), then for each replica count the
replicas start on the published root, nginx (the shipped deploy/nginx config) balances
calls over them, and a closed loop of callers drives two-stage searches (100 ms budget) and
retrieve-only searches through nginx.

On one machine the replicas share its cores: this shows that nginx spreads calls and that
replicas share nothing that serialises them, not how throughput scales with machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tandem.benchmarks.encoders import machine
from tandem.benchmarks.load import CallShape, Level, format_report, sweep, topic_queries
from tandem.benchmarks.nginx import Nginx, NginxMissing, find_binary, find_config
from tandem.benchmarks.serving import Process, git_commit, start_tandem
from tandem.server.replication.publish import publish

# Callers back off 50 ms when refused, as the server asks: throughput of served calls, not
# the speed of refusals.
SHAPES = {
    "two-stage": CallShape(recall_k=100, top_n=5, budget_ms=100, backoff_s=0.05),
    "retrieve-only": CallShape(recall_k=100, top_n=5, mode="retrieve-only", backoff_s=0.05),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collection", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker", type=Path, default=Path("artifacts/cross-encoder"))
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--callers", type=int, default=16, help="closed-loop concurrency")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    parser.add_argument("--threads", type=int, default=2, help="per replica session")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))


def measure(nginx: Nginx, queries: list[str], args: argparse.Namespace) -> dict[str, Any]:
    level = Level("closed", args.callers, args.duration, 1_000_000)
    results = {}
    for name, shape in SHAPES.items():
        report = asyncio.run(sweep(nginx.address, [level], queries, shape, pause_s=0))[0]
        print(f"  {name}: {format_report(report)}", flush=True)
        results[name] = asdict(report)
    return results


def main(args: argparse.Namespace) -> int:
    try:  # before any replica starts: without nginx or its config there is nothing to measure
        find_binary()
        find_config()
    except NginxMissing as missing:
        print(f"tandem bench replicas: error: {missing}", file=sys.stderr)
        return 2
    queries = topic_queries()
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "machine": machine(),
        "commit": git_commit(),
        "command": " ".join(sys.argv),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="tandem-replicas-") as scratch:
        root = Path(scratch) / "published"
        publish(args.collection, root)
        for count in args.replicas:
            logs = args.out / "logs"
            replicas: list[Process] = []
            nginx = None
            try:
                for number in range(count):
                    log = logs / f"replica-{count}-{number}.log"
                    replicas.append(start_tandem(args, log, collection=root))
                nginx = Nginx([replica.port for replica in replicas], Path(scratch) / "nginx")
                print(f"{count} replica(s):", flush=True)
                record["runs"].append({"replicas": count, **measure(nginx, queries, args)})
            finally:
                if nginx is not None:
                    nginx.stop()
                for replica in replicas:
                    replica.stop()
    (args.out / "replicas.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0
