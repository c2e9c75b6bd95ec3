"""MaxP's bookkeeping: the queue order of windows, and each document's best scored window."""

from __future__ import annotations

import numpy as np

from tandem.server.engine.windows import best_per_document, interleave


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
