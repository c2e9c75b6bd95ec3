"""`tandem bench filters`: what a metadata filter costs stage 1, and what it keeps.

A RAG client filters by tenant, date, language or tag, and expects the K nearest documents
that match, not the matches among the K nearest (what searching then filtering gives). This
copies a built collection (``make demo``'s 6,011 RAG24 segments), gives every document seeded
synthetic metadata (one tenant of 1,000, a year of 30, a language, tags) by rewriting the
copy's metadata column (the vectors and texts stay as built), and runs each RAG24 topic
through the Searcher, retrieve-only, without a filter and with each filter of ``FILTERS``,
interleaved, so drift in the machine's speed hits all alike. Per filter:

- how many documents match;
- stage 1's latency (the reply's ``search`` timing: index, filter, reading the documents),
  dense and hybrid, p50 and p95, and the p50's ratio to the unfiltered search's in this run;
- Recall@K of the dense filtered top K against the exact top K among the matches (float32
  cosine over every stored passage, each document by its best), beside the unfiltered
  index's own Recall@K against exact search;
- what searching K unfiltered and then filtering keeps: hits left, and its Recall@K;
- counting the matches in the store (``keys_matching``, which a selective filter runs): SQL
  narrowing against a Python check of every row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from tandem.benchmarks.encoders import machine

if TYPE_CHECKING:
    from tandem.server.engine.filters import MetadataFilter

TENANTS = 1000
YEARS = (1995, 2025)  # [first, end)
LANGUAGES = {"en": 0.5, "de": 0.3, "fr": 0.2}
TAGS = ("faq", "howto", "news", "legal")  # each on a document with probability 1/4

FILTERS: dict[str, dict[str, Any]] = {
    "lang en": {"lang": "en"},
    "lang not en": {"lang": {"$ne": "en"}},
    "tag legal": {"tags": "legal"},
    "year >= 2022": {"year": {"$gte": 2022}},
    "lang de, year >= 2015": {"lang": "de", "year": {"$gte": 2015}},
    "year 2024": {"year": 2024},
    "10 tenants": {"tenant": {"$in": [f"t{i:03d}" for i in range(0, 1000, 100)]}},
    "tenant or year": {"$or": [{"tenant": "t007"}, {"year": {"$lt": 1996}}]},
    "1 tenant": {"tenant": "t042"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collection", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument(
        "--reranker",
        type=Path,
        default=Path("artifacts/cross-encoder"),
        help="the collection's reranker (its tokenizer opens the collection)",
    )
    parser.add_argument("--work", type=Path, default=Path(".cache/bench-filters"))
    parser.add_argument("--recall-k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scans", type=int, default=20, help="timed keys_matching runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/filters.json"))
    parser.add_argument("--smoke", action="store_true", help="8 topics, K 20")


def synthetic_metadata(count: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    languages = list(LANGUAGES)
    return [
        {
            "tenant": f"t{int(rng.integers(TENANTS)):03d}",
            "year": int(rng.integers(*YEARS)),
            "lang": languages[int(rng.choice(len(languages), p=list(LANGUAGES.values())))],
            "tags": [tag for tag in TAGS if rng.random() < 0.25],
        }
        for _ in range(count)
    ]


def copy_with_metadata(source: Path, folder: Path, seed: int) -> dict[str, dict[str, Any]]:
    """``source`` copied to ``folder``, every document given ``synthetic_metadata`` in key
    order; the metadata by document id."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(source, folder)
    db = sqlite3.connect(folder / "documents.sqlite")
    try:
        rows = db.execute("SELECT key, id FROM documents ORDER BY key").fetchall()
        metadata = synthetic_metadata(len(rows), seed)
        with db:
            db.executemany(
                "UPDATE documents SET metadata = ? WHERE key = ?",
                [(json.dumps(m), key) for (key, _), m in zip(rows, metadata, strict=True)],
            )
    finally:
        db.close()
    return {doc_id: m for (_, doc_id), m in zip(rows, metadata, strict=True)}


