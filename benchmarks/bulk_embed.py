"""`tandem bench bulk_embed`: an indexing job's Embed calls beside a caller's Searches.

A RAG pipeline indexes through the OpenAI door: a few workers, each embedding batches of
passages with the official ``openai`` SDK and its default retries (two), while its users
search. Three phases per round, each ``--seconds`` long: one caller's budgeted ``Search``
calls (gRPC) alone; the same beside ``--workers`` embedding workers; the workers alone. The
figures: searches answered, their latency and depth, searches refused; embedding calls
answered, failed (refused past the SDK's retries) and texts embedded per second.

``--against DIR`` serves another checkout too (its ``tandem`` package first on
``PYTHONPATH``); rounds take the servers in turn, alternating which goes first, so a slow
spell of the shared machine falls on both: the before and after of a change, in one run.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from tandem import rag24
from tandem.benchmarks.against import add_server_arguments, commits, servers
from tandem.benchmarks.encoders import machine
from tandem.benchmarks.load import milliseconds_quantiles
from tandem.benchmarks.serving import http_address
from tandem.server.api.status import retry_delay_of
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

PHASES = ("search alone", "search beside embedding", "embedding alone")
COUNTS = ("searches_refused", "searches_failed", "embeds_answered", "embeds_failed")
RECALL_K = 100
TOP_N = 5


def passages(corpus: Path, count: int) -> list[str]:
    with gzip.open(corpus, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line, _ in zip(handle, range(count), strict=False)]


class Phase:
    """One phase against one server: a search caller and embedding workers until stopped."""

    def __init__(
        self, port: int, http: str, queries: list[str], texts: list[str], args: argparse.Namespace
    ) -> None:
        import openai

        self.openai = openai
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = tandem_pb2_grpc.RetrievalStub(self.channel)  # type: ignore[no-untyped-call]
        self.client = openai.OpenAI(base_url=f"{http}/v1", api_key="unused")
        self.queries, self.texts, self.args = queries, texts, args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.search_seconds: list[float] = []
        self.reranked: list[int] = []
        self.counts = dict.fromkeys(COUNTS, 0)

    def _count(self, name: str) -> None:
        with self.lock:
            self.counts[name] += 1

    def searches(self) -> None:
        for number in itertools.count():
            if self.stop.is_set():
                return
            query = self.queries[number % len(self.queries)]
            started = time.perf_counter()
            try:
                reply = self.stub.Search(
                    pb.SearchRequest(query=query, recall_k=RECALL_K, top_n=TOP_N), timeout=60
                )
            except grpc.RpcError as error:
                refused = error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                self._count("searches_refused" if refused else "searches_failed")
                time.sleep(retry_delay_of(error) or 0.1)
                continue
            self.search_seconds.append(time.perf_counter() - started)
            self.reranked.append(reply.reranked_count)

    def embeds(self, worker: int) -> None:
        batch, workers = self.args.batch, self.args.workers
        for number in itertools.count():
            if self.stop.is_set():
                return
            first = (number * workers + worker) * batch
            texts = [self.texts[(first + k) % len(self.texts)] for k in range(batch)]
            try:
                self.client.embeddings.create(model="tandem", input=texts)
                self._count("embeds_answered")
            except self.openai.APIError:  # refused (or cut off) past the SDK's own retries
                self._count("embeds_failed")

    def run(self, *, search: bool, workers: int) -> dict[str, Any]:
        threads = [threading.Thread(target=self.searches)] if search else []
        threads += [threading.Thread(target=self.embeds, args=(w,)) for w in range(workers)]
        for thread in threads:
            thread.start()
        time.sleep(self.args.seconds)
        self.stop.set()
        for thread in threads:
            thread.join()
        self.channel.close()
        self.client.close()
        seconds = self.args.seconds
        figures: dict[str, Any] = dict(self.counts)
        figures["texts_per_second"] = round(self.counts["embeds_answered"] * self.args.batch
                                            / seconds, 1)  # fmt: skip
        figures["searches_answered"] = len(self.search_seconds)
        if self.search_seconds:
            latency = milliseconds_quantiles(self.search_seconds)
            figures |= {f"search_{name}_ms": round(value, 1) for name, value in latency.items()}
            figures["reranked_mean"] = round(statistics.fmean(self.reranked), 2)
        return figures


def measure(
    servers: dict[str, tuple[int, str]], args: argparse.Namespace
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Each server's phases, round by round."""
    queries = [topic.query for topic in rag24.load().topics]
    texts = passages(args.corpus, 4 * args.batch * args.workers)
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {phase: [] for phase in PHASES} for name in servers
    }
    order = list(servers)
    for _ in range(args.rounds):
        for name in order:
            port, http = servers[name]
            for phase, search, workers in zip(
                PHASES, (True, True, False), (0, args.workers, args.workers), strict=True
            ):
                figures = Phase(port, http, queries, texts, args).run(
                    search=search, workers=workers
                )
                rounds[name][phase].append(figures)
                print(name, phase, figures, flush=True)
        order.reverse()
    return rounds


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over rounds, counts summed."""
    summed = ("searches_answered", *COUNTS)
    out: dict[str, float] = {name: sum(row[name] for row in rows) for name in summed}
    for name in ("search_p50_ms", "search_p90_ms", "search_p99_ms", "reranked_mean",
                 "texts_per_second"):  # fmt: skip
        values = [row[name] for row in rows if name in row]
        if values:
            out[name] = round(statistics.median(values), 2)
    return out


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| server | phase | searches answered / refused / failed | search p50 / p99 ms "
        "| reranked | embeds answered / failed | texts/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, phases in summary.items():
        for phase, row in phases.items():
            cells = [name, phase]
            if phase == "embedding alone":
                cells += ["-", "-", "-"]
            else:
                cells += [
                    f"{row['searches_answered']:.0f} / {row['searches_refused']:.0f} / "
                    f"{row['searches_failed']:.0f}",
                    f"{row.get('search_p50_ms', math.nan):.0f} / "
                    f"{row.get('search_p99_ms', math.nan):.0f}",
                    f"{row.get('reranked_mean', math.nan):.2f}",
                ]
            if phase == "search alone":
                cells += ["-", "-"]
            else:
                cells += [
                    f"{row['embeds_answered']:.0f} / {row['embeds_failed']:.0f}",
                    f"{row['texts_per_second']:.1f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(
        parser, collection=Path("artifacts/demo"),
        collection_help="a collection (make demo's) to copy for each server, for the searches",
    )  # fmt: skip
    parser.add_argument(
        "--corpus", type=Path, default=Path("artifacts/demo-corpus.jsonl.gz"),
        help="JSON lines with a text field: the passages the workers embed",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=4, help="embedding workers")
    parser.add_argument("--batch", type=int, default=32, help="texts per embedding call")
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bulk_embed.json"))
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        args.workers, args.batch, args.seconds, args.rounds = 2, 8, 2.0, 1
    with servers(args, extra=("--http-port", "0")) as started:
        addresses = {name: (s.port, http_address(s)) for name, s in started.items()}
        rounds = measure(addresses, args)
    summary = {
        name: {phase: summarize(rows) for phase, rows in phases.items()}
        for name, phases in rounds.items()
    }
    out = {
        "machine": machine(),
        "commits": commits(args),
        "command": " ".join(sys.argv),
        "workers": args.workers,
        "batch": args.batch,
        "seconds": args.seconds,
        "summary": summary,
        "rounds": rounds,
    }
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(table(summary))
    return 0
