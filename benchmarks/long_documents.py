"""`tandem bench long_documents`: whole documents from RAG24, read by their first window or all.

RAG24's segments come from MS MARCO v2.1 documents, and a segment's id is its document's id,
``#``, and its position. Joining each document's segments in order gives the long-document
collection (3,957 documents from 6,011 segments); a document's grade for a topic is its best
segment's. Topics are split as ``tandem bench stage1`` splits them (``--seed``), and figures
come from the held-out half, over the topics with a relevant document longer than one
reranker window (the only ones where reading past the first window can change anything).

Measured, per system (stage 1 is dense: the vector index, where passages differ):
- stage 1 over whole documents as served: one vector of each document's first window
  (``--max-passages 1``, how every collection was embedded before passages), or up to
  ``--passages`` overlapping passages of it, the document found by its best (the default);
  and RAG24's own segments indexed apart, each document ranked by its best segment (passages
  cut where MS MARCO's segmenter cut them): nDCG@10 and Recall@recall_k;
- the reranker over the first ``--depth`` documents of the first two with no deadline,
  reading each document's first window only (``max_chunks_per_doc`` 1) or up to
  ``--windows`` windows (MaxP): nDCG@10, Recall@recall_k (unchanged by reranking), with
  paired tests;
- within the default 100 ms budget, in process at concurrency 1: latency, documents reranked
  and windows scored of ``--depth`` candidates.
The stand-in reranker is not a quality model (and trained on about two thirds of RAG24's
topics): its rows test the mechanics, and a real reranker's would differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tandem import rag24
from tandem.benchmarks.encoders import machine
from tandem.benchmarks.quality import index_corpus
from tandem.benchmarks.serving import git_commit
from tandem.relevance import means, paired_test, per_query

Rankings = dict[str, list[str]]


def document_id(segment_id: str) -> str:
    return segment_id.split("#", 1)[0]


def segment_position(segment_id: str) -> int:
    return int(segment_id.split("#", 1)[1].split("_", 1)[0])


def long_documents(data: rag24.Rag24) -> dict[str, str]:
    """Each document's segments, in order, joined into one text."""
    parts: dict[str, list[tuple[int, str]]] = {}
    for segment in data.segments:
        parts.setdefault(document_id(segment.id), []).append(
            (segment_position(segment.id), segment.text)
        )
    return {doc: "\n".join(text for _, text in sorted(found)) for doc, found in parts.items()}


def document_grades(qrels: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """A document's grade for a topic: its best segment's."""
    grades: dict[str, dict[str, int]] = {}
    for topic, judged in qrels.items():
        for segment, grade in judged.items():
            doc = document_id(segment)
            topic_grades = grades.setdefault(topic, {})
            topic_grades[doc] = max(grade, topic_grades.get(doc, 0))
    return grades


def best_passage_first(segments: Sequence[str], limit: int) -> list[str]:
    """Documents in the order of their best segment."""
    return list(dict.fromkeys(document_id(segment) for segment in segments))[:limit]


def smoke_documents(
    data: rag24.Rag24, grades: Mapping[str, Mapping[str, int]], held_out: set[str], relevant: int
) -> set[str]:
    """60 documents: those judged for the first held-out topics with a relevant document of
    three segments or more (longer than one window), relevant ones first."""
    segments: dict[str, int] = {}
    for segment in data.segments:
        segments[document_id(segment.id)] = segments.get(document_id(segment.id), 0) + 1
    keep: list[str] = []
    for topic in sorted(held_out):
        judged = grades.get(topic, {})
        if not any(g >= relevant and segments.get(d, 0) >= 3 for d, g in judged.items()):
            continue
        ranked = sorted((d for d in judged if d in segments), key=lambda d: -judged[d])
        keep.extend(d for d in ranked if d not in keep)
        if len(keep) >= 60:
            break
    return set(keep[:60])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker", type=Path, default=Path("artifacts/cross-encoder"))
    parser.add_argument("--work", type=Path, default=Path("artifacts/bench/long_documents"))
    parser.add_argument("--recall-k", type=int, default=100)
    parser.add_argument("--depth", type=int, default=20, help="documents reranked per topic")
    parser.add_argument("--windows", type=int, default=10, help="MaxP: windows per document")
    parser.add_argument(
        "--passages", type=int, default=64, help="index time: passages embedded per document"
    )
    parser.add_argument("--topics", type=int, default=40, help="held-out topics measured")
    parser.add_argument("--budget-topics", type=int, default=20, help="topics timed in budget")
    parser.add_argument("--budget-ms", type=int, default=100)
    parser.add_argument(
        "--budget-depth", type=int, help="candidates per call timed in budget; default: --depth"
    )
    parser.add_argument("--relevant-grade", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the split of the topics")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/long_documents.json"))
    parser.add_argument("--smoke", action="store_true", help="a few documents and topics")


