"""`tandem bench quantization`: static INT8 recipes for a reranker, against its FP32 scores.

Each recipe quantizes the same FP32 ONNX export with NNCF for OpenVINO, as `tandem export`
does, changing one thing: the bias correction, SmoothQuant's alpha, the calibration text, or
which MatMuls stay FP32. Each is scored on two workloads against the PyTorch FP32 reference:
the peers benchmark's requests (a RAG24 topic and its 50 nearest segments cut to 70 words:
top-5 overlap, Spearman, pairs/s) and the export's verification pairs (20 topics x 20 whole
segments: top-10 overlap, Spearman). Speed here is a rough guide (one pass, one process);
`tandem bench runtimes` measures runtimes properly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tandem import rag24
from tandem.benchmarks.encoders import machine
from tandem.benchmarks.peers import requests
from tandem.benchmarks.serving import git_commit
from tandem.encoders import CrossEncoder
from tandem.export import reference
from tandem.export.graph import DEFAULT_OPSET, export_fp32
from tandem.export.openvino import quantize_static
from tandem.export.parity import spearman
from tandem.export.pipeline import STATIC_CALIBRATION_QUERIES
from tandem.export.source import resolve
from tandem.export.texts import RerankCase, rerank_cases

Feed = Mapping[str, NDArray[np.int64]]
# name -> (what changes, NNCF keyword arguments built from the nncf module)
RECIPES: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "export": ("tandem export's recipe: SmoothQuant 0.95, fast bias correction", lambda _: {}),
    "full-bias-correction": (
        "bias correction on the full model, not the fast one",
        lambda nncf: {"fast_bias_correction": False},
    ),
    "no-smoothquant": (
        "SmoothQuant off",
        lambda nncf: {"advanced_parameters": _smooth_quant(nncf, -1.0)},
    ),
    "smoothquant-0.5": (
        "SmoothQuant alpha 0.5",
        lambda nncf: {"advanced_parameters": _smooth_quant(nncf, 0.5)},
    ),
    "head-fp32": (
        "pooler and classifier kept FP32",
        lambda nncf: _kept(nncf, r".*(classifier|pooler).*"),
    ),
    "attention-fp32": (
        "the two attention MatMuls of every layer kept FP32",
        lambda nncf: _kept(nncf, r".*attention/self/MatMul.*"),
    ),
    "ffn-out-fp32": (
        "every layer's FFN output MatMul kept FP32",
        lambda nncf: _kept(nncf, r".*layer\.\d+/output/dense/MatMul"),
    ),
    "first-layer-fp32": ("all of layer 0 kept FP32", lambda nncf: _kept(nncf, r".*layer\.0/.*")),
    "last-layer-fp32": ("all of layer 5 kept FP32", lambda nncf: _kept(nncf, r".*layer\.5/.*")),
}
# Calibration variants: the export's 5 topics x 50 whole segments, or more of them, or with
# short passages added (the peers requests are cut to 70 words).
CALIBRATIONS = ("export", "8-topics", "with-short")


def _smooth_quant(nncf: Any, alpha: float) -> Any:
    return nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=alpha)
    )


def _kept(nncf: Any, pattern: str) -> dict[str, Any]:
    return {"ignored_scope": nncf.IgnoredScope(patterns=[pattern], validate=False)}


def calibration_feeds(
    scorer: CrossEncoder, cases: Sequence[RerankCase], which: str, *, topics: int
) -> list[Feed]:
    chosen = list(cases[: topics + 3 if which == "8-topics" else topics])
    texts = [(case.query, list(case.documents)) for case in chosen]
    if which == "with-short":
        texts += [
            (case.query, [" ".join(text.split()[:70]) for text in case.documents])
            for case in cases[topics : topics + 3]
        ]
    return [
        scorer.tokenize_pairs(query, documents[start : start + 4]).feed(scorer.input_names)
        for query, documents in texts
        for start in range(0, len(documents), 4)
    ]


def evaluate(
    folder: Path,
    short: Sequence[tuple[str, list[str]]],
    short_want: Sequence[NDArray[np.float32]],
    whole: Sequence[tuple[str, list[str]]],
    whole_want: Sequence[NDArray[np.float32]],
    threads: int,
) -> dict[str, float]:
    scorer = CrossEncoder(folder, threads=threads, check_hashes=False)
    started = time.perf_counter()
    short_got = [scorer.score(query, documents, batch_size=10) for query, documents in short]
    rate = sum(len(documents) for _, documents in short) / (time.perf_counter() - started)
    whole_got = [scorer.score(query, documents, batch_size=4) for query, documents in whole]
    return {
        "top5_overlap": _mean(
            _overlap(g, w, 5) for g, w in zip(short_got, short_want, strict=True)
        ),
        "spearman": _mean(spearman(g, w) for g, w in zip(short_got, short_want, strict=True)),
        "pairs_per_s": round(rate, 1),
        "whole_top10_overlap": _mean(
            _overlap(g, w, 10) for g, w in zip(whole_got, whole_want, strict=True)
        ),
        "whole_spearman": _mean(spearman(g, w) for g, w in zip(whole_got, whole_want, strict=True)),
    }


def _overlap(got: NDArray[np.float32], want: NDArray[np.float32], k: int) -> float:
    """As the peers benchmark counts it: shared indices among the k best, ties by position."""
    best = [set(np.argsort(-scores, kind="stable")[:k].tolist()) for scores in (got, want)]
    return len(best[0] & best[1]) / k


def _mean(values: Any) -> float:
    return round(float(np.mean(list(values))), 4)


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = rag24.load()
    short = [(case.query, case.documents) for case in requests(args.requests)]
    whole = [
        (case.query, list(case.documents))
        for case in rerank_cases(
            data, queries=args.requests // 2 or 1, candidates=20, part="verify"
        )
    ]
    short_want = reference.score(args.source, short, max_length=512, threads=args.threads)
    whole_want = reference.score(args.source, whole, max_length=512, threads=args.threads)
    calibration = rerank_cases(data, queries=8, candidates=50, part="calibrate")
    template = CrossEncoder(args.template, threads=args.threads, check_hashes=False)
    if template.manifest.runtime != "openvino":
        raise SystemExit(f"{args.template} is not an OpenVINO export: pass one as --template")
    import nncf

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tandem-quant-") as scratch:
        raw = export_fp32(
            resolve(str(args.source)), "cross-encoder", Path(scratch) / "raw", opset=DEFAULT_OPSET
        )
        plans = [(name, "export") for name in args.recipes] + [
            ("export", which) for which in args.calibrations if which != "export"
        ]
        for recipe, which in plans:
            label = recipe if which == "export" else f"calibration {which}"
            folder = Path(scratch) / label.replace(" ", "-")
            shutil.copytree(args.template, folder)
            started = time.perf_counter()
            feeds = calibration_feeds(template, calibration, which, topics=args.topics)
            quantize_static(raw, folder, feeds, exclude=(), options=RECIPES[recipe][1](nncf))
            row: dict[str, Any] = dict(
                evaluate(folder, short, short_want, whole, whole_want, args.threads)
            )
            row["what"] = RECIPES[recipe][0] if which == "export" else f"calibration: {which}"
            row["build_s"] = round(time.perf_counter() - started, 1)
            rows[label] = row
            print(label, json.dumps(row), flush=True)
    return {
        "machine": machine(),
        "commit": git_commit(),
        "command": " ".join(sys.argv),
        "requests": len(short),
        "rows": rows,
    }


def table(out: dict[str, Any]) -> str:
    lines = [
        "| recipe | top-5 overlap | Spearman | pairs/s | whole-segment top-10 | whole Spearman |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in out["rows"].items():
        lines.append(
            f"| {name}: {row['what']} | {row['top5_overlap']:.3f} | {row['spearman']:.4f} | "
            f"{row['pairs_per_s']} | {row['whole_top10_overlap']:.3f} | "
            f"{row['whole_spearman']:.4f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", type=Path, default=Path("../shared/models/stand-in-reranker"),
        help="the reranker's checkpoint (the FP32 reference)",
    )  # fmt: skip
    parser.add_argument(
        "--template", type=Path, default=Path("artifacts/cross-encoder"),
        help="an OpenVINO reranker export: its tokenizer and manifest are reused",
    )  # fmt: skip
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument(
        "--calibrations", nargs="+", choices=CALIBRATIONS, default=list(CALIBRATIONS)
    )
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument(
        "--topics", type=int, default=STATIC_CALIBRATION_QUERIES,
        help="calibration topics (50 segments each); the export uses 5",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantization.json"))
    parser.add_argument("--smoke", action="store_true", help="2 requests, one recipe")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        args.requests, args.topics = 2, 1
        args.recipes, args.calibrations = ["export"], ["export"]
    out = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(table(out))
    return 0
