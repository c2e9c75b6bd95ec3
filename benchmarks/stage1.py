"""`tandem bench stage1`: dense, lexical and hybrid first stages on TREC RAG 2024.

Corpus: the 6,011 segments of the ``ir_axioms==1.2.5`` sdist; queries: its 301 topics;
judgements: UMBRELA (all topics) and NIST (where a topic has them), kept for the segments in
the corpus (a judged segment outside it can be found by no system). The topics are split in
two by ``--seed``: the fusion parameters (RRF k, the lexical weight) are chosen on the first
half, by the mean of nDCG@10 and Recall@recall_k under UMBRELA, and every figure reported as
held-out comes from the second half, with a paired randomization test of hybrid against
dense over its topics.

Each first stage is measured alone (nDCG@10, MRR@10, Recall@recall_k) and followed by the
reranker over all its candidates with no budget (the pool of the three stages is scored
once). Stage-1 latency is the in-process search at concurrency 1 (query embedding included,
no query cache); the index sizes are the files on disk. The stand-in reranker is not a
quality model: its rows test the mechanics, and a real reranker's would differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tandem.benchmarks.encoders import machine
from tandem.benchmarks.quality import index_corpus
from tandem.relevance import Qrels, judged, means, paired_test, per_query
from tandem.server.engine.fusion import FirstStage, Fusion, fuse_ids

Rankings = dict[str, list[str]]  # topic -> document ids, best first
RRF_KS = (10, 20, 40, 60, 100, 200)
LEXICAL_WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def fuse(dense: Rankings, lexical: Rankings, fusion: Fusion, depth: int) -> Rankings:
    return {topic: fuse_ids(dense[topic], lexical[topic], fusion, depth=depth) for topic in dense}


def choose_fusion(
    dense: Rankings, lexical: Rankings, qrels: Qrels, topics: Sequence[str], *, relevant: int,
    depth: int,
) -> tuple[Fusion, list[dict[str, Any]]]:  # fmt: skip
    """The grid point with the best mean of nDCG@10 and Recall@depth on ``topics``."""
    grid: list[dict[str, Any]] = []
    for k in RRF_KS:
        for weight in LEXICAL_WEIGHTS:
            fusion = Fusion(dense_weight=1.0, lexical_weight=weight, k=k)
            fused = fuse(dense, lexical, fusion, depth)
            scores = means(per_query(fused, fused, qrels, topics, relevant=relevant, depth=depth))
            objective = (scores["ndcg@10"] + scores[f"recall@{depth}"]) / 2
            grid.append({"fusion": asdict(fusion), **scores, "objective": objective})
    best = max(grid, key=lambda point: point["objective"])
    return Fusion(**best["fusion"]), grid


def reranked(rankings: Rankings, scores: Mapping[str, Mapping[str, float]]) -> Rankings:
    return {
        topic: sorted(ids, key=lambda d, t=topic: -scores[t][d])  # type: ignore[misc]
        for topic, ids in rankings.items()
    }


def percentile(values: Sequence[float], fraction: float) -> float:
    return float(np.percentile(values, fraction * 100)) if values else 0.0


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker", type=Path, default=Path("artifacts/cross-encoder"))
    parser.add_argument("--work", type=Path, default=Path("artifacts/bench/stage1"))
    parser.add_argument("--recall-k", type=int, default=100)
    parser.add_argument("--relevant-grade", type=int, default=2, help="binary relevance cut")
    parser.add_argument("--seed", type=int, default=0, help="the split of the topics")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-rerank", action="store_true", help="first stages only")
    parser.add_argument(
        "--passages",
        type=int,
        default=64,
        help="passages embedded per segment past the bi-encoder's window (the collection's "
        "max_passages); 1: one vector each, as collections were built before passages",
    )
    parser.add_argument(
        "--baseline-bi-encoder",
        type=Path,
        help="another bi-encoder export (the same model without prompts, a stock one against "
        "a fine-tuned one): its dense stage is run too, and compared with a paired test",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stage1.json"))
    parser.add_argument("--smoke", action="store_true", help="200 segments, 8 topics")


def main(args: argparse.Namespace) -> int:
    from tandem import rag24

    data = rag24.load()
    corpus = [(segment.id, segment.text) for segment in data.segments]
    topics = [(topic.id, topic.query) for topic in data.topics]
    folder = args.work / f"rag24-{args.passages}"
    if args.smoke:
        corpus, topics, args.recall_k = corpus[:200], topics[:8], 20
        folder = args.work / f"smoke-{args.passages}"
    order = [topic_id for topic_id, _ in topics]
    random.Random(args.seed).shuffle(order)
    fit, held_out = order[: len(order) // 2], order[len(order) // 2 :]
    measured = asyncio.run(run_stages(args, folder, corpus, topics))
    dense, lexical = measured["dense"], measured["lexical"]
    depth, relevant = args.recall_k, args.relevant_grade
    # Judged segments outside the corpus can be found by no system: they would only scale
    # every recall down alike (and the ideal DCG up). Judgements are kept for the corpus.
    present = {doc for doc, _ in corpus}
    judgements = {
        source: {
            t: {d: g for d, g in grades.items() if d in present} for t, grades in qrels.items()
        }
        for source, qrels in (("umbrela", data.umbrela), ("nist", data.nist))
    }
    fusion, grid = choose_fusion(
        dense, lexical, judgements["umbrela"], fit, relevant=relevant, depth=depth
    )
    # The offline fusion must be the server's: its default hybrid, fused here, is the same.
    served_matches = fuse(dense, lexical, Fusion(), depth) == measured["hybrid"]
    systems = {
        "dense": dense,
        "lexical": lexical,
        "hybrid": fuse(dense, lexical, fusion, depth),
        "hybrid_rrf60": fuse(dense, lexical, Fusion(), depth),
    }

    def scored(
        final: Rankings, pool: Rankings, qrels: Qrels, ids: Sequence[str]
    ) -> dict[str, list[float]]:
        return per_query(final, pool, qrels, ids, relevant=relevant, depth=depth)

    alone = {
        split: {
            source: {name: means(scored(r, r, qrels, ids)) for name, r in systems.items()}
            for source, qrels in judgements.items()
        }
        for split, ids in (("held_out", held_out), ("all", order))
    }

    def compared(before: Rankings, after: Rankings) -> dict[str, dict[str, Any]]:
        """Paired tests of ``after`` against ``before`` on the held-out topics."""
        return {
            source: {
                measure: paired_test(
                    scored(before, before, qrels, held_out)[measure],
                    scored(after, after, qrels, held_out)[measure],
                )
                for measure in ("ndcg@10", f"recall@{depth}")
            }
            for source, qrels in judgements.items()
        }

    hybrid = systems["hybrid"]
    tests = compared(dense, hybrid)
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "bi_encoder": str(args.bi_encoder),
        "reranker": str(args.reranker),
        "corpus": len(corpus),
        "max_passages": args.passages,
        "vectors": measured["vectors"],
        "topics": {"all": len(order), "fit": len(fit), "held_out": len(held_out)},
        "judged_topics": {
            source: {
                split: len(judged(qrels, ids, relevant=relevant))
                for split, ids in (("all", order), ("fit", fit), ("held_out", held_out))
            }
            for source, qrels in judgements.items()
        },
        "recall_k": depth,
        "relevant_grade": relevant,
        "fusion_chosen": asdict(fusion),
        "served_hybrid_matches_offline_fusion": served_matches,
        "fusion_grid": grid,
        "alone": alone,
        "hybrid_vs_dense_held_out": tests,
        "latency_ms": measured["latency"],
        "index_bytes": measured["sizes"],
    }
    if args.baseline_bi_encoder is not None:
        report["baseline"] = baseline_rankings(args, folder, corpus, topics)
        baseline_dense = report["baseline"].pop("dense")
        report["dense_vs_baseline_held_out"] = compared(baseline_dense, dense)
        report["baseline"]["dense_held_out"] = {
            source: means(scored(baseline_dense, baseline_dense, qrels, held_out))
            for source, qrels in judgements.items()
        }
    if not args.no_rerank:
        scores = asyncio.run(rerank_pools(args, folder, topics, systems, held_out))
        after = {name: reranked({t: r[t] for t in held_out}, scores) for name, r in systems.items()}
        report["reranked_held_out"] = {
            source: {
                name: means(scored(after[name], systems[name], qrels, held_out)) for name in systems
            }
            for source, qrels in judgements.items()
        }
        report["reranked_hybrid_vs_dense_held_out"] = {
            source: paired_test(
                scored(after["dense"], dense, qrels, held_out)["ndcg@10"],
                scored(after["hybrid"], hybrid, qrels, held_out)["ndcg@10"],
            )
            for source, qrels in judgements.items()
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    target = args.out.with_name("stage1_smoke.json") if args.smoke else args.out
    target.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    shown = {key: report[key] for key in ("fusion_chosen", "latency_ms", "index_bytes")}
    shown["held_out_umbrela"] = alone["held_out"]["umbrela"]
    shown["hybrid_vs_dense_held_out_umbrela"] = tests["umbrela"]
    if "baseline" in report:
        shown["baseline_dense_held_out_umbrela"] = report["baseline"]["dense_held_out"]["umbrela"]
        shown["dense_vs_baseline_held_out_umbrela"] = report["dense_vs_baseline_held_out"][
            "umbrela"
        ]
    if "reranked_held_out" in report:
        shown["reranked_held_out_umbrela"] = report["reranked_held_out"]["umbrela"]
    print(json.dumps(shown, indent=2))
    print(f"wrote {target}")
    return 0


def baseline_rankings(
    args: argparse.Namespace, folder: Path, corpus: Sequence[tuple[str, str]],
    topics: Sequence[tuple[str, str]],
) -> dict[str, Any]:  # fmt: skip
    """The baseline bi-encoder's dense rankings, from a collection of its own."""
    baseline = argparse.Namespace(**{**vars(args), "bi_encoder": args.baseline_bi_encoder})
    measured = asyncio.run(run_stages(baseline, folder.with_name(f"baseline-{folder.name}"),
                                      corpus, topics))  # fmt: skip
    return {
        "bi_encoder": str(args.baseline_bi_encoder),
        "vectors": measured["vectors"],
        "dense": measured["dense"],
    }


