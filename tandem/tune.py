"""`tandem tune`: how deep stage 1 must reach on your own queries, and what that depth costs.

For a sample of queries it retrieves deep (500 by default) with the dense and the lexical
index, reranks every candidate once with no budget, and takes the reranker's top_n over that
whole pool as the reference. Then, for each recall_k and each first stage (hybrid is fused
from each side's first recall_k, as the server does), it reports:

- agreement: the share of the reference top_n that reranking only those candidates returns;
- nDCG@10 of that reranked list and Recall@recall_k of the candidates, where qrels are given;
- the rerank time that many candidates cost here (from this machine's ms per pair).

It recommends the smallest recall_k, and a budget, that keep the agreement target, and writes
a table (Markdown and JSON) and a plot. Everything runs in this process, read-only: a server
may keep serving the collection meanwhile (on a busy machine, the timings count its load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tandem.relevance import Qrels, judged, ndcg_at, read_qrels, read_queries, recall_at
from tandem.server.engine.fusion import FirstStage, Fusion, fuse_ids
from tandem.server.settings import Settings

DEPTHS = (10, 20, 30, 50, 75, 100, 150, 200, 300, 500)


class TuneError(Exception):
    """Input the tool cannot use: a missing file, an empty sample, a depth past the pool."""


@dataclass(frozen=True)
class QueryRun:
    """One query, measured: each side's deep ranking (document ids, best first), the rerank
    score of every document in either, and what the stages cost."""

    query_id: str
    dense: list[str]
    lexical: list[str]
    scores: dict[str, float]
    rerank_ms_per_pair: float
    stage1_ms: dict[str, float]  # by first stage, at the deep recall_k


@dataclass(frozen=True)
class Row:
    first_stage: str
    recall_k: int
    agreement: float  # mean share of the reference top_n kept
    full_agreement: float  # share of queries that keep all of it
    rerank_ms_p50: float
    rerank_ms_p95: float
    ndcg_at_10: float | None  # with qrels only
    recall: float | None  # Recall@recall_k of the candidates, with qrels only


@dataclass(frozen=True)
class Recommendation:
    first_stage: str
    recall_k: int
    agreement: float
    budget_ms: int


def top(scores: Mapping[str, float], candidates: Sequence[str], count: int) -> list[str]:
    """The reranker's best ``count`` of ``candidates``; ties keep stage-1 order."""
    order = sorted(range(len(candidates)), key=lambda i: (-scores[candidates[i]], i))
    return [candidates[i] for i in order[:count]]


def agreement(
    scores: Mapping[str, float], candidates: Sequence[str], reference: Sequence[str]
) -> float:
    """The share of ``reference`` (the deep top_n) that reranking ``candidates`` returns in
    its own top_n, of the same length; 1.0 when there is no reference at all."""
    if not reference:
        return 1.0
    return len(set(top(scores, candidates, len(reference))) & set(reference)) / len(reference)


def candidates(run: QueryRun, stage: FirstStage, depth: int, fusion: Fusion) -> list[str]:
    """What the server's first stage returns at ``recall_k=depth``."""
    if stage is FirstStage.DENSE:
        return run.dense[:depth]
    if stage is FirstStage.LEXICAL:
        return run.lexical[:depth]
    return fuse_ids(run.dense, run.lexical, fusion, depth=depth)


def reference(run: QueryRun, top_n: int) -> list[str]:
    """The reranker's top_n over the whole deep pool."""
    return top(run.scores, list(dict.fromkeys(run.dense + run.lexical)), top_n)


