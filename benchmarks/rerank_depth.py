"""`tandem bench rerank_depth`: how many candidates a budget scores, by how many a call offers.

A client with its own first stage sends its candidates' texts: a ``Rerank`` of 10 to ~900
RAG24 passages, a topic's own BM25 candidates first. With ``--collection`` (a copy served by
each server), a ``Search`` with ``recall_k`` of the same counts (to 1,000) too: its
candidates' ids are stored, so it tokenizes no document. Every call has the default 100 ms
budget and comes one at a time. The figures per count: candidates reranked, latency at the
client, and the server's own stage timings (tokenizing, waiting, scoring).

``--against DIR`` runs a second server from another checkout (its ``tandem`` package first
on ``PYTHONPATH``) beside this one, calls alternating between the two, so a slow spell of
the shared machine falls on both: the before and after of a change, in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import grpc

from tandem import rag24
from tandem.benchmarks.against import add_server_arguments, commits, servers
from tandem.benchmarks.encoders import machine
from tandem.benchmarks.load import milliseconds_quantiles
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

BUDGET_MS = 100
TOP_N = 10
MAX_RECALL_K = 1000  # the server's default max_recall_k
# gRPC's default 4 MiB receive limit holds ~900 RAG24 passages (about 1.2 MB); say more.
MESSAGE_BYTES = 64 * 1024 * 1024


def topics_with_passages(count: int, deepest: int) -> list[tuple[str, list[str]]]:
    """(query, passages): each topic's BM25 candidates over RAG24's segments, then the
    other topics' candidates, to ``deepest`` passages in all."""
    from tandem.export.texts import rerank_cases

    cases = rerank_cases(rag24.load(), queries=count, candidates=100, part="verify")
    pool = list(dict.fromkeys(text for case in cases for text in case.documents))
    out = []
    for case in cases:
        own = list(case.documents)
        taken = set(own)
        out.append((case.query, (own + [text for text in pool if text not in taken])[:deepest]))
    return out


def request(query: str, passages: list[str], budget_ms: int) -> pb.RerankRequest:
    return pb.RerankRequest(
        query=query,
        documents=[pb.RerankDocument(text=text) for text in passages],
        top_n=TOP_N,
        rerank_budget_ms=budget_ms,
    )


def search(query: str, recall_k: int, budget_ms: int) -> pb.SearchRequest:
    return pb.SearchRequest(query=query, recall_k=recall_k, top_n=TOP_N, rerank_budget_ms=budget_ms)


Calls = dict[str, dict[str, dict[str, list[dict[str, float]]]]]  # server, RPC, count: rows
Summary = dict[str, dict[str, dict[str, dict[str, float]]]]  # server, RPC, count: figures


async def measure(
    ports: dict[str, int], work: list[tuple[str, list[str]]], args: argparse.Namespace
) -> Calls:
    """Each server's calls by RPC and candidates offered: latency, reranked and the server's
    stages, per call."""
    options = [("grpc.max_send_message_length", MESSAGE_BYTES)]
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
                for name, port in ports.items()}  # fmt: skip
    stubs = {
        name: tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]
        for name, channel in channels.items()
    }
    calls: Calls = {name: {} for name in ports}
    try:
        for rpc in ["Rerank"] + (["Search"] if args.collection is not None else []):
            for sent in args.passages:
                if rpc == "Search" and sent > MAX_RECALL_K:
                    continue
                requests = [
                    request(query, passages[:sent], args.budget_ms)
                    if rpc == "Rerank"
                    else search(query, sent, args.budget_ms)
                    for query, passages in work
                ]
                for name in stubs:  # unmeasured: the first call of a shape pays its compile
                    await getattr(stubs[name], rpc)(requests[0])
                order = list(stubs)
                for call in range(args.calls):
                    order.reverse()  # alternate which server goes first
                    for name in order:
                        started = time.perf_counter()
                        reply = await getattr(stubs[name], rpc)(requests[call % len(requests)])
                        row = {field.name: value for field, value in reply.timings.ListFields()}
                        row["latency_ms"] = (time.perf_counter() - started) * 1000
                        row["reranked"] = float(reply.reranked_count)
                        calls[name].setdefault(rpc, {}).setdefault(str(sent), []).append(row)
    finally:
        for channel in channels.values():
            await channel.close()
    return calls


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    def median(name: str) -> float:
        return round(statistics.median(row.get(name, 0.0) for row in rows), 2)

    latency = milliseconds_quantiles([row["latency_ms"] / 1000 for row in rows])
    return {
        "calls": len(rows),
        "reranked_mean": round(statistics.fmean(row["reranked"] for row in rows), 2),
        "reranked_min": min(row["reranked"] for row in rows),
        "latency_p50_ms": round(latency["p50"], 2),
        "latency_p90_ms": round(latency["p90"], 2),
        "tokenize_p50_ms": median("tokenize_ms"),
        "queue_p50_ms": median("queue_ms"),
        "rerank_p50_ms": median("rerank_ms"),
    }


