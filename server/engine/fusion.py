"""Stage 1's rankings: dense, lexical, or both fused by weighted reciprocal rank fusion.

RRF (Cormack, Clarke and Büttcher, SIGIR 2009) scores a document by the sum over rankings
of ``weight / (k + rank)``, with ranks from 1. It needs no score calibration between cosine
and BM25, which live on unrelated scales; ``k`` damps the lead of a first place (60 in the
paper, and in Elasticsearch, OpenSearch and Weaviate).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_RRF_K = 60


class FirstStage(enum.Enum):
    DENSE = "dense"
    LEXICAL = "lexical"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class Fusion:
    """How hybrid combines its two rankings."""

    dense_weight: float = 1.0
    lexical_weight: float = 1.0
    k: int = DEFAULT_RRF_K


@dataclass(frozen=True)
class Ranked:
    """Stage 1's candidates, best first, with where each side placed them (0-based; None
    where that side did not return the document)."""

    keys: list[int]
    scores: list[float]  # cosine (dense), BM25 (lexical), or the fused RRF score (hybrid)
    dense_ranks: list[int | None] = field(default_factory=list)
    lexical_ranks: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dense_count(self) -> int:
        """Candidates the dense side found (one found by both sides counts for each)."""
        return sum(rank is not None for rank in self.dense_ranks)

    @property
    def lexical_count(self) -> int:
        return sum(rank is not None for rank in self.lexical_ranks)

    def head(self, count: int) -> Ranked:
        return Ranked(
            self.keys[:count],
            self.scores[:count],
            self.dense_ranks[:count],
            self.lexical_ranks[:count],
        )


def single(keys: Sequence[int], scores: Sequence[float], side: FirstStage) -> Ranked:
    """One side's ranking as stage 1's."""
    ranks: list[int | None] = list(range(len(keys)))
    none: list[int | None] = [None] * len(keys)
    dense, lexical = (ranks, none) if side is FirstStage.DENSE else (none, ranks)
    return Ranked([int(key) for key in keys], [float(s) for s in scores], dense, lexical)


def reciprocal_rank_fusion(
    dense: Sequence[int], lexical: Sequence[int], fusion: Fusion, *, limit: int
) -> Ranked:
    """The best ``limit`` documents of the two rankings (keys, best first) by weighted RRF.

    Ties (a document one side ranks r and another the other side ranks r, at equal weights)
    go to the better of the two ranks, then to dense: deterministic, and stable."""
    dense_rank = {int(key): rank for rank, key in enumerate(dense)}
    lexical_rank = {int(key): rank for rank, key in enumerate(lexical)}
    scores: dict[int, float] = {}
    for ranks, weight in ((dense_rank, fusion.dense_weight), (lexical_rank, fusion.lexical_weight)):
        if weight <= 0:
            continue
        for key, rank in ranks.items():
            scores[key] = scores.get(key, 0.0) + weight / (fusion.k + rank + 1)

    def order(key: int) -> tuple[float, int, int]:
        best = min(dense_rank.get(key, len(dense)), lexical_rank.get(key, len(lexical)))
        return (-scores[key], best, 0 if key in dense_rank else 1)

    keys = sorted(scores, key=order)[:limit]
    return Ranked(
        keys,
        [scores[key] for key in keys],
        [dense_rank.get(key) for key in keys],
        [lexical_rank.get(key) for key in keys],
    )


def fuse_ids(
    dense: Sequence[str], lexical: Sequence[str], fusion: Fusion, *, depth: int
) -> list[str]:
    """Document ids as the server's hybrid orders them at ``recall_k=depth``, from each
    side's ranking (best first, at least ``depth`` long): for tools that rank by id."""
    numbers = {item: n for n, item in enumerate(dict.fromkeys([*dense, *lexical]))}
    names = list(numbers)
    fused = reciprocal_rank_fusion(
        [numbers[item] for item in dense[:depth]],
        [numbers[item] for item in lexical[:depth]],
        fusion,
        limit=depth,
    )
    return [names[key] for key in fused.keys]
