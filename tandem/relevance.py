"""Relevance arithmetic: nDCG, MRR and recall against graded judgements, TREC qrels files,
and a paired test of two systems over the same queries."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

Ranking = Sequence[str]
Qrels = Mapping[str, Mapping[str, int]]


class InputError(ValueError):
    """A queries or qrels file the tools cannot use: missing, empty or malformed."""


def ndcg_at(ranking: Ranking, grades: Mapping[str, int], k: int = 10) -> float:
    gains = [grades.get(doc, 0) for doc in ranking[:k]]
    dcg = sum(gain / math.log2(position + 2) for position, gain in enumerate(gains))
    ideal = sorted(grades.values(), reverse=True)[:k]
    best = sum(gain / math.log2(position + 2) for position, gain in enumerate(ideal))
    return dcg / best if best else 0.0


def mrr_at(ranking: Ranking, grades: Mapping[str, int], *, relevant: int, k: int = 10) -> float:
    for position, doc in enumerate(ranking[:k]):
        if grades.get(doc, 0) >= relevant:
            return 1.0 / (position + 1)
    return 0.0


def recall_at(ranking: Ranking, grades: Mapping[str, int], *, relevant: int, k: int) -> float:
    wanted = {doc for doc, grade in grades.items() if grade >= relevant}
    return len(wanted & set(ranking[:k])) / len(wanted) if wanted else 0.0


def judged(qrels: Qrels, query_ids: Sequence[str], *, relevant: int) -> list[str]:
    """The queries with at least one judgement at or above ``relevant``."""
    return [q for q in query_ids if any(g >= relevant for g in qrels.get(q, {}).values())]


def per_query(
    final: Mapping[str, Ranking],
    candidates: Mapping[str, Ranking],
    qrels: Qrels,
    query_ids: Sequence[str],
    *,
    relevant: int,
    depth: int,
) -> dict[str, list[float]]:
    """nDCG@10 and MRR@10 of each judged query's ``final`` ranking, and Recall@depth of its
    ``candidates``, in ``query_ids`` order (queries with nothing judged ``relevant`` left out)."""
    scored = judged(qrels, query_ids, relevant=relevant)
    return {
        "ndcg@10": [ndcg_at(final[q], qrels[q]) for q in scored],
        "mrr@10": [mrr_at(final[q], qrels[q], relevant=relevant) for q in scored],
        f"recall@{depth}": [
            recall_at(candidates[q], qrels[q], relevant=relevant, k=depth) for q in scored
        ],
    }


def means(measures: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {name: float(np.mean(values)) if values else 0.0 for name, values in measures.items()}


def read_queries(path: Path) -> list[tuple[str, str]]:
    """``id<TAB>query`` lines (TREC topics), JSON lines with ``id`` and ``query`` (or
    ``text``), or one query per line (numbered from 1)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    queries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            record = json.loads(line)
            text = record.get("query", record.get("text"))
            if not isinstance(text, str):
                raise InputError(f'{path}:{number}: a JSON line needs a "query" string')
            queries.append((str(record.get("id", number)), text))
        elif "\t" in line:
            query_id, text = line.split("\t", 1)
            queries.append((query_id.strip(), text.strip()))
        else:
            queries.append((str(number), line.strip()))
    if not queries:
        raise InputError(f"{path} holds no queries")
    return queries


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """A TREC qrels file: ``query_id iteration doc_id grade`` per line."""
    if not path.is_file():
        raise InputError(f"{path}: no such qrels file")
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4 or not parts[3].lstrip("-").isdigit():
            raise InputError(f"{path}:{number}: expected 'query_id 0 doc_id grade'")
        qrels.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return qrels


# The p below which a paired test's difference is reported as real, here and in tandem train.
SIGNIFICANT = 0.05


def behind_beyond_chance(difference: float, p_value: float) -> bool:
    """Whether a ``paired_test``'s second system is below its first beyond chance."""
    return difference < 0 and p_value < SIGNIFICANT


def paired_test(
    first: Sequence[float], second: Sequence[float], *, rounds: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """``second`` minus ``first`` over the same queries: the mean difference, a 95% bootstrap
    interval, and the two-sided p-value of a paired randomization (sign-flip) test."""
    differences = np.asarray(second, dtype=np.float64) - np.asarray(first, dtype=np.float64)
    if differences.size == 0:
        return {"mean_difference": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0, "n": 0}
    rng = np.random.default_rng(seed)
    observed = abs(differences.mean())
    signs = rng.choice((-1.0, 1.0), size=(rounds, differences.size))
    flipped = np.abs((signs * differences).mean(axis=1))
    resampled = rng.choice(differences, size=(rounds, differences.size)).mean(axis=1)
    return {
        "mean_difference": float(differences.mean()),
        "ci_low": float(np.quantile(resampled, 0.025)),
        "ci_high": float(np.quantile(resampled, 0.975)),
        # The observed split counts among the permutations, so p is never reported as 0.
        "p_value": float((np.sum(flipped >= observed - 1e-12) + 1) / (rounds + 1)),
        "n": int(differences.size),
    }