def exact_rankings(
    queries: NDArray[np.float32], vectors: NDArray[np.float32], owners: NDArray[np.int64],
    ids: Sequence[str], allowed: NDArray[np.bool_], depth: int,
) -> list[list[str]]:  # fmt: skip
    """Per query, the ``depth`` documents of ``allowed`` nearest by their best passage."""
    similarities = queries @ vectors.T
    best = np.full((len(queries), len(ids)), -np.inf, dtype=np.float32)
    np.maximum.at(best.T, owners, similarities.T)
    best[:, ~allowed] = -np.inf
    order = np.argsort(-best, axis=1, kind="stable")[:, :depth]
    return [[ids[i] for i in row if np.isfinite(best[q, i])] for q, row in enumerate(order)]


def recall(found: Sequence[str], exact: Sequence[str]) -> float:
    return len(set(found) & set(exact)) / len(exact) if exact else 1.0


def percentile(values: Sequence[float], fraction: float) -> float:
    return float(np.percentile(np.asarray(values), fraction * 100))


def median_ms(run: Callable[[], object], times: int) -> float:
    taken = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        taken.append((time.perf_counter() - started) * 1000)
    return statistics.median(taken)


def main(args: argparse.Namespace) -> int:
    from tandem import rag24
    from tandem.encoders import BiEncoder
    from tandem.server.engine.collection import Collection
    from tandem.server.engine.pairs import PairTokenizer
    from tandem.server.engine.store import document_keys

    topics = [(topic.id, topic.query) for topic in rag24.load().topics]
    depth = args.recall_k
    if args.smoke:
        topics, depth = topics[:8], 20
    folder = args.work / "collection"
    metadata = copy_with_metadata(args.collection, folder, args.seed)
    embedder = BiEncoder(args.bi_encoder, threads=args.threads)
    collection = Collection(
        folder, embedder=embedder, pairs=PairTokenizer.from_artifact(args.reranker)
    )
    try:
        store = collection.store
        key_ids = dict(store.db.execute("SELECT key, id FROM documents").fetchall())
        ids = list(metadata)
        position = {doc_id: i for i, doc_id in enumerate(ids)}
        batches = list(store.vectors(collection.index.ndim))
        passage_keys = np.concatenate([keys for keys, _ in batches])
        vectors = np.concatenate([batch for _, batch in batches])
        owners = np.array(
            [position[key_ids[int(key)]] for key in document_keys(passage_keys)], dtype=np.int64
        )
        queries = embedder.embed([q for _, q in topics], prompt=embedder.prompt(role="query"))
        parsed = {name: compiled(raw) for name, raw in FILTERS.items()}
        allowed = {
            name: np.array([wanted.matches(metadata[i]) for i in ids])
            for name, wanted in parsed.items()
        }
        allowed["none"] = np.ones(len(ids), dtype=bool)
        exact = {
            name: exact_rankings(queries, vectors, owners, ids, mask, depth)
            for name, mask in allowed.items()
        }
        measured = asyncio.run(searched(collection, embedder, topics, depth))
        scans = {
            name: {
                "narrowed_ms": median_ms(partial(store.keys_matching, wanted), args.scans),
                "every_row_ms": median_ms(partial(every_row, store.db, wanted), args.scans),
            }
            for name, wanted in parsed.items()
        }
    finally:
        collection.close()
    rows = summarize(measured, exact, metadata, parsed, allowed, scans)
    report = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "collection": str(args.collection),
        "bi_encoder": str(args.bi_encoder),
        "documents": len(ids),
        "passages": len(vectors),
        "topics": len(topics),
        "recall_k": depth,
        "seed": args.seed,
        "filters": {name: FILTERS.get(name) for name in rows},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    target = args.out.with_name("filters_smoke.json") if args.smoke else args.out
    target.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_table(rows, depth)
    print(f"wrote {target}")
    return 0


def compiled(raw: Mapping[str, Any]) -> MetadataFilter:
    from tandem.server.engine.filters import parse_filter

    wanted = parse_filter(raw)
    if wanted is None:
        raise ValueError(f"an empty filter measures nothing: {raw!r}")
    return wanted


def every_row(db: sqlite3.Connection, wanted: MetadataFilter) -> list[int]:
    rows = db.execute("SELECT key, metadata FROM documents")
    return [int(key) for key, raw in rows if wanted.matches(json.loads(raw))]


