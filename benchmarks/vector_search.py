"""Candidate search: Tandem's usearch index against numpy brute force, at 100k and 1M vectors.

Vectors are random unit vectors in 384 dimensions (the bi-encoder's width): structureless
data, the hard case for a graph index. Recall@k is measured against exact f32 search.

    python -m benchmarks.vector_search                 # 100k and 1M (the 1M build takes ~15 min)
    python -m benchmarks.vector_search --sizes 20000 --queries 50   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from server.index import IndexSettings, VectorIndex

DIM = 384


def unit_vectors(count: int, seed: int) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def brute_force(
    corpus: NDArray[np.float32], query: NDArray[np.float32], k: int
) -> NDArray[np.intp]:
    similarities = corpus @ query  # stays float32: both operands are float32
    top = np.argpartition(-similarities, k)[:k]
    return top[np.argsort(-similarities[top])]


def build(corpus: NDArray[np.float32], settings: IndexSettings) -> tuple[VectorIndex, float]:
    index = VectorIndex(DIM, settings)
    keys = np.arange(len(corpus), dtype=np.uint64)
    started = time.perf_counter()
    step = 50_000
    for start in range(0, len(corpus), step):
        index.add(keys[start : start + step], corpus[start : start + step])
        done = min(start + step, len(corpus))
        rate = done / (time.perf_counter() - started)
        print(f"\r  built {done}/{len(corpus)} ({rate:,.0f} vectors/s)", end="", file=sys.stderr)
    print(file=sys.stderr)
    return index, time.perf_counter() - started


def measure(size: int, *, queries: int, k: int, dtype: str, efs: Sequence[int]) -> dict[str, Any]:
    corpus = unit_vectors(size, seed=1)
    probes = unit_vectors(queries, seed=2)
    exact: list[NDArray[np.intp]] = []
    brute_ms = []
    for probe in probes:
        started = time.perf_counter()
        exact.append(brute_force(corpus, probe, k))
        brute_ms.append((time.perf_counter() - started) * 1000)
    index, build_s = build(corpus, IndexSettings(dtype=dtype, exact_below=0))  # type: ignore[arg-type]
    rows = []
    for ef in efs:
        index.index.expansion_search = ef  # type: ignore[misc]
        latencies, recalls = [], []
        for probe, truth in zip(probes, exact, strict=True):
            started = time.perf_counter()
            hits = index.search(probe, k)
            latencies.append((time.perf_counter() - started) * 1000)
            recalls.append(len(set(hits.keys.tolist()) & set(truth.tolist())) / k)
        rows.append(
            {
                "method": f"usearch HNSW {dtype}, ef={ef}",
                "p50_ms": round(statistics.median(latencies), 3),
                "p99_ms": round(percentile(latencies, 0.99), 3),
                "recall": round(float(np.mean(recalls)), 4),
            }
        )
    rows.append(
        {
            "method": "numpy brute force f32",
            "p50_ms": round(statistics.median(brute_ms), 3),
            "p99_ms": round(percentile(brute_ms, 0.99), 3),
            "recall": 1.0,
        }
    )
    return {
        "size": size,
        "k": k,
        "queries": queries,
        "build_s": round(build_s, 1),
        "memory_mib": round(index.index.memory_usage / 2**20, 1),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--dtype", default="i8", choices=("i8", "f16", "f32"))
    parser.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    args = parser.parse_args(argv)
    results = []
    for size in args.sizes:
        print(f"{size:,} vectors:", file=sys.stderr)
        result = measure(size, queries=args.queries, k=args.k, dtype=args.dtype, efs=args.ef)
        results.append(result)
        print(render(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['size']:,} vectors, k={result['k']}, {result['queries']} single queries; "
        f"build {result['build_s']} s, index {result['memory_mib']} MiB",
        "",
        "| method | p50 ms | p99 ms | recall@k |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {row['method']} | {row['p50_ms']} | {row['p99_ms']} | {row['recall']} |"
        for row in result["rows"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