async def run_stages(
    args: argparse.Namespace, folder: Path, corpus: Sequence[tuple[str, str]],
    topics: Sequence[tuple[str, str]],
) -> dict[str, Any]:  # fmt: skip
    """Each side's ranking per topic, each first stage's latency, and the index sizes."""
    from tandem.encoders import BiEncoder
    from tandem.server.engine.collection import Collection
    from tandem.server.engine.pairs import PairTokenizer
    from tandem.server.engine.search import Mode, Searcher

    embedder = BiEncoder(args.bi_encoder, threads=args.threads)
    pairs = PairTokenizer.from_artifact(args.reranker)
    settings = {"max_passages": args.passages}
    collection = Collection(folder, embedder=embedder, pairs=pairs, settings=settings)
    try:
        index_corpus(collection, corpus)
        collection.checkpoint()
        searcher = Searcher(
            collection, embedder=embedder, reranker=None, pairs=None, batcher=None, cache_size=0
        )
        stages = (FirstStage.DENSE, FirstStage.LEXICAL, FirstStage.HYBRID)
        rankings: dict[str, Rankings] = {stage.value: {} for stage in stages}
        latency: dict[str, list[float]] = {stage.value: [] for stage in stages}
        for warm in topics[:5]:
            for stage in stages:
                await searcher.search(warm[1], mode=Mode.RETRIEVE_ONLY, first_stage=stage)
        for topic_id, query in topics:
            for stage in stages:  # interleaved, so drift in the machine's speed hits all
                started = time.perf_counter()
                result = await searcher.search(
                    query, recall_k=args.recall_k, top_n=args.recall_k, mode=Mode.RETRIEVE_ONLY,
                    include_text=False, first_stage=stage,
                )  # fmt: skip
                latency[stage.value].append((time.perf_counter() - started) * 1000)
                rankings[stage.value][topic_id] = [hit.id for hit in result.hits]
        vectors = len(collection.index)
        sizes = {
            "vectors.usearch": folder_bytes(collection.paths.index),
            "lexical": folder_bytes(collection.paths.lexical),
            "documents.sqlite": sum(
                folder_bytes(path) for path in collection.paths.folder.glob("documents.sqlite*")
            ),
        }
    finally:
        collection.close()
    return {
        "vectors": vectors,
        "dense": rankings["dense"],
        "lexical": rankings["lexical"],
        "hybrid": rankings["hybrid"],
        "latency": {
            stage: {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}
            for stage, values in latency.items()
        },
        "sizes": sizes,
    }


