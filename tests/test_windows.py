"""MaxP's bookkeeping: the queue order of windows, each document's best scored window, and
where windows start (the reranker's and the bi-encoder's passages alike)."""

from __future__ import annotations

import itertools

import numpy as np

from tandem.server.engine.windows import best_per_document, interleave
from tandem.tokens import window_starts


def test_every_first_window_queues_before_any_second() -> None:
    assert interleave([1, 3, 2]) == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (1, 2)]
    assert interleave([]) == []


def test_a_document_takes_its_best_scored_window_and_counts_the_rest() -> None:
    counts = [1, 3, 2]
    order = interleave(counts)
    scores = np.array([0.5, -1.0, 2.0, 3.0, 0.0, 9.0], dtype=np.float32)
    # The budget ran out before the last two windows (document 2's second, document 1's third).
    scored = np.array([True, True, True, True, False, False])
    best = best_per_document(counts, order, scores, scored)
    assert [(b.score, b.window, b.scored, b.windows) for b in best] == [
        (0.5, 0, 1, 1),
        (3.0, 1, 2, 3),  # window 2 scored 9.0 but never ran: not counted
        (2.0, 0, 1, 2),
    ]
    assert [b.partly_scored for b in best] == [False, True, True]
    none = best_per_document([2], [(0, 0), (0, 1)], np.zeros(2, np.float32), np.zeros(2, bool))
    assert (none[0].score, none[0].scored, none[0].partly_scored) == (None, 0, False)


def test_window_starts_are_full_width_and_end_at_the_text_end() -> None:
    assert window_starts(200, 254, overlap=32, cap=64) == ([0], False)
    assert window_starts(300, 254, overlap=32, cap=1) == ([0], True)
    starts, past = window_starts(1000, 254, overlap=32, cap=64)
    assert not past
    assert starts[0] == 0
    assert starts[-1] + 254 == 1000  # the last ends at the end, full width
    assert all(later - earlier <= 254 - 32 for earlier, later in itertools.pairwise(starts))
    starts, past = window_starts(1000, 254, overlap=32, cap=3)
    assert past
    assert starts == [0, 222, 444]
    assert window_starts(1000, 254, overlap=500, cap=64)[0][1] == 127  # at most half a window
