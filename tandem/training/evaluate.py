"""Held-out evaluation: the first stage alone, each reranker on the same candidates, and the
paired tests that say whether the trained one differs from the others beyond chance; then the
same two on a sample of the queries it trained on, which tells learning relevance from
learning those queries."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.relevance import behind_beyond_chance, paired_test, per_query
from tandem.training.labels import Judged
from tandem.training.pools import Pool

if TYPE_CHECKING:
    from tandem.encoders import CrossEncoder


@dataclass(frozen=True)
class System:
    """One way of ranking the held-out queries: ``final`` ids best first per query, from
    ``candidates``; ``ms_per_pair`` where a reranker scored them."""

    name: str
    final: dict[str, list[str]]
    candidates: dict[str, list[str]]
    ms_per_pair: float | None = None
    note: str = ""


def first_stage_systems(
    held: Sequence[Judged], pools: Mapping[str, Pool], *, depth: int, name: str
) -> list[System]:
    fused = {item.query_id: pools[item.query_id].first_stage[:depth] for item in held}
    dense = {item.query_id: pools[item.query_id].dense[:depth] for item in held}
    systems = [System(f"{name} (stage 1 alone)", fused, fused)]
    if name != "dense":
        systems.append(System("dense (stage 1 alone)", dense, dense))
    return systems


def load_reranker(artifact: Path, *, threads: int) -> CrossEncoder:
    """An artifact opened for ``reranked``, its kernels compiled by a first run."""
    from tandem.encoders import CrossEncoder

    reranker = CrossEncoder(artifact, threads=threads)
    reranker.score("warm-up", ["the first run compiles kernels"])
    return reranker


def reranked(
    name: str,
    reranker: CrossEncoder,
    held: Sequence[Judged],
    pools: Mapping[str, Pool],
    texts: Mapping[str, str],
    *,
    depth: int,
    note: str = "",
) -> System:
    """``reranker`` reorders each query's first ``depth`` candidates (no budget)."""
    final, candidates = {}, {}
    pairs, seconds = 0, 0.0
    for number, item in enumerate(held, start=1):
        pool = pools[item.query_id].first_stage[:depth]
        started = time.perf_counter()
        scores = reranker.score(item.query, [texts[doc] for doc in pool])
        seconds += time.perf_counter() - started
        pairs += len(pool)
        order = sorted(range(len(pool)), key=lambda i: (-float(scores[i]), i))
        final[item.query_id] = [pool[i] for i in order]
        candidates[item.query_id] = pool
        print(f"\r{name}: {number}/{len(held)} queries", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return System(name, final, candidates, 1000 * seconds / max(pairs, 1), note)


@dataclass(frozen=True)
class Row:
    system: str
    ndcg_at_10: float
    mrr_at_10: float
    recall: float
    ms_per_pair: float | None
    note: str


def measure(
    systems: Sequence[System],
    held: Sequence[Judged],
    *,
    trained: str,
    relevant: int,
    depth: int,
) -> tuple[list[Row], dict[str, dict[str, dict[str, float]]], int]:
    """Rows of means, the paired tests of ``trained`` against every other system (by metric),
    and how many held-out queries had something relevant to find."""
    qrels = {item.query_id: {doc: round(g) for doc, g in item.grades.items()} for item in held}
    ids = [item.query_id for item in held]
    scored = {
        system.name: per_query(
            system.final, system.candidates, qrels, ids, relevant=relevant, depth=depth
        )
        for system in systems
    }
    recall_name = f"recall@{depth}"
    rows = [
        Row(
            system.name,
            _mean(scored[system.name]["ndcg@10"]),
            _mean(scored[system.name]["mrr@10"]),
            _mean(scored[system.name][recall_name]),
            system.ms_per_pair,
            system.note,
        )
        for system in systems
    ]
    tests = {
        system.name: {
            metric: paired_test(scored[system.name][metric], scored[trained][metric])
            for metric in ("ndcg@10", "mrr@10")
        }
        for system in systems
        if system.name != trained
    }
    return rows, tests, len(scored[trained]["ndcg@10"])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class Generalisation:
    """The trained reranker's lead over stage 1 (nDCG@10) on queries it trained on and on
    held-out ones. A reranker ahead on the first and behind on the second learned its
    training queries (their topics, their documents) rather than what makes a document
    answer a query: more epochs fit those queries closer, more and more varied ones help."""

    train_queries: int  # scored: sampled training queries with a relevant document
    train_lead: dict[str, float]  # paired_test of stage 1 -> trained, training queries
    held_lead: dict[str, float]  # the same, held-out queries

    @property
    def memorised(self) -> bool:
        return self.train_lead["mean_difference"] > 0 and behind_beyond_chance(
            self.held_lead["mean_difference"], self.held_lead["p_value"]
        )

    def sentence(self) -> str:
        train, held = self.train_lead["mean_difference"], self.held_lead["mean_difference"]
        figures = (
            f"Trained - stage 1, nDCG@10: {train:+.3f} on {self.train_queries} "
            f"{'query' if self.train_queries == 1 else 'queries'} it trained on, "
            f"{held:+.3f} held out"
        )
        if train <= 0:
            return (
                f"{figures}: behind stage 1 even on the queries it trained on, it has not "
                "fitted them yet. More epochs or a higher learning rate fit them closer; only "
                "the held-out figure says whether that carries over to unseen queries."
            )
        if self.memorised:
            return (
                f"{figures}: it learned its training queries rather than relevance. More, "
                "and more varied, training queries are what narrows this gap; more epochs fit "
                "the same ones closer."
            )
        return f"{figures}."


def training_sample(train: Sequence[Judged], *, count: int, seed: int) -> list[Judged]:
    """Up to ``count`` training queries, chosen by ``seed``, in their own order: scoring
    every one would cost as much as the training when users bring thousands."""
    if len(train) <= count:
        return list(train)
    chosen = set(random.Random(seed).sample(range(len(train)), count))
    return [item for position, item in enumerate(train) if position in chosen]
