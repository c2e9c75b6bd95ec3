"""`tandem bench http`: what the HTTP door costs against gRPC, on one server, in one run.

The same Rerank (a RAG24 topic and 50 passages, all scored, top_n 5, no deadline) goes
through gRPC ``Rerank`` and through Cohere's ``/v2/rerank``, closed-loop at each concurrency.
Rounds alternate the order (gRPC then HTTP, then HTTP then gRPC) so that a slow spell of the
shared machine falls on both. The figure is served pairs/s over HTTP as a fraction of gRPC's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from tandem import rag24
from tandem.benchmarks.encoders import machine
from tandem.benchmarks.serving import Process, git_commit, http_address
from tandem.server.api.status import retry_delay_of
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

TOP_N = 5
TIMEOUT_S = 120.0


class Refused(Exception):
    """The server shed the call (RESOURCE_EXHAUSTED, HTTP 429); retry after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(f"refused; retry after {delay_s} s")
        self.delay_s = delay_s


def refusal(error: grpc.aio.AioRpcError) -> Exception:
    """RESOURCE_EXHAUSTED as ``Refused``, with the server's retry delay; anything else as is."""
    if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error
    return Refused(retry_delay_of(error) or 0.1)


@dataclass(frozen=True)
class Answer:
    pairs: int  # pairs the server scored
    # From admission to the engine's answer: gRPC's timings.total_ms, HTTP's Server-Timing
    # `call`. What each door adds around it is the client's time less this.
    call_ms: float
    server_ms: float | None = None  # HTTP's Server-Timing `total`: the door in, the reply out


def server_timing_ms(header: str, metric: str) -> float:
    """``metric``'s duration in a ``Server-Timing`` header (``total;dur=1.234, call;dur=1``)."""
    for entry in header.split(","):
        name, *parameters = (part.strip() for part in entry.split(";"))
        for parameter in parameters:
            if name == metric and parameter.startswith("dur="):
                return float(parameter.removeprefix("dur="))
    raise RuntimeError(f"no {metric} in Server-Timing {header!r}")


@dataclass(frozen=True)
class Case:
    query: str
    documents: list[str]


@dataclass
class Round:
    transport: str
    callers: int
    calls: int
    pairs: int
    seconds: float
    latency_ms_p50: float
    refused: int  # calls shed and retried after the server's delay, as a client does

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds


def rerank_request(case: Case) -> pb.RerankRequest:
    """Every document scored (no budget), the best ``TOP_N`` returned."""
    return pb.RerankRequest(
        query=case.query,
        documents=[pb.RerankDocument(text=text) for text in case.documents],
        top_n=TOP_N,
        rerank_budget_ms=0,
    )


def cases(count: int, documents: int, *, words: int = 0) -> list[Case]:
    """RAG24 topics, each with ``documents`` passages from the pool retrieved for them, cut
    to their first ``words`` words where that is set (the model's share then nearly goes, and
    what is left is each door's fixed cost)."""
    data = rag24.load()
    segments = [
        " ".join(segment.text.split()[:words]) if words else segment.text
        for segment in data.segments
    ]
    return [
        Case(topic.query, segments[(i * documents) % len(segments) :][:documents])
        for i, topic in enumerate(data.topics[:count])
    ]


@dataclass
class Loop:
    calls: int
    pairs: int
    seconds: float
    latencies: list[float]
    refused: int


def pairs_of(send: Callable[[Case], Awaitable[Answer]]) -> Callable[[Case], Awaitable[int]]:
    async def pairs(case: Case) -> int:
        return (await send(case)).pairs

    return pairs