def table(rpc: str, summary: dict[str, dict[str, dict[str, float]]]) -> str:
    names = list(summary)
    offered = "passages sent" if rpc == "Rerank" else "recall_k"
    head = f"| {rpc}: {offered} | " + " | ".join(
        f"{name}: reranked (mean) | {name}: p50 ms | {name}: tokenize ms" for name in names
    )
    lines = [head + " |", "|---" * (1 + 3 * len(names)) + "|"]
    for sent in summary[names[0]]:
        cells = []
        for name in names:
            row = summary[name][sent]
            cells += [f"{row['reranked_mean']:.1f}", f"{row['latency_p50_ms']:.0f}",
                      f"{row['tokenize_p50_ms']:.1f}"]  # fmt: skip
        lines.append(f"| {sent} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: Summary, labels: dict[str, str], path: Path, *, budget_ms: int) -> None:
    """Reranked (mean) and p50 latency against candidates offered, per RPC and server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (depth, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for name, by_rpc in summary.items():
        for rpc, rows in by_rpc.items():
            offered = [int(sent) for sent in rows]
            style = "-" if rpc == "Rerank" else "--"
            label = f"{rpc}, {labels[name]}"
            depth.plot(offered, [r["reranked_mean"] for r in rows.values()], style, marker="o",
                       label=label)  # fmt: skip
            latency.plot(offered, [r["latency_p50_ms"] for r in rows.values()], style,
                         marker="o", label=label)  # fmt: skip
    latency.axhline(budget_ms, color="grey", linewidth=0.8, label=f"budget {budget_ms} ms")
    for axis in (depth, latency):
        axis.set_xscale("log")
        axis.set_xlabel("candidates offered (Rerank: passages sent; Search: recall_k)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    depth.set_ylabel("candidates reranked (mean)")
    latency.set_ylabel("latency p50 (ms)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(
        parser, collection=None,
        collection_help="a collection (make demo's) to copy for each server: Search is "
        "measured too",
    )  # fmt: skip
    parser.add_argument(
        "--passages", type=int, nargs="+", default=[10, 25, 50, 100, 200, 400, 890],
        help="passages per Rerank, one count after another",
    )  # fmt: skip
    parser.add_argument("--topics", type=int, default=20, help="RAG24 topics, cycled")
    parser.add_argument("--calls", type=int, default=20, help="calls per count and server")
    parser.add_argument("--budget-ms", type=int, default=BUDGET_MS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rerank_depth.json"))
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        args.passages, args.topics, args.calls = [3, 12], 2, 2
    work = topics_with_passages(args.topics, max(args.passages))
    with servers(args) as started:
        calls = asyncio.run(measure({name: s.port for name, s in started.items()}, work, args))
    summary: Summary = {
        name: {
            rpc: {sent: summarize(rows) for sent, rows in by_sent.items()}
            for rpc, by_sent in by_rpc.items()
        }
        for name, by_rpc in calls.items()
    }
    out = {
        "machine": machine(),
        "commits": commits(args),
        "command": " ".join(sys.argv),
        "budget_ms": args.budget_ms,
        "summary": summary,
        "calls": calls,
    }
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        labels = {name: f"{name} ({commit})" for name, commit in out["commits"].items()}
        plot(summary, labels, args.out.with_suffix(".png"), budget_ms=args.budget_ms)
    for rpc in summary["this"]:
        print(table(rpc, {name: by_rpc[rpc] for name, by_rpc in summary.items()}))
    return 0
