"""`tandem bench dimensions`: what cutting a bi-encoder's vectors to a prefix costs in ranking.

Before a user serves (or stores) ``dimensions=N``, they want to know what the prefix loses for
their model. This embeds RAG24's 6,011 segments (passages as a collection embeds them, with
the document prompt) and its 301 topics (with the query prompt) once, cuts every vector to
each size (``tandem.matryoshka.truncated``, the cut Embed serves) and ranks the segments by
cosine, each segment by its best passage, twice: exact in float32, and by usearch's exact scan
of its i8 vectors (the index's default dtype, a quarter of f32's bytes). Reported per size and
dtype, over every judged topic: nDCG@10 and Recall@recall_k under UMBRELA and NIST, each with a
paired test against the full f32 vector, and the bytes a vector takes. So the two ways to
shrink an index compare at equal bytes (384 components in i8 against 96 in f32).

Exact search on purpose: the HNSW graph's own recall is ``tandem bench stage1``'s; this
isolates the vector.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tandem.benchmarks.encoders import machine
from tandem.matryoshka import truncated
from tandem.relevance import Qrels, means, paired_test, per_query

Rankings = dict[str, list[str]]
SIZES = (256, 192, 128, 96, 64, 32)
DTYPES = {"f32": 4, "i8": 1}  # bytes a component takes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, SIZES)),
        help="prefix sizes to measure, separated by commas (the full size is always measured)",
    )
    parser.add_argument("--recall-k", type=int, default=100)
    parser.add_argument("--relevant-grade", type=int, default=2, help="binary relevance cut")
    parser.add_argument("--passages", type=int, default=64, help="the collection's max_passages")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dimensions.json"))
    parser.add_argument("--smoke", action="store_true", help="200 segments, 8 topics")


def prefix_sizes(dimension: int, wanted: Sequence[int]) -> list[int]:
    """The sizes of ``wanted`` below ``dimension``, largest first, after the full one."""
    return [dimension, *sorted({size for size in wanted if 0 < size < dimension}, reverse=True)]


def ranked(
    queries: NDArray[np.float32], passages: NDArray[np.float32], owners: NDArray[np.int64],
    ids: list[str], topic_ids: list[str], depth: int, dtype: str,
) -> Rankings:  # fmt: skip
    """Segments per topic by their best passage's cosine, best first: in float32, or as
    usearch scores its ``dtype`` vectors (an exact scan, no graph)."""
    if dtype == "f32":
        similarities = queries @ passages.T
    else:
        from usearch.index import Index

        index = Index(ndim=passages.shape[1], metric="cos", dtype=dtype)
        index.add(np.arange(len(passages), dtype=np.uint64), passages)
        matches = index.search(queries, len(passages), exact=True)
        counts = np.asarray(getattr(matches, "counts", [len(matches.keys)]))
        if not (counts == len(passages)).all():
            raise RuntimeError("usearch's exact scan returned fewer passages than it holds")
        similarities = np.full((len(queries), len(passages)), -np.inf, dtype=np.float32)
        rows = np.arange(len(queries))[:, None]
        keys = np.asarray(matches.keys, dtype=np.int64)
        similarities[rows, keys] = 1.0 - np.asarray(matches.distances, dtype=np.float32)
    best = np.full((len(queries), len(ids)), -np.inf, dtype=np.float32)
    np.maximum.at(best.T, owners, similarities.T)
    order = np.argsort(-best, axis=1, kind="stable")[:, :depth]
    return {topic: [ids[i] for i in row] for topic, row in zip(topic_ids, order, strict=True)}


def main(args: argparse.Namespace) -> int:
    from tandem import rag24
    from tandem.encoders import BiEncoder
    from tandem.server.engine.index import IndexSettings

    data = rag24.load()
    segments = [(segment.id, segment.text) for segment in data.segments]
    topics = [(topic.id, topic.query) for topic in data.topics]
    depth = args.recall_k
    if args.smoke:
        segments, topics, depth = segments[:200], topics[:8], 20
    embedder = BiEncoder(args.bi_encoder, threads=args.threads)
    started = time.perf_counter()
    encoded = embedder.encode_passages(
        [text for _, text in segments],
        max_passages=args.passages,
        overlap=IndexSettings().passage_overlap,
        prompt=embedder.prompt(role="document"),
    )
    owners = np.concatenate(
        [np.full(len(group), i, dtype=np.int64) for i, group in enumerate(encoded.passages)]
    )
    passages = np.concatenate(encoded.passages)
    queries = embedder.embed([query for _, query in topics], prompt=embedder.prompt(role="query"))
    embed_s = time.perf_counter() - started
    ids = [segment_id for segment_id, _ in segments]
    topic_ids = [topic_id for topic_id, _ in topics]
    present = set(ids)
    judgements = {
        source: {
            t: {d: g for d, g in grades.items() if d in present} for t, grades in qrels.items()
        }
        for source, qrels in (("umbrela", data.umbrela), ("nist", data.nist))
    }
    sizes = prefix_sizes(embedder.dimension, [int(part) for part in args.sizes.split(",")])
    rankings: dict[tuple[int, str], Rankings] = {}
    for size in sizes:
        cut_queries = truncated(queries, size, normalize=True)
        cut_passages = truncated(passages, size, normalize=True)
        for dtype in DTYPES:
            rankings[(size, dtype)] = ranked(
                cut_queries, cut_passages, owners, ids, topic_ids, depth, dtype
            )
    full = rankings[(embedder.dimension, "f32")]
    measures = ("ndcg@10", f"recall@{depth}")

    def scored(ranking: Rankings, qrels: Qrels) -> dict[str, list[float]]:
        return per_query(
            ranking, ranking, qrels, topic_ids, relevant=args.relevant_grade, depth=depth
        )

    rows: list[dict[str, Any]] = []
    for (size, dtype), ranking in rankings.items():
        row: dict[str, Any] = {"dimensions": size, "dtype": dtype, "bytes": size * DTYPES[dtype]}
        for source, qrels in judgements.items():
            cut, baseline = scored(ranking, qrels), scored(full, qrels)
            row[source] = {
                **means(cut),
                "against_full_f32": {m: paired_test(baseline[m], cut[m]) for m in measures},
            }
        rows.append(row)
    report = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "bi_encoder": str(args.bi_encoder),
        "source": embedder.manifest.source,
        "matryoshka": embedder.matryoshka is not None,
        "segments": len(ids),
        "passages": len(passages),
        "topics": len(topic_ids),
        "recall_k": depth,
        "relevant_grade": args.relevant_grade,
        "embed_seconds": round(embed_s, 1),
        "sizes": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    target = args.out.with_name("dimensions_smoke.json") if args.smoke else args.out
    target.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"| dims | dtype | bytes | nDCG@10 | Δ (p) | Recall@{depth} | Δ (p) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        umbrela = row["umbrela"]
        cells = []
        for measure in measures:
            test = umbrela["against_full_f32"][measure]
            cells += [f"{umbrela[measure]:.3f}",
                      f"{test['mean_difference']:+.3f} ({test['p_value']:.2g})"]  # fmt: skip
        print(f"| {row['dimensions']} | {row['dtype']} | {row['bytes']} | "
              + " | ".join(cells) + " |")  # fmt: skip
    if not args.smoke:
        plot(report, target.with_suffix(".png"))
    print(f"wrote {target}")
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    """Quality against bytes a vector, per dtype: the prefix's cost beside i8's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = report["recall_k"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, measure in zip(axes, ("ndcg@10", f"recall@{depth}"), strict=True):
        for dtype in DTYPES:
            rows = sorted(
                (row for row in report["sizes"] if row["dtype"] == dtype),
                key=lambda row: row["bytes"],
            )
            points = [row["bytes"] for row in rows], [row["umbrela"][measure] for row in rows]
            axis.plot(*points, marker="o", label=dtype)
            for row, x, y in zip(rows, *points, strict=True):
                axis.annotate(str(row["dimensions"]), (x, y), textcoords="offset points",
                              xytext=(4, -10), fontsize=7)  # fmt: skip
        axis.set_xscale("log", base=2)
        axis.set_xlabel("bytes a vector (log scale); labels: components kept")
        judged = report["sizes"][0]["umbrela"]["against_full_f32"][measure]["n"]
        axis.set_ylabel(f"{measure} (UMBRELA, {judged} judged topics)")
        axis.legend(fontsize=8, loc="lower right")
    machine = report["machine"]
    figure.suptitle(
        f"{'/'.join(Path(report['source']).parts[-2:])}: prefix size and dtype, exact search "
        "on RAG24 "
        f"({machine['cpu']}, {machine['commit']})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
