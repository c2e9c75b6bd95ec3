"""Agreement metrics between an artifact and its reference, and the thresholds they must meet."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Vector = NDArray[np.float32]


@dataclass(frozen=True)
class Thresholds:
    """Bars an export must clear; every field is a flag on `tandem export`."""

    min_mean_cosine: float = 0.99
    min_cosine: float = 0.97
    min_mean_spearman: float = 0.98
    min_topk_overlap: float = 0.9
    topk: int = 10


def cosine_rows(left: NDArray[np.float32], right: NDArray[np.float32]) -> Vector:
    left = left / np.maximum(np.linalg.norm(left, axis=1, keepdims=True), 1e-12)
    right = right / np.maximum(np.linalg.norm(right, axis=1, keepdims=True), 1e-12)
    return np.asarray((left * right).sum(axis=1), dtype=np.float32)


def average_ranks(values: Vector) -> NDArray[np.float64]:
    """Ranks from 1, ties sharing their mean rank (as scipy.stats.rankdata does)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return np.asarray(sums[inverse] / counts[inverse], dtype=np.float64)


def spearman(left: Vector, right: Vector) -> float:
    a, b = average_ranks(left), average_ranks(right)
    a -= a.mean()
    b -= b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 1.0


def topk_overlap(left: Vector, right: Vector, k: int) -> float:
    k = min(k, len(left))
    if k == 0:
        return 1.0
    top_left = set(np.argsort(-left, kind="stable")[:k].tolist())
    top_right = set(np.argsort(-right, kind="stable")[:k].tolist())
    return len(top_left & top_right) / k


def embedding_metrics(
    candidate: NDArray[np.float32], reference: NDArray[np.float32]
) -> dict[str, float]:
    cosines = cosine_rows(candidate, reference)
    return {"mean_cosine": float(cosines.mean()), "min_cosine": float(cosines.min())}


def ranking_metrics(
    candidate: Sequence[Vector], reference: Sequence[Vector], *, k: int
) -> dict[str, float]:
    rhos = [spearman(got, want) for got, want in zip(candidate, reference, strict=True)]
    overlaps = [topk_overlap(got, want, k) for got, want in zip(candidate, reference, strict=True)]
    gaps = [float(np.abs(got - want).max()) for got, want in zip(candidate, reference, strict=True)]
    return {
        "mean_spearman": float(np.mean(rhos)),
        "min_spearman": float(np.min(rhos)),
        f"mean_top{k}_overlap": float(np.mean(overlaps)),
        "max_abs_score_error": float(np.max(gaps)),
    }


def embedding_passes(metrics: dict[str, float], bars: Thresholds, *, margin: float = 0.0) -> bool:
    return (
        metrics["mean_cosine"] >= bars.min_mean_cosine + margin
        and metrics["min_cosine"] >= bars.min_cosine + margin
    )


def ranking_passes(metrics: dict[str, float], bars: Thresholds, *, margin: float = 0.0) -> bool:
    return (
        metrics["mean_spearman"] >= bars.min_mean_spearman + margin
        and metrics[f"mean_top{bars.topk}_overlap"] >= bars.min_topk_overlap + margin
    )
