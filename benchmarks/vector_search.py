"""Candidate search: Tandem's usearch index against numpy brute force, at 100k and 1M vectors.

``--data real`` (default): all-MiniLM-L6-v2 embeddings of 142k real text snippets (single
sentences and adjacent sentence pairs of the RAG24 segments and the crowd's answers), queried
with the 301 RAG24 topics. Beyond the real count, each extra vector is a real one plus
Gaussian noise sized so that copy and seed have the cosine of a typical real nearest
neighbour; the table says how many vectors are real. ``--data random``: structureless unit
vectors, a worst case no embedding model produces. Recall@k is against exact f32 search.

    python -m tandem.benchmarks.vector_search    # 100k and 1M (the 1M build takes ~15 min)
    python -m tandem.benchmarks.vector_search --sizes 20000 --queries 50   # smoke
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tandem import rag24
from tandem.encoders import BiEncoder
from tandem.server.engine.index import IndexSettings, VectorIndex

DIM = 384
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def unit_vectors(count: int, seed: int) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def snippets(data: rag24.Rag24) -> list[str]:
    """Unique sentences and adjacent sentence pairs of the segments and the crowd's answers."""
    seen: dict[str, None] = {}
    for text in [segment.text for segment in data.segments] + rag24.response_texts():
        parts = [part.strip() for part in SENTENCE_END.split(text) if part.strip()]
        for position, part in enumerate(parts):
            for candidate in (part, " ".join(parts[position : position + 2])):
                if 20 <= len(candidate) <= 600:
                    seen.setdefault(candidate, None)
    return list(seen)


def real_vectors(artifacts: Path) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(snippet vectors, topic query vectors), embedded once and cached beside the artifact."""
    from tandem.benchmarks.encoders import ensure_artifact, packaged_minilm

    folder = ensure_artifact(artifacts / "bi-encoder-int8", "bi-encoder", packaged_minilm(), "int8")
    cache = folder.parent / "rag24-snippet-vectors.npz"
    if cache.is_file():
        stored = np.load(cache)
        return stored["corpus"], stored["queries"]
    data = rag24.load()
    encoder = BiEncoder(folder)
    texts = snippets(data)
    documents = encoder.prompt(role="document")
    print(f"embedding {len(texts):,} real snippets (cached afterwards)", file=sys.stderr)
    corpus = np.concatenate(
        [
            encoder.embed(texts[start : start + 4096], batch_size=64, prompt=documents)
            for start in range(0, len(texts), 4096)
        ]
    )
    queries = encoder.embed(
        [topic.query for topic in data.topics], prompt=encoder.prompt(role="query")
    )
    np.savez(cache, corpus=corpus, queries=queries)
    return corpus, queries


def expand(real: NDArray[np.float32], size: int, seed: int) -> NDArray[np.float32]:
    """``size`` vectors: the real ones (shuffled), then noisy copies of them."""
    rng = np.random.default_rng(seed)
    shuffled = real[rng.permutation(len(real))]
    if size <= len(shuffled):
        return shuffled[:size]
    sample = shuffled[:2000]
    nearest = np.sort(sample @ shuffled.T, axis=1)[:, -2]  # -1 is the vector itself
    cosine = float(np.median(nearest))
    sigma = np.float32(np.sqrt((1 / cosine**2 - 1) / DIM))
    extra = size - len(shuffled)
    seeds = shuffled[rng.integers(0, len(shuffled), extra)]
    copies = seeds + rng.standard_normal(seeds.shape, dtype=np.float32) * sigma
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    return np.concatenate([shuffled, copies])


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


def measure(
    size: int,
    *,
    data: tuple[NDArray[np.float32], NDArray[np.float32]] | None,
    queries: int,
    k: int,
    dtype: str,
    efs: Sequence[int],
) -> dict[str, Any]:
    if data is None:
        corpus, probes, real = unit_vectors(size, seed=1), unit_vectors(queries, seed=2), 0
    else:
        corpus, probes = expand(data[0], size, seed=1), data[1][:queries]
        real = min(size, len(data[0]))
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
        "real_vectors": real,
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
    parser.add_argument("--data", choices=("real", "random"), default="real")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    args = parser.parse_args(argv)
    vectors = real_vectors(args.artifacts) if args.data == "real" else None
    results = []
    for size in args.sizes:
        print(f"{size:,} vectors:", file=sys.stderr)
        result = measure(
            size, data=vectors, queries=args.queries, k=args.k, dtype=args.dtype, efs=args.ef
        )
        results.append(result)
        print(render(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['size']:,} vectors ({result['real_vectors']:,} real), k={result['k']}, "
        f"{result['queries']} single queries; "
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