def main(args: argparse.Namespace) -> int:
    data = rag24.load()
    documents = long_documents(data)
    # Judged segments of documents outside the corpus can be found by no system: they would
    # only scale every recall down alike (as tandem bench stage1 keeps them out too).
    present = {segment.id for segment in data.segments}
    grades = document_grades(
        {t: {s: g for s, g in judged.items() if s in present} for t, judged in data.umbrela.items()}
    )
    segments = [(segment.id, segment.text) for segment in data.segments]
    order = [topic.id for topic in data.topics]
    random.Random(args.seed).shuffle(order)
    held_out = set(order[len(order) // 2 :])
    queries = {topic.id: topic.query for topic in data.topics}
    if args.smoke:
        keep = smoke_documents(data, grades, held_out, args.relevant_grade)
        documents = {doc: text for doc, text in documents.items() if doc in keep}
        segments = [(sid, text) for sid, text in segments if document_id(sid) in keep]
        args.topics, args.budget_topics, args.depth, args.recall_k = 3, 2, 4, 10
    report = asyncio.run(measure(args, documents, segments, grades, held_out, queries))
    report.update(machine=machine(), commit=git_commit(), command=" ".join(sys.argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    target = args.out.with_name("long_documents_smoke.json") if args.smoke else args.out
    target.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "per_topic"}, indent=2))
    print(f"wrote {target}")
    return 0


async def measure(
    args: argparse.Namespace,
    documents: Mapping[str, str],
    segments: Sequence[tuple[str, str]],
    grades: Mapping[str, Mapping[str, int]],
    held_out: set[str],
    queries: Mapping[str, str],
) -> dict[str, Any]:
    from tandem.encoders import BiEncoder, CrossEncoder
    from tandem.server.engine.batcher import RerankBatcher
    from tandem.server.engine.collection import Collection
    from tandem.server.engine.pairs import PairTokenizer
    from tandem.server.engine.search import DocumentRef, Mode, Searcher, make_runner
    from tandem.server.engine.windows import Reading

    embedder = BiEncoder(args.bi_encoder, threads=args.threads)
    reranker = CrossEncoder(args.reranker, threads=args.threads)
    pairs = PairTokenizer.for_reranker(reranker)
    tag = "smoke" if args.smoke else "rag24"

    def collection(name: str, max_passages: int) -> Collection:
        folder = args.work / f"{tag}-{name}-{max_passages}"
        settings = {"max_passages": max_passages}
        return Collection(folder, embedder=embedder, pairs=pairs, settings=settings)

    corpora = {
        "first_window": (collection("documents", 1), list(documents.items())),
        "passages": (collection("documents", args.passages), list(documents.items())),
        "segments": (collection("segments", args.passages), list(segments)),
    }
    batcher = RerankBatcher(make_runner(reranker))
    await batcher.start()
    try:
        indexed = {}
        for name, (store, corpus) in corpora.items():
            started = time.perf_counter()
            index_corpus(store, corpus)
            indexed[name] = {
                "vectors": len(store.index),
                "documents": len(store.store),
                "seconds": time.perf_counter() - started,  # 0 where the work folder had it
            }
        # The one window a document's pair holds (a RAG24 query is ~10 tokens).
        window = pairs.template.max_length - pairs.template.specials - 12
        tokens = pairs.tokenize_whole(list(documents.values()))
        long = {doc for doc, ids in zip(documents, tokens, strict=True) if len(ids) > window}
        relevant = args.relevant_grade
        topics = [
            topic
            for topic in sorted(held_out)
            if any(g >= relevant and d in long for d, g in grades.get(topic, {}).items())
            and any(d in documents for d in grades.get(topic, {}))
        ][: args.topics]
        searchers = {}
        for name, (store, _) in corpora.items():
            searchers[name] = Searcher(
                store, embedder=embedder, reranker=reranker, pairs=pairs, batcher=batcher,
                cache_size=0,
            )  # fmt: skip
        stage1: dict[str, Rankings] = {name: {} for name in corpora}
        for topic in topics:
            for name, searcher in searchers.items():
                # Segments are ranked apart: enough of them for recall_k documents (three
                # segments a document on average).
                count = args.recall_k * (3 if name == "segments" else 1)
                found = await searcher.search(
                    queries[topic], recall_k=count, top_n=count, mode=Mode.RETRIEVE_ONLY,
                    include_text=False,
                )  # fmt: skip
                stage1[name][topic] = best_passage_first(
                    [hit.id for hit in found.hits], args.recall_k
                )
        readings = {"first_window": Reading(max_windows=1), "maxp": Reading(args.windows)}
        systems: dict[str, Rankings] = {f"stage1_{k}": v for k, v in stage1.items()}
        started = time.perf_counter()
        reader = searchers["passages"]
        for source in ("first_window", "passages"):
            for name, reading in readings.items():
                reranked: Rankings = {}
                for topic in topics:
                    head = stage1[source][topic][: args.depth]
                    result = await reader.rerank(
                        queries[topic], [DocumentRef(id=doc) for doc in head], budget_s=None,
                        include_text=False, reading=reading,
                    )  # fmt: skip
                    rest = stage1[source][topic][args.depth :]
                    reranked[topic] = [hit.id for hit in result.hits] + rest
                systems[f"{source}_{name}"] = reranked
                print(
                    f"  reranked {source}/{name} ({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
        budgeted = {
            name: await in_budget(reader, stage1["passages"], topics, queries, args, r)
            for name, r in readings.items()
        }
    finally:
        await batcher.stop()
        for store, _ in corpora.values():
            store.close()

    depth = args.recall_k
    scores = {
        name: per_query(ranking, ranking, grades, topics, relevant=relevant, depth=depth)
        for name, ranking in systems.items()
    }
    long_relevant = [
        sum(1 for d, g in grades[t].items() if g >= relevant and d in long) for t in topics
    ]
    return {
        "reranker": str(args.reranker),
        "bi_encoder": str(args.bi_encoder),
        "documents": len(documents),
        "segments": len(segments),
        "documents_past_one_window": len(long),
        "window_tokens": window,
        "windows": args.windows,
        "max_passages": args.passages,
        "overlap": Reading().overlap,
        "depth": args.depth,
        "recall_k": depth,
        "relevant_grade": relevant,
        "topics": len(topics),
        "relevant_long_documents_per_topic": float(np.mean(long_relevant)) if topics else 0.0,
        "held_out": {name: means(values) for name, values in scores.items()},
        "tests": {
            "stage1_passages_vs_first_window": paired_test(
                scores["stage1_first_window"]["ndcg@10"], scores["stage1_passages"]["ndcg@10"]
            ),
            "stage1_passages_vs_first_window_recall": paired_test(
                scores["stage1_first_window"][f"recall@{depth}"],
                scores["stage1_passages"][f"recall@{depth}"],
            ),
            "stage1_segments_vs_passages": paired_test(
                scores["stage1_passages"]["ndcg@10"], scores["stage1_segments"]["ndcg@10"]
            ),
            "maxp_vs_first_window_same_candidates": paired_test(
                scores["passages_first_window"]["ndcg@10"], scores["passages_maxp"]["ndcg@10"]
            ),
            "passages_maxp_vs_first_window_first_window": paired_test(
                scores["first_window_first_window"]["ndcg@10"],
                scores["passages_maxp"]["ndcg@10"],
            ),
        },
        "indexed": indexed,
        "in_budget": budgeted,
    }


async def in_budget(
    searcher: Any,
    ranking: Rankings,
    topics: Sequence[str],
    queries: Mapping[str, str],
    args: argparse.Namespace,
    reading: Any,
) -> dict[str, float]:
    """Latency, documents reranked and windows scored of ``--depth`` candidates within the
    budget, in process, one call at a time."""
    from tandem.server.engine.search import DocumentRef

    latencies, reranked, windows, tokenize = [], [], [], []
    depth = args.budget_depth or args.depth
    for topic in topics[: args.budget_topics]:
        head = ranking[topic][:depth]
        started = time.perf_counter()
        result = await searcher.rerank(
            queries[topic], [DocumentRef(id=doc) for doc in head],
            budget_s=args.budget_ms / 1000, include_text=False, reading=reading, top_n=None,
        )  # fmt: skip
        latencies.append((time.perf_counter() - started) * 1000)
        reranked.append(result.reranked_count)
        windows.append(sum(hit.passage.windows_scored for hit in result.hits if hit.passage))
        tokenize.append(result.timings_ms.get("tokenize", 0.0))
    if not latencies:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "documents_reranked": 0.0, "windows_scored": 0.0,
                "tokenize_ms": 0.0, "of_documents": depth}  # fmt: skip
    return {
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "documents_reranked": float(np.mean(reranked)),
        "windows_scored": float(np.mean(windows)),
        # The pairs lane's share: the query, and any stored document whose ids were cut.
        "tokenize_ms": float(np.mean(tokenize)),
        "of_documents": depth,
    }
