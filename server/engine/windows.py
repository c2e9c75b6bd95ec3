"""Long documents at rerank time: read in overlapping windows, scored by their best (MaxP).

A document longer than the reranker's window becomes several (query, window) pairs
(``PairTemplate.windows``). They queue like any pair, in one order: every document's first
window, then every second window, and so on. Under a deadline the batcher scores pairs in
that order, so depth (how many documents get a score at all) is kept before length (how much
of each is read), and a document whose later windows ran out of time is flagged partly scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

# Cohere's rerank v1 reads at most 10 chunks of a document unless told otherwise.
DEFAULT_MAX_WINDOWS = 10


@dataclass(frozen=True)
class Reading:
    """How much of each document the reranker reads: at most ``max_windows`` windows, each
    sharing ``overlap`` tokens with the one before (1 window: the document's start only)."""

    max_windows: int = DEFAULT_MAX_WINDOWS
    overlap: int = 64


@dataclass(frozen=True)
class DocumentScore:
    score: float | None  # the best scored window's; None where no window was scored
    window: int  # which window that was (0 where none was scored)
    scored: int  # windows scored within the budget
    windows: int  # windows the document was cut into

    @property
    def partly_scored(self) -> bool:
        return 0 < self.scored < self.windows


def interleave(counts: Sequence[int]) -> list[tuple[int, int]]:
    """(document, window) in queue order: each document's window w before any's w + 1."""
    return [
        (document, window)
        for window in range(max(counts, default=0))
        for document, count in enumerate(counts)
        if window < count
    ]


def best_per_document(
    counts: Sequence[int],
    order: Sequence[tuple[int, int]],
    scores: NDArray[np.float32],
    scored: NDArray[np.bool_],
) -> list[DocumentScore]:
    """Each document's best scored window, from the scores of ``order``'s pairs."""
    best: list[tuple[float, int] | None] = [None] * len(counts)
    done = [0] * len(counts)
    for (document, window), score, ran in zip(order, scores.tolist(), scored.tolist(), strict=True):
        if not ran:
            continue
        done[document] += 1
        current = best[document]
        if current is None or score > current[0]:
            best[document] = (float(score), window)
    return [
        DocumentScore(
            None if found is None else found[0],
            0 if found is None else found[1],
            done[document],
            counts[document],
        )
        for document, found in enumerate(best)
    ]
