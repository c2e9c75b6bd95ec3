"""Parity metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.export.parity import (
    Thresholds,
    average_ranks,
    cosine_rows,
    embedding_passes,
    ranking_metrics,
    ranking_passes,
    spearman,
    topk_overlap,
)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_average_ranks_share_ties() -> None:
    assert average_ranks(f32(10, 20, 20, 5)).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_known_values() -> None:
    assert spearman(f32(1, 2, 3, 4), f32(10, 20, 30, 40)) == pytest.approx(1.0)
    assert spearman(f32(1, 2, 3, 4), f32(4, 3, 2, 1)) == pytest.approx(-1.0)
    # One adjacent swap among four: 1 - 6*2/(4*15) = 0.8
    assert spearman(f32(1, 2, 3, 4), f32(1, 3, 2, 4)) == pytest.approx(0.8)


def test_topk_overlap_counts_shared_members() -> None:
    assert topk_overlap(f32(5, 4, 3, 2, 1), f32(5, 4, 0, 2, 1), 2) == 1.0
    assert topk_overlap(f32(5, 4, 3, 2, 1), f32(0, 4, 3, 2, 1), 2) == 0.5


def test_cosine_rows_ignores_scale() -> None:
    left = np.array([[1, 0], [1, 1]], dtype=np.float32)
    right = np.array([[3, 0], [1, -1]], dtype=np.float32)
    assert cosine_rows(left, right).tolist() == pytest.approx([1.0, 0.0])


def test_bars_apply_with_margin() -> None:
    bars = Thresholds()
    assert embedding_passes({"mean_cosine": 0.995, "min_cosine": 0.98}, bars)
    assert not embedding_passes({"mean_cosine": 0.995, "min_cosine": 0.96}, bars)
    assert not embedding_passes({"mean_cosine": 0.992, "min_cosine": 0.98}, bars, margin=0.005)
    metrics = ranking_metrics([f32(3, 2, 1)], [f32(3, 2, 1)], k=10)
    assert metrics["mean_spearman"] == 1.0
    assert ranking_passes(metrics, bars)
    assert not ranking_passes(ranking_metrics([f32(1, 2, 3)], [f32(3, 2, 1)], k=2), bars)