def summarize(
    runs: Sequence[QueryRun],
    *,
    stages: Sequence[FirstStage],
    depths: Sequence[int],
    top_n: int,
    fusion: Fusion,
    qrels: Qrels | None = None,
    relevant: int = 2,
) -> list[Row]:
    references = {run.query_id: reference(run, top_n) for run in runs}
    graded = (
        set(judged(qrels, [run.query_id for run in runs], relevant=relevant)) if qrels else set()
    )
    rows = []
    for stage in stages:
        for depth in depths:
            kept, ms, ndcg, recall = [], [], [], []
            for run in runs:
                pool = candidates(run, stage, depth, fusion)
                kept.append(agreement(run.scores, pool, references[run.query_id]))
                ms.append(len(pool) * run.rerank_ms_per_pair)
                if run.query_id in graded and qrels is not None:
                    grades = qrels[run.query_id]
                    ndcg.append(ndcg_at(top(run.scores, pool, 10), grades))
                    recall.append(recall_at(pool, grades, relevant=relevant, k=depth))
            rows.append(
                Row(
                    first_stage=stage.value,
                    recall_k=depth,
                    agreement=float(np.mean(kept)),
                    full_agreement=float(np.mean([share == 1.0 for share in kept])),
                    rerank_ms_p50=float(np.percentile(ms, 50)),
                    rerank_ms_p95=float(np.percentile(ms, 95)),
                    ndcg_at_10=float(np.mean(ndcg)) if ndcg else None,
                    recall=float(np.mean(recall)) if recall else None,
                )
            )
    return rows


def recommend(
    rows: Sequence[Row], runs: Sequence[QueryRun], *, target: float
) -> Recommendation | None:
    """The cheapest (first stage, recall_k) whose agreement reaches ``target``: the smallest
    recall_k, then the highest agreement. Its budget covers the 95th percentile of stage 1
    and of the rerank at that depth, rounded up to 5 ms."""
    passing = [row for row in rows if row.agreement >= target]
    if not passing:
        return None
    best = min(passing, key=lambda row: (row.recall_k, -row.agreement))
    stage1 = float(np.percentile([run.stage1_ms[best.first_stage] for run in runs], 95))
    budget = int(5 * math.ceil((stage1 + best.rerank_ms_p95) / 5))
    return Recommendation(best.first_stage, best.recall_k, best.agreement, budget)