async def searched(
    collection: Any, embedder: Any, topics: Sequence[tuple[str, str]], depth: int
) -> dict[tuple[str, str], list[tuple[list[str], float]]]:
    """(filter, first stage) -> per topic: the hits' ids and the search timing (ms)."""
    from tandem.server.engine.fusion import FirstStage
    from tandem.server.engine.search import Mode, Searcher

    searcher = Searcher(collection, embedder=embedder, reranker=None, pairs=None, batcher=None)
    stages = (FirstStage.DENSE, FirstStage.HYBRID)
    cases: list[tuple[str, Mapping[str, Any] | None]] = [("none", None), *FILTERS.items()]
    out: dict[tuple[str, str], list[tuple[list[str], float]]] = {
        (name, stage.value): [] for name, _ in cases for stage in stages
    }
    for _, query in topics[:3]:  # warm: the query cache, the store's pages, the index
        for _, raw in cases:
            await searcher.search(query, mode=Mode.RETRIEVE_ONLY, metadata_filter=raw)
    for _, query in topics:
        for name, raw in cases:
            for stage in stages:
                result = await searcher.search(
                    query, recall_k=depth, top_n=depth, mode=Mode.RETRIEVE_ONLY,
                    include_text=False, first_stage=stage, metadata_filter=raw,
                )  # fmt: skip
                out[(name, stage.value)].append(
                    ([hit.id for hit in result.hits], result.timings_ms["search"])
                )
    return out


def summarize(
    measured: Mapping[tuple[str, str], list[tuple[list[str], float]]],
    exact: Mapping[str, list[list[str]]],
    metadata: Mapping[str, Mapping[str, Any]],
    parsed: Mapping[str, MetadataFilter],
    allowed: Mapping[str, NDArray[np.bool_]],
    scans: Mapping[str, Mapping[str, float]],
) -> dict[str, dict[str, Any]]:
    def p50(name: str, stage: str) -> float:
        return percentile([ms for _, ms in measured[(name, stage)]], 0.5)

    rows: dict[str, dict[str, Any]] = {}
    unfiltered = measured[("none", "dense")]
    for name in ["none", *FILTERS]:
        dense = measured[(name, "dense")]
        row: dict[str, Any] = {"matching": int(allowed[name].sum())}
        for stage in ("dense", "hybrid"):
            times = [ms for _, ms in measured[(name, stage)]]
            row[stage] = {
                "p50_ms": round(p50(name, stage), 3),
                "p95_ms": round(percentile(times, 0.95), 3),
                "p50_ratio": round(p50(name, stage) / p50("none", stage), 2),
            }
        row["dense"]["recall"] = round(
            statistics.fmean(
                recall(hits, truth) for (hits, _), truth in zip(dense, exact[name], strict=True)
            ),
            4,
        )
        if name != "none":
            wanted = parsed[name]
            kept = [[i for i in hits if wanted.matches(metadata[i])] for hits, _ in unfiltered]
            row["post_filter"] = {
                "hits": round(statistics.fmean(len(hits) for hits in kept), 1),
                "recall": round(
                    statistics.fmean(
                        recall(hits, truth) for hits, truth in zip(kept, exact[name], strict=True)
                    ),
                    4,
                ),
            }
            row["count_matches"] = {key: round(ms, 3) for key, ms in scans[name].items()}
        rows[name] = row
    return rows


def print_table(rows: Mapping[str, Mapping[str, Any]], depth: int) -> None:
    print(
        f"| filter | matching | dense p50 ms (x none) | hybrid p50 ms (x none) | dense R@{depth} "
        f"| post-filter hits, R@{depth} | count matches: SQL / every row (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        dense, hybrid = row["dense"], row["hybrid"]
        post, count = row.get("post_filter"), row.get("count_matches")
        kept = f"{post['hits']:.1f}, {post['recall']:.3f}" if post else ""
        scan = f"{count['narrowed_ms']:.2f} / {count['every_row_ms']:.2f}" if count else ""
        print(
            f"| {name} | {row['matching']} | {dense['p50_ms']:.2f} ({dense['p50_ratio']:.2f}) "
            f"| {hybrid['p50_ms']:.2f} ({hybrid['p50_ratio']:.2f}) | {dense['recall']:.3f} "
            f"| {kept} | {scan} |"
        )
