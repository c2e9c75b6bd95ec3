"""Real texts for parity checks: RAG24 segments and topics, split into calibration and verification.

Calibration (choosing which nodes stay FP32) and verification (the parity written to the
manifest) use disjoint texts and topics, so a verified number is not one the export tuned on.
Rerank candidates come from a small BM25 over the segments: lexically close passages, as a
first stage would return, rather than random ones that any model separates easily.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from tandem.rag24 import Rag24

WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class RerankCase:
    query: str
    documents: tuple[str, ...]


def _split(items: int, part: str) -> range:
    # Even positions verify, odd positions calibrate.
    return range(0 if part == "verify" else 1, items, 2)


def passages(data: Rag24, *, count: int, part: str) -> list[str]:
    indices = list(_split(len(data.segments), part))[:count]
    return [data.segments[index].text for index in indices]


def rerank_cases(data: Rag24, *, queries: int, candidates: int, part: str) -> list[RerankCase]:
    """``queries`` topics, each with its top ``candidates`` segments by BM25."""
    index = _Bm25([segment.text for segment in data.segments])
    chosen = [data.topics[position] for position in _split(len(data.topics), part)][:queries]
    return [
        RerankCase(
            query=topic.query,
            documents=tuple(data.segments[hit].text for hit in index.top(topic.query, candidates)),
        )
        for topic in chosen
    ]


class _Bm25:
    def __init__(self, texts: list[str], *, k1: float = 0.9, b: float = 0.4) -> None:
        self.docs = [Counter(WORD.findall(text.lower())) for text in texts]
        self.lengths = [sum(doc.values()) for doc in self.docs]
        self.average = sum(self.lengths) / max(len(self.docs), 1)
        frequency: Counter[str] = Counter()
        for doc in self.docs:
            frequency.update(doc.keys())
        total = len(self.docs)
        self.idf = {
            term: math.log(1 + (total - count + 0.5) / (count + 0.5))
            for term, count in frequency.items()
        }
        self.k1, self.b = k1, b

    def top(self, query: str, count: int) -> list[int]:
        terms = set(WORD.findall(query.lower()))
        scores = []
        for position, (doc, length) in enumerate(zip(self.docs, self.lengths, strict=True)):
            norm = self.k1 * (1 - self.b + self.b * length / self.average)
            score = sum(
                self.idf[term] * doc[term] * (self.k1 + 1) / (doc[term] + norm)
                for term in terms
                if term in doc
            )
            scores.append((-score, position))
        return [position for _, position in sorted(scores)[:count]]