async def closed_loop(
    send: Callable[[Case], Awaitable[int]], work: list[Case], *, callers: int, seconds: float
) -> Loop:
    """``callers`` loops, each sending its next call as soon as the last is answered, until
    ``seconds`` have passed. A refused call waits the server's retry delay and is sent again;
    its latency counts from the first try."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    pairs = refused = counter = 0

    async def caller() -> None:
        nonlocal pairs, counter, refused
        while time.perf_counter() < deadline:
            case = work[counter % len(work)]
            counter += 1
            started = time.perf_counter()
            while True:
                try:
                    scored = await send(case)  # not `pairs += await ...`: that reads
                    pairs += scored  # `pairs` before the await and loses other callers' adds
                    break
                except Refused as refusal:
                    refused += 1
                    await asyncio.sleep(refusal.delay_s)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return Loop(len(latencies), pairs, time.perf_counter() - started, latencies, refused)


async def paired_calls(
    senders: Mapping[str, Callable[[Case], Awaitable[Answer]]], work: list[Case], *, count: int
) -> dict[str, float]:
    """One caller, the doors alternating call by call (gRPC then HTTP, then HTTP then gRPC):
    both calls of a pair meet the same moment of the shared machine. Each call's cost at its
    door is the client's time less the call's own (admission to the engine's answer, which
    the server reports on both doors), so the reranker's run-to-run noise, larger than
    the doors' costs, drops out; the median of the pairs' differences is HTTP's extra cost."""
    took: dict[str, list[float]] = {"grpc": [], "http": []}
    door: dict[str, list[float]] = {"grpc": [], "http": []}
    http_layer: list[float] = []  # the server's share of HTTP's door: total less call
    for number in range(count):
        case = work[number % len(work)]
        for transport in ("grpc", "http") if number % 2 == 0 else ("http", "grpc"):
            started = time.perf_counter()
            answer = await senders[transport](case)
            client_ms = (time.perf_counter() - started) * 1000
            took[transport].append(client_ms)
            door[transport].append(client_ms - answer.call_ms)
            if answer.server_ms is not None:
                http_layer.append(answer.server_ms - answer.call_ms)

    def median_difference(http: list[float], grpc: list[float]) -> float:
        return statistics.median(h - g for g, h in zip(grpc, http, strict=True))

    return {
        "calls_per_door": count,
        "grpc_p50_ms": statistics.median(took["grpc"]),
        "http_p50_ms": statistics.median(took["http"]),
        "http_minus_grpc_ms": median_difference(took["http"], took["grpc"]),
        "grpc_door_p50_ms": statistics.median(door["grpc"]),
        "http_door_p50_ms": statistics.median(door["http"]),
        "http_door_minus_grpc_door_ms": median_difference(door["http"], door["grpc"]),
        "http_server_layer_p50_ms": statistics.median(http_layer),
    }


async def measure(
    grpc_port: int, http_base: str, work: list[Case], args: argparse.Namespace
) -> tuple[list[Round], dict[str, float]]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]
    limits = httpx.Limits(max_connections=max(args.callers), max_keepalive_connections=None)
    client = httpx.AsyncClient(base_url=http_base, timeout=TIMEOUT_S, limits=limits)

    async def over_grpc(case: Case) -> Answer:
        try:
            reply = await stub.Rerank(
                rerank_request(case),
                # None by default, as the HTTP call has none: the same work on both doors.
                timeout=args.grpc_deadline_s,
            )
        except grpc.aio.AioRpcError as error:
            raise refusal(error) from error
        if reply.reranked_count != len(case.documents):
            raise RuntimeError(f"gRPC scored {reply.reranked_count} of {len(case.documents)}")
        return Answer(int(reply.reranked_count), call_ms=reply.timings.total_ms)

    async def over_http(case: Case) -> Answer:
        reply = await client.post(
            "/v2/rerank",
            json={"model": "bench", "query": case.query, "documents": case.documents,
                  "top_n": TOP_N},
        )  # fmt: skip
        if reply.status_code == 429:
            raise Refused(float(reply.headers.get("retry-after", "1")))
        reply.raise_for_status()
        if len(reply.json()["results"]) != TOP_N:
            raise RuntimeError(f"HTTP returned {reply.text[:200]}")
        timing = reply.headers["server-timing"]
        return Answer(
            len(case.documents),  # Cohere's shape: every document is scored
            call_ms=server_timing_ms(timing, "call"),
            server_ms=server_timing_ms(timing, "total"),
        )

    senders = {"grpc": over_grpc, "http": over_http}
    rounds: list[Round] = []
    try:
        for callers in args.callers:
            for warm in senders.values():  # connections and first-call costs, unmeasured
                await closed_loop(pairs_of(warm), work, callers=callers, seconds=2.0)
            for number in range(args.rounds):
                order = ["grpc", "http"] if number % 2 == 0 else ["http", "grpc"]
                for transport in order:
                    loop = await closed_loop(
                        pairs_of(senders[transport]), work, callers=callers, seconds=args.seconds
                    )
                    done = Round(
                        transport, callers, loop.calls, loop.pairs, loop.seconds,
                        statistics.median(loop.latencies) * 1000 if loop.latencies else 0.0,
                        loop.refused,
                    )  # fmt: skip
                    rounds.append(done)
                    print(
                        f"{transport:4} callers={callers} round {number + 1}: "
                        f"{done.pairs_per_second:.1f} pairs/s, p50 {done.latency_ms_p50:.0f} ms, "
                        f"{done.refused} refused and retried",
                        flush=True,
                    )
        paired = await paired_calls(senders, work, count=args.paired_calls)
    finally:
        await client.aclose()
        await channel.close()
    return rounds, paired


