"""Held-out evaluation: the first stage alone, each reranker on the same candidates, and the
paired tests that say whether the trained one differs from the others beyond chance."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem.relevance import paired_test, per_query
from tandem.training.labels import Judged
from tandem.training.pools import Pool


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


def reranked(
    name: str,
    artifact: Path,
    held: Sequence[Judged],
    pools: Mapping[str, Pool],
    texts: Mapping[str, str],
    *,
    depth: int,
    threads: int,
    note: str = "",
) -> System:
    """``artifact`` reranks each held-out query's first ``depth`` candidates (no budget)."""
    from tandem.encoders import CrossEncoder

    reranker = CrossEncoder(artifact, threads=threads)
    reranker.score("warm-up", ["the first run compiles kernels"])
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