def render(rows: Sequence[Row], choice: Recommendation | None, *, target: float, top_n: int) -> str:
    with_qrels = any(row.ndcg_at_10 is not None for row in rows)
    head = "| first stage | recall_k | agreement@top_n | all kept | rerank ms p50 / p95 |"
    rule = "|---|---:|---:|---:|---:|"
    if with_qrels:
        head += " nDCG@10 | Recall@recall_k |"
        rule += "---:|---:|"
    lines = [head, rule]
    for row in rows:
        line = (
            f"| {row.first_stage} | {row.recall_k} | {row.agreement:.3f} | "
            f"{row.full_agreement:.2f} | {row.rerank_ms_p50:.0f} / {row.rerank_ms_p95:.0f} |"
        )
        if with_qrels:
            line += f" {_number(row.ndcg_at_10)} | {_number(row.recall)} |"
        lines.append(line)
    lines.append("")
    if choice is None:
        lines.append(
            f"No recall_k tried keeps {target:.0%} of the deep top {top_n}: try deeper ones "
            "(--depths), or accept a lower --agreement."
        )
    else:
        lines.append(
            f"Recommended: --first-stage {choice.first_stage}, recall_k {choice.recall_k} "
            f"(keeps {choice.agreement:.1%} of the deep top {top_n}), rerank budget "
            f"{choice.budget_ms} ms (95th percentile of stage 1 and of the rerank, one query "
            "at a time: concurrent load queues on top)."
        )
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot(rows: Sequence[Row], path: Path, *, target: float, top_n: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    stages = list(dict.fromkeys(row.first_stage for row in rows))
    for stage in stages:
        mine = [row for row in rows if row.first_stage == stage]
        depths = [row.recall_k for row in mine]
        left.plot(depths, [row.agreement for row in mine], marker="o", label=stage)
    # Every first stage hands the reranker recall_k candidates: one cost curve serves all.
    first = [row for row in rows if row.first_stage == stages[0]]
    depths = [row.recall_k for row in first]
    right.plot(depths, [row.rerank_ms_p50 for row in first], marker="o", label="median")
    right.plot(depths, [row.rerank_ms_p95 for row in first], marker="o", label="95th percentile")
    left.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    left.set(xscale="log", xlabel="recall_k", ylabel=f"agreement with the deep top {top_n}")
    right.set(
        xscale="log", yscale="log", xlabel="recall_k",
        ylabel="rerank ms for recall_k candidates (any first stage)",
    )  # fmt: skip
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collection", type=Path, required=True, help="collection folder")
    parser.add_argument(
        "--queries",
        type=Path,
        required=True,
        help="id<TAB>query lines (TREC topics), JSON lines {id, query}, or a query per line",
    )
    parser.add_argument("--qrels", type=Path, help="TREC qrels: adds nDCG@10 and recall")
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker", type=Path, default=Path("artifacts/cross-encoder"))
    parser.add_argument("--sample", type=int, default=50, help="queries drawn (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="for the sample")
    parser.add_argument("--deep", type=int, default=500, help="the reference depth per side")
    parser.add_argument("--top-n", type=int, default=5, help="hits your application keeps")
    parser.add_argument(
        "--agreement", type=float, default=0.95, help="share of the deep top_n to keep"
    )
    parser.add_argument(
        "--depths",
        default=",".join(map(str, DEPTHS)),
        help="recall_k values to try (at most --deep)",
    )
    parser.add_argument("--first-stages", default="dense,lexical,hybrid", help="modes to compare")
    parser.add_argument("--relevant", type=int, default=2, help="grade that counts for recall")
    parser.add_argument("--max-tokens-per-doc", type=int, help="as the server's flag")
    # The server's own defaults, so that hybrid here is hybrid as served.
    parser.add_argument("--rrf-k", type=int, default=Settings.rrf_k)
    parser.add_argument("--dense-weight", type=float, default=Settings.dense_weight)
    parser.add_argument("--lexical-weight", type=float, default=Settings.lexical_weight)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("tune"), help="folder for the outputs")


def main(args: argparse.Namespace) -> int:
    try:
        depths = sorted({int(item) for item in args.depths.split(",") if item.strip()})
        stages = [FirstStage(item.strip()) for item in args.first_stages.split(",")]
    except ValueError as error:
        raise TuneError(f"--depths or --first-stages: {error}") from error
    if not depths or depths[0] < 1 or depths[-1] > args.deep:
        raise TuneError(f"--depths must be between 1 and --deep ({args.deep})")
    if not 0 < args.agreement <= 1:
        raise TuneError("--agreement must be in (0, 1]")
    queries = read_queries(args.queries)
    if 0 < args.sample < len(queries):
        queries = random.Random(args.seed).sample(queries, args.sample)
    qrels = read_qrels(args.qrels) if args.qrels else None
    fusion = Fusion(args.dense_weight, args.lexical_weight, args.rrf_k)
    runs, stored = asyncio.run(measure(args, queries, qrels))
    if qrels is not None:
        # A judged document the collection does not hold can be found at no depth: it would
        # only scale every recall down alike.
        qrels = {q: {d: g for d, g in grades.items() if d in stored} for q, grades in qrels.items()}
    rows = summarize(
        runs, stages=stages, depths=depths, top_n=args.top_n, fusion=fusion, qrels=qrels,
        relevant=args.relevant,
    )  # fmt: skip
    choice = recommend(rows, runs, target=args.agreement)
    table = render(rows, choice, target=args.agreement, top_n=args.top_n)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune.md").write_text(table, encoding="utf-8")
    report = {
        "command": " ".join(sys.argv),
        "queries": len(runs),
        "deep": args.deep,
        "top_n": args.top_n,
        "target": args.agreement,
        "fusion": asdict(fusion),
        "rows": [asdict(row) for row in rows],
        "recommendation": asdict(choice) if choice else None,
        "rerank_ms_per_pair_p50": float(np.median([run.rerank_ms_per_pair for run in runs])),
    }
    (args.out / "tune.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    try:
        plot(rows, args.out / "tune.png", target=args.agreement, top_n=args.top_n,
             title=f"{args.collection}: {len(runs)} queries, deep {args.deep}")  # fmt: skip
    except ImportError:
        print("no plot: matplotlib is missing (pip install 'tandem[bench]')", file=sys.stderr)
    print(f"wrote {args.out}/tune.md, tune.json and tune.png")
    return 0


async def measure(
    args: argparse.Namespace, queries: Sequence[tuple[str, str]], qrels: Qrels | None
) -> tuple[list[QueryRun], set[str]]:
    """Retrieves deep with each side and reranks the pool, one query at a time; also says
    which of the judged documents the collection holds."""
    from tandem.encoders import BiEncoder, CrossEncoder
    from tandem.server.engine.batcher import RerankBatcher
    from tandem.server.engine.collection import Collection
    from tandem.server.engine.pairs import PairTokenizer
    from tandem.server.engine.search import DocumentRef, Mode, Searcher, make_runner

    embedder = BiEncoder(args.bi_encoder, threads=args.threads)
    reranker = CrossEncoder(args.reranker, threads=args.threads)
    pairs = PairTokenizer.for_reranker(reranker)
    collection = Collection(args.collection, embedder=embedder, pairs=pairs, read_only=True)
    batcher = RerankBatcher(make_runner(reranker))
    await batcher.start()
    # No query cache: each first stage pays for its own embedding, as a new query does.
    searcher = Searcher(
        collection, embedder=embedder, reranker=reranker, pairs=pairs, batcher=batcher,
        cache_size=0,
    )  # fmt: skip
    runs = []
    try:
        judged_ids = sorted({doc for grades in (qrels or {}).values() for doc in grades})
        stored = set(collection.get(judged_ids))
        for number, (query_id, text) in enumerate(queries, start=1):
            ranked, stage1_ms = {}, {}
            for stage in (FirstStage.DENSE, FirstStage.LEXICAL, FirstStage.HYBRID):
                started = time.perf_counter()
                result = await searcher.search(
                    text, recall_k=args.deep, top_n=args.deep, mode=Mode.RETRIEVE_ONLY,
                    include_text=False, first_stage=stage,
                )  # fmt: skip
                stage1_ms[stage.value] = (time.perf_counter() - started) * 1000
                ranked[stage] = [hit.id for hit in result.hits]
            pool = list(dict.fromkeys(ranked[FirstStage.DENSE] + ranked[FirstStage.LEXICAL]))
            started = time.perf_counter()
            scored = await searcher.rerank(
                text, [DocumentRef(id=item) for item in pool], budget_s=None,
                include_text=False, max_tokens_per_doc=args.max_tokens_per_doc,
            )  # fmt: skip
            elapsed_ms = (time.perf_counter() - started) * 1000
            runs.append(
                QueryRun(
                    query_id=query_id,
                    dense=ranked[FirstStage.DENSE],
                    lexical=ranked[FirstStage.LEXICAL],
                    scores={hit.id: float(hit.score) for hit in scored.hits},
                    rerank_ms_per_pair=elapsed_ms / max(len(pool), 1),
                    stage1_ms=stage1_ms,
                )
            )
            print(
                f"\r{number}/{len(queries)} queries, {len(pool)} reranked in {elapsed_ms:.0f} ms",
                end="", file=sys.stderr, flush=True,
            )  # fmt: skip
        print(file=sys.stderr)
    finally:
        await batcher.stop()
        collection.close()
    if not runs:
        raise TuneError("no queries to measure")
    return runs, stored
