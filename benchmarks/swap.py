"""`tandem bench swap`: a new reranker published to a server under Search load.

A server follows a fresh models root whose first version is ``--reranker``; closed-loop
callers send Search calls (two-stage, the default budget) for ``--seconds``; at
``--publish-at`` the ``--new`` artifact is published (``tandem models publish``). Reported:
failed calls (the target is none), whether the replies switch model at one point (every call
that started before the first reply of the new model was scored by the old one, and every
one after by the new), how long the swap took from the publish, and the latency before,
during and after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from tandem import rag24
from tandem.benchmarks.encoders import machine
from tandem.benchmarks.serving import Process, git_commit
from tandem.server.replication.models import publish_reranker
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc


@dataclass(frozen=True)
class Reply:
    started: float  # seconds since the load began
    ms: float
    reranker_id: str  # "" for a failed call
    code: str  # "OK" or the gRPC status name


async def caller(stub: Any, queries: list[str], offset: int, until: float, t0: float,
                 replies: list[Reply]) -> None:  # fmt: skip
    number = offset
    while time.monotonic() < until:
        started = time.monotonic()
        request = pb.SearchRequest(query=queries[number % len(queries)], top_n=5)
        try:
            reply = await stub.Search(request, timeout=30)
            replies.append(Reply(started - t0, _ms(started), reply.reranker_id, "OK"))
        except grpc.aio.AioRpcError as error:
            # RESOURCE_EXHAUSTED is shedding under load: counted, and retried as a client does.
            replies.append(Reply(started - t0, _ms(started), "", error.code().name))
            if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(0.05)
        number += 1


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


async def load(
    args: argparse.Namespace, port: int, root: Path, queries: list[str]
) -> dict[str, Any]:
    replies: list[Reply] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]
        before = (await stub.Info(pb.InfoRequest())).reranker_id
        t0 = time.monotonic()
        until = t0 + args.seconds
        tasks = [
            asyncio.create_task(caller(stub, queries, n * 7, until, t0, replies))
            for n in range(args.callers)
        ]
        await asyncio.sleep(args.publish_at)
        published_at = time.monotonic() - t0
        version = await asyncio.to_thread(publish_reranker, args.new, root)
        await asyncio.gather(*tasks)
        after = (await stub.Info(pb.InfoRequest())).reranker_id
    scored = [reply for reply in replies if reply.code == "OK"]
    new_ends = [r.started + r.ms / 1000 for r in scored if r.reranker_id == after]
    swapped_at = min(new_ends) if new_ends and after != before else None
    # A call takes the reranker once, between its start and its end: one switch means that
    # once a reply of the new reranker has come back, no call started later got the old one.
    one_switch = (
        swapped_at is not None
        and {r.reranker_id for r in scored} == {before, after}
        and all(r.started < swapped_at for r in scored if r.reranker_id == before)
    )

    def window(low: float, high: float) -> dict[str, float | int]:
        ms = [reply.ms for reply in scored if low <= reply.started < high]
        if not ms:
            return {"calls": 0}
        return {
            "calls": len(ms),
            "p50_ms": statistics.median(ms),
            "p99_ms": sorted(ms)[min(len(ms) - 1, int(0.99 * len(ms)))],
        }

    swap_end = swapped_at if swapped_at is not None else args.seconds
    return {
        "calls": len(replies),
        "failed": [
            asdict(reply) for reply in replies if reply.code not in ("OK", "RESOURCE_EXHAUSTED")
        ],
        "refused": sum(reply.code == "RESOURCE_EXHAUSTED" for reply in replies),
        "before": before,
        "after": after,
        "version": version,
        "one_switch": one_switch,
        "published_at_s": published_at,
        "first_new_reply_s": swapped_at,
        "swap_s": None if swapped_at is None else swapped_at - published_at,
        "latency": {
            "before": window(0, published_at),
            "during": window(published_at, swap_end),
            "after": window(swap_end, args.seconds),
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collection", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker", type=Path, default=Path("artifacts/cross-encoder"),
                        help="the artifact served first")  # fmt: skip
    parser.add_argument("--new", type=Path, required=True, help="the artifact published")
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--publish-at", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/swap.json"))
    parser.add_argument("--smoke", action="store_true", help="seconds: 2 callers, 8 s")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        args.callers, args.seconds, args.publish_at = 2, 8.0, 3.0
        args.out = args.out.with_name("swap_smoke.json")
    queries = [topic.query for topic in rag24.load().topics]
    with tempfile.TemporaryDirectory(prefix="tandem-swap-") as scratch:
        root = Path(scratch) / "models"
        publish_reranker(args.reranker, root)
        server = Process(
            [
                sys.executable, "-m", "tandem.cli", "serve", "--port", "0",
                "--metrics-port", "-1", "--http-port", "-1",
                "--collection", str(args.collection), "--bi-encoder", str(args.bi_encoder),
                "--reranker", str(root), "--threads", str(args.threads), "--read-only",
                "--follow-seconds", "0.5",
            ],
            Path(scratch) / "server.log",
            '"msg": "serving"',
        )  # fmt: skip
        try:
            result = asyncio.run(load(args, server.port, root, queries))
        finally:
            server.stop()
        swapped = [
            line for line in (Path(scratch) / "server.log").read_text().splitlines()
            if "reranker swapped" in line
        ]  # fmt: skip
    result.update(
        machine=machine(), commit=git_commit(), callers=args.callers, seconds=args.seconds,
        server_log=swapped,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    latency = result["latency"]
    print(
        f"{result['calls']} calls, {len(result['failed'])} failed, {result['refused']} shed "
        f"and retried; one switch: "
        f"{result['one_switch']} ({result['before']} -> {result['after']}); swap took "
        f"{result['swap_s']} s after the publish; p50/p99 ms before "
        f"{latency['before']}, during {latency['during']}, after {latency['after']}"
    )
    return 0 if not result["failed"] and result["one_switch"] else 1
