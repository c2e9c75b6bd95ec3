"""Batcher overhead: pairs/s through the rerank batcher against the bare session, in one run.

8 concurrent requests of 50 candidates each (real RAG24 queries and segments, ~110 tokens a
pair), no deadline. The bare run does the same work (join stored ids, pad, run the session in
batches of 16) in a plain loop. Rounds alternate between the two.

    python -m tandem.benchmarks.batcher
    python -m tandem.benchmarks.batcher --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandem import rag24
from tandem.benchmarks.encoders import (
    DEFAULT_RERANKER,
    ensure_artifact,
    fixed_length_pairs,
    machine,
)
from tandem.encoders import CrossEncoder
from tandem.server.engine.batcher import BatchLimits, RerankBatcher
from tandem.server.engine.pairs import JoinedPair, PairTokenizer, pad_pairs
from tandem.server.engine.search import make_runner


def requests(
    data: rag24.Rag24, pairs: PairTokenizer, folder: Path, *, count: int, candidates: int
) -> list[list[JoinedPair]]:
    raw = fixed_length_pairs(data, folder, count * candidates)
    joined = []
    for request in range(count):
        chunk = raw[request * candidates : (request + 1) * candidates]
        query = pairs.tokenize([chunk[0][0]])[0]
        joined.append(pairs.join(query, pairs.tokenize([doc for _, doc in chunk])))
    return joined


def bare(reranker: CrossEncoder, batches: Sequence[Sequence[JoinedPair]], size: int) -> float:
    started = time.perf_counter()
    for request in batches:
        for start in range(0, len(request), size):
            reranker.forward(pad_pairs(request[start : start + size], pad_id=reranker.pad_id))
    return time.perf_counter() - started


async def through_batcher(batcher: RerankBatcher, batches: Sequence[Sequence[JoinedPair]]) -> float:
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(batcher.score(request, budget=None) for request in batches))
    elapsed = time.perf_counter() - started
    assert all(outcome.scored.all() for outcome in outcomes)
    return elapsed


async def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = ensure_artifact(
        args.artifacts / "cross-encoder-int8", "cross-encoder", args.reranker, "int8"
    )
    reranker = CrossEncoder(folder, threads=args.threads)
    pairs = PairTokenizer.for_reranker(reranker)
    data = rag24.load()
    work = requests(data, pairs, folder, count=args.concurrency, candidates=args.candidates)
    total = sum(len(request) for request in work)
    batcher = RerankBatcher(make_runner(reranker), limits=BatchLimits())
    await batcher.start()
    try:
        bare(reranker, work[:1], 16)  # warm-up
        await through_batcher(batcher, work[:1])
        bare_s, batched_s = [], []
        for _ in range(args.repeats):
            bare_s.append(bare(reranker, work, 16))
            batched_s.append(await through_batcher(batcher, work))
    finally:
        await batcher.stop()
    bare_rate = total / statistics.median(bare_s)
    batched_rate = total / statistics.median(batched_s)
    return {
        "machine": machine(),
        "threads": args.threads,
        "requests": args.concurrency,
        "candidates": args.candidates,
        "bare_pairs_per_s": round(bare_rate, 1),
        "batcher_pairs_per_s": round(batched_rate, 1),
        "ratio": round(batched_rate / bare_rate, 3),
        "batches_run": batcher.batches_run,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--reranker", default=str(DEFAULT_RERANKER))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="2 requests of 8, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.candidates, args.repeats = 2, 8, 1
    result = asyncio.run(run(args))
    print(
        f"{result['requests']} concurrent requests x {result['candidates']} candidates: "
        f"bare session {result['bare_pairs_per_s']} pairs/s, through the batcher "
        f"{result['batcher_pairs_per_s']} pairs/s ({result['ratio']:.1%})"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
