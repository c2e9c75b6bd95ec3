"""`tandem bench runtimes`: each CPU runtime's throughput and parity, in one run.

For every reranker artifact given (OpenVINO static INT8, onnxruntime dynamic INT8, FP32...):
pairs/s over RAG24 pairs (the verification split's BM25 candidates, ~255 tokens each) in
batches of at most ``--batch-tokens`` padded tokens sorted by length, with ``--threads``
threads; and parity against the PyTorch FP32 reference over 50 queries x 20 candidates
(mean Spearman, top-10 overlap). For every bi-encoder artifact: RAG24 segments embedded per
second, as ``tandem index build`` embeds them, and cosine against the reference. Rounds
alternate between runtimes, so a noisy neighbour hits each alike; the best round counts.
An OpenVINO artifact runs once per ``--cpu-precisions`` variant (its INT8 graph with f32 or bf16
for the unquantized ops, and the unquantized graph an INT8 export keeps, in bf16); its label
says what OpenVINO actually ran, since it runs f32 where bf16 is not there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, TypeVar, cast

from tandem import rag24
from tandem.artifact import read_manifest
from tandem.benchmarks.serving import git_commit
from tandem.devices import CPU_PRECISIONS, UNQUANTIZED, CpuPrecision
from tandem.encoders import BiEncoder, CrossEncoder, Encoder, pad_encodings
from tandem.export import reference
from tandem.export.parity import embedding_metrics, ranking_metrics
from tandem.export.texts import passages, rerank_cases
from tandem.runtimes.openvino import OpenVinoRuntime

E = TypeVar("E", bound=Encoder)


def label(model: Encoder) -> str:
    manifest = model.manifest
    method = manifest.quantization.get("method", "none")
    runtime = model.runtime
    if not isinstance(runtime, OpenVinoRuntime):
        return f"{manifest.runtime} {manifest.precision} ({method})"
    precision, _, unquantized = runtime.precision.partition("-")
    if unquantized:
        return f"{manifest.runtime} unquantized, kept beside {manifest.precision} ({precision} ops)"
    return f"{manifest.runtime} {manifest.precision} ({method}, {precision} ops)"


def variants(kind: type[E], folders: list[Path], args: argparse.Namespace) -> dict[str, E]:
    """Each artifact, opened once per CPU variant where its runtime takes one (the
    unquantized graph only where the artifact keeps it)."""
    opened: dict[str, E] = {}
    for folder in folders:
        manifest = read_manifest(folder)
        hints = [
            hint
            for hint in (args.cpu_precisions if manifest.runtime == "openvino" else ["f32"])
            if hint != UNQUANTIZED or manifest.has_unquantized_graph
        ]
        for position, hint in enumerate(hints):
            name = f"{folder}@{hint}" if position else str(folder)
            model = kind(folder, threads=args.threads, cpu_precision=cast(CpuPrecision, hint))
            opened[name] = model
    return opened


def reranker_batches(
    model: CrossEncoder, pairs: list[tuple[str, str]], batch_tokens: int
) -> list[Any]:
    encodings = model.tokenizer.encode_batch(pairs)
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
    batches: list[Any] = []
    current: list[int] = []
    for index in order:
        width = len(encodings[index].ids)
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(pad_encodings([encodings[i] for i in current], pad_id=model.pad_id))
            current = []
        current.append(index)
    batches.append(pad_encodings([encodings[i] for i in current], pad_id=model.pad_id))
    return batches


def measure_rerankers(
    folders: list[Path], data: rag24.Rag24, args: argparse.Namespace
) -> dict[str, Any]:
    cases = rerank_cases(data, queries=args.parity_queries, candidates=20, part="verify")
    source = Path(read_manifest(folders[0]).source)
    want = reference.score(
        source, [(c.query, c.documents) for c in cases], max_length=512, threads=args.threads
    )
    pairs = [(case.query, doc) for case in cases for doc in case.documents][: args.pairs]
    models = variants(CrossEncoder, folders, args)
    batches = {
        name: reranker_batches(model, pairs, args.batch_tokens) for name, model in models.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            started = time.perf_counter()
            for batch in batches[name]:
                model.forward(batch)
            rates[name].append(len(pairs) / (time.perf_counter() - started))
    out = {}
    for name, model in models.items():
        got = [model.score(case.query, case.documents) for case in cases]
        out[name] = {
            "runtime": label(model),
            "pairs_per_s": round(max(rates[name]), 1),
            "pairs_per_s_rounds": [round(rate, 1) for rate in rates[name]],
            "parity": {
                key: round(value, 4) for key, value in ranking_metrics(got, want, k=10).items()
            },
        }
    return out


def measure_bi_encoders(
    folders: list[Path], data: rag24.Rag24, args: argparse.Namespace
) -> dict[str, Any]:
    texts = [segment.text for segment in data.segments[: args.segments]]
    source = Path(read_manifest(folders[0]).source)
    check = passages(data, count=16 if args.smoke else 256, part="verify")
    want = reference.embed(source, check, max_length=256, threads=args.threads)
    models = variants(BiEncoder, folders, args)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            started = time.perf_counter()
            model.embed(texts, batch_size=args.index_batch)
            rates[name].append(len(texts) / (time.perf_counter() - started))
    return {
        name: {
            "runtime": label(model),
            "docs_per_s": round(max(rates[name]), 1),
            "docs_per_s_rounds": [round(rate, 1) for rate in rates[name]],
            "parity": {
                key: round(value, 4)
                for key, value in embedding_metrics(model.embed(check), want).items()
            },
        }
        for name, model in models.items()
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['threads']} threads, commit {results['commit']}",
        "",
        "| reranker runtime | pairs/s | vs first | mean Spearman | top-10 overlap |",
        "|---|---|---|---|---|",
        *_rows(results["rerankers"], "pairs_per_s", ("mean_spearman", "mean_top10_overlap"), 3),
    ]
    if results.get("bi_encoders"):
        lines += [
            "",
            "| bi-encoder runtime | docs/s | vs first | mean cosine | min cosine |",
            "|---|---|---|---|---|",
            *_rows(results["bi_encoders"], "docs_per_s", ("mean_cosine", "min_cosine"), 4),
        ]
    return "\n".join(lines)


def _rows(measured: dict[str, Any], rate: str, parity: tuple[str, str], digits: int) -> list[str]:
    """One table row per runtime: its rate, the ratio to the first runtime, two parity cells."""
    rows = list(measured.values())
    return [
        f"| {row['runtime']} | {row[rate]} | {row[rate] / rows[0][rate]:.2f}x | "
        + " | ".join(f"{row['parity'][key]:.{digits}f}" for key in parity)
        + " |"
        for row in rows
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rerankers",
        type=Path,
        nargs="+",
        required=True,
        help="artifact folders; the first is the baseline",
    )
    parser.add_argument("--bi-encoders", type=Path, nargs="*", default=[], help="artifact folders")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--segments", type=int, default=1000, help="bi-encoder: segments embedded")
    parser.add_argument(
        "--index-batch", type=int, default=64, help="bi-encoder batch (tandem index build's)"
    )
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cpu-precisions",
        nargs="+",
        choices=CPU_PRECISIONS,
        default=list(CPU_PRECISIONS),
        help="OpenVINO variants (as --cpu-precision), each run as its own row",
    )
    parser.add_argument("--parity-queries", type=int, default=50, help="x 20 candidates")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/runtimes.json"))
    parser.add_argument("--smoke", action="store_true", help="seconds: a few pairs, one round")


def main(args: argparse.Namespace) -> int:
    from tandem.benchmarks.encoders import machine

    if args.smoke:
        args.pairs, args.segments, args.rounds, args.parity_queries = 16, 16, 1, 2
    data = rag24.load()
    results: dict[str, Any] = {
        "machine": machine(),
        "commit": git_commit(),
        "threads": args.threads,
    }
    results["rerankers"] = measure_rerankers(args.rerankers, data, args)
    if args.bi_encoders:
        results["bi_encoders"] = measure_bi_encoders(args.bi_encoders, data, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(table(results))
    return 0