def summarize(rounds: list[Round]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for callers in sorted({r.callers for r in rounds}):
        by = {
            transport: [r for r in rounds if r.callers == callers and r.transport == transport]
            for transport in ("grpc", "http")
        }
        rate = {
            transport: sum(r.pairs for r in items) / sum(r.seconds for r in items)
            for transport, items in by.items()
        }
        paired = [
            h.pairs_per_second / g.pairs_per_second
            for g, h in zip(by["grpc"], by["http"], strict=True)
        ]
        summary[str(callers)] = {
            "grpc_pairs_per_s": rate["grpc"],
            "http_pairs_per_s": rate["http"],
            "http_over_grpc": rate["http"] / rate["grpc"],
            "per_round_ratios": paired,
            "grpc_p50_ms": statistics.median(r.latency_ms_p50 for r in by["grpc"]),
            "http_p50_ms": statistics.median(r.latency_ms_p50 for r in by["http"]),
            "grpc_refused": sum(r.refused for r in by["grpc"]),
            "http_refused": sum(r.refused for r in by["http"]),
        }
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| callers | gRPC pairs/s | HTTP pairs/s | HTTP / gRPC | per round | p50 gRPC / HTTP ms "
        "| refused gRPC / HTTP |",
        "|---|---|---|---|---|---|---|",
    ]
    for callers, row in summary.items():
        rounds = ", ".join(f"{ratio:.3f}" for ratio in row["per_round_ratios"])
        lines.append(
            f"| {callers} | {row['grpc_pairs_per_s']:.1f} | {row['http_pairs_per_s']:.1f} | "
            f"**{row['http_over_grpc']:.3f}** | {rounds} | "
            f"{row['grpc_p50_ms']:.0f} / {row['http_p50_ms']:.0f} | "
            f"{row['grpc_refused']} / {row['http_refused']} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker", type=Path, default=Path("artifacts/cross-encoder"))
    parser.add_argument("--documents", type=int, default=50, help="documents per Rerank")
    parser.add_argument(
        "--words", type=int, default=0, help="cut each passage to this many words (0: whole)"
    )
    parser.add_argument("--topics", type=int, default=20, help="distinct requests, cycled")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=15.0, help="per round")
    parser.add_argument("--rounds", type=int, default=4, help="per transport (alternating)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--paired-calls", type=int, default=40, help="calls per door, alternating one by one"
    )
    parser.add_argument(
        "--grpc-deadline-s", type=float, default=None,
        help="give each gRPC call this client deadline (the HTTP calls have none)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/http_overhead.json"))
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        args.callers, args.seconds, args.rounds, args.topics = [1], 1.0, 2, 2
        args.paired_calls = 2
    work = cases(args.topics, args.documents, words=args.words)
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "server.log"
        command = [
            sys.executable, "-m", "tandem.cli", "serve", "--port", "0", "--metrics-port", "-1",
            "--http-port", "0", "--collection", str(Path(folder) / "collection"),
            "--bi-encoder", str(args.bi_encoder), "--reranker", str(args.reranker),
            "--threads", str(args.threads),
        ]  # fmt: skip
        server = Process(command, log, '"msg": "serving"')
        try:
            rounds, paired = asyncio.run(measure(server.port, http_address(server), work, args))
        finally:
            server.stop()
    summary = summarize(rounds)
    out = {
        "machine": machine(),
        "commit": git_commit(),
        "command": " ".join(sys.argv),
        "documents": args.documents,
        "words": args.words,
        "summary": summary,
        "paired_calls": paired,
        "rounds": [asdict(r) | {"pairs_per_second": r.pairs_per_second} for r in rounds],
    }
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(table(summary))
    print(
        f"1 caller, doors alternating call by call ({paired['calls_per_door']:.0f} each): p50 "
        f"gRPC {paired['grpc_p50_ms']:.1f} ms, HTTP {paired['http_p50_ms']:.1f} ms; HTTP's "
        f"extra cost per call (median of the pairs' differences): "
        f"{paired['http_minus_grpc_ms']:.1f} ms. Around the call's own work (client time "
        f"less the server's call time), p50 gRPC {paired['grpc_door_p50_ms']:.2f} ms, HTTP "
        f"{paired['http_door_p50_ms']:.2f} ms (of which the server's HTTP layer "
        f"{paired['http_server_layer_p50_ms']:.2f} ms); HTTP's extra fixed cost (median of the "
        f"pairs' differences): {paired['http_door_minus_grpc_door_ms']:.2f} ms"
    )
    return 0