async def rerank_pools(
    args: argparse.Namespace, folder: Path, topics: Sequence[tuple[str, str]],
    systems: Mapping[str, Rankings], held_out: Sequence[str],
) -> dict[str, dict[str, float]]:  # fmt: skip
    """The reranker's score of every candidate any system returned, per held-out topic."""
    from tandem.encoders import BiEncoder, CrossEncoder
    from tandem.server.engine.batcher import RerankBatcher
    from tandem.server.engine.collection import Collection
    from tandem.server.engine.pairs import PairTokenizer
    from tandem.server.engine.search import DocumentRef, Searcher, make_runner

    embedder = BiEncoder(args.bi_encoder, threads=args.threads)
    reranker = CrossEncoder(args.reranker, threads=args.threads)
    pairs = PairTokenizer.for_reranker(reranker)
    collection = Collection(folder, embedder=embedder, pairs=pairs, read_only=True)
    batcher = RerankBatcher(make_runner(reranker))
    await batcher.start()
    searcher = Searcher(
        collection, embedder=embedder, reranker=reranker, pairs=pairs, batcher=batcher
    )
    queries = dict(topics)
    scores: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    try:
        for number, topic in enumerate(held_out, start=1):
            pool = list(dict.fromkeys(d for ranking in systems.values() for d in ranking[topic]))
            result = await searcher.rerank(
                queries[topic], [DocumentRef(id=d) for d in pool], budget_s=None,
                include_text=False,
            )  # fmt: skip
            scores[topic] = {hit.id: float(hit.score) for hit in result.hits}
            print(
                f"\rreranked {number}/{len(held_out)} topics "
                f"({time.perf_counter() - started:.0f} s)", end="", file=sys.stderr, flush=True,
            )  # fmt: skip
        print(file=sys.stderr)
    finally:
        await batcher.stop()
        collection.close()
    return scores
