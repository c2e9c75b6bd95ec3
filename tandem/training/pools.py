"""What the collection's own first stage finds for each labelled query: the candidates a
served reranker would see, hard negatives to train on, and the bi-encoder's scores as a teacher.

The collection is opened read-only, so a server may keep serving it meanwhile.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tandem.server.engine.fusion import FirstStage, Fusion
from tandem.training.labels import Judged, LabelError


@dataclass(frozen=True)
class Pool:
    """One query's first-stage rankings (ids, best first) and the bi-encoder's cosine for
    the documents the dense side found (``teacher``)."""

    first_stage: list[str]
    dense: list[str]
    teacher: dict[str, float] = field(default_factory=dict)

    def teacher_score(self, doc: str) -> float:
        """The dense cosine; a document the dense side did not find scores below them all."""
        if doc in self.teacher:
            return self.teacher[doc]
        return min(self.teacher.values(), default=0.0) - 0.01


@dataclass
class Retrieved:
    pools: dict[str, Pool]
    texts: dict[str, str]  # every document either ranking or any label names, by id


def retrieve(
    collection: Path,
    bi_encoder: Path,
    judged: Sequence[Judged],
    *,
    depth: int,
    stage: FirstStage,
    fusion: Fusion,
    threads: int,
    strict: bool,
) -> Retrieved:
    """``strict``: every id the labels name must be stored (labels a user wrote); else
    judgements of documents the collection lacks are dropped (TREC qrels judge pools far
    larger than most collections), and only none stored at all is an error."""
    from tandem.encoders import BiEncoder
    from tandem.server.engine.collection import STORE_NAME, Collection
    from tandem.server.engine.search import Mode, Searcher

    if not (collection / STORE_NAME).is_file():
        raise LabelError(f"{collection} is not a collection (no {STORE_NAME}): --collection")
    embedder = BiEncoder(bi_encoder, threads=threads)
    opened = Collection(collection, embedder=embedder, pairs=None, read_only=True)
    searcher = Searcher(
        opened, embedder=embedder, reranker=None, pairs=None, batcher=None, cache_size=0
    )
    try:
        if stage is not FirstStage.DENSE and opened.lexical is None:
            raise LabelError(f"{collection} has no lexical index: use --first-stage dense")
        named = sorted({doc for item in judged for doc in item.ids})
        stored = opened.get(named)
        missing = [doc for doc in named if doc not in stored]
        if missing and not strict and len(missing) < len(named):
            drop_unstored(judged, set(missing))
            print(
                f"{len(missing)} of the {len(named)} judged documents are not in the "
                "collection: their judgements are left out",
                file=sys.stderr,
            )
        elif missing:
            raise LabelError(
                f"{len(missing)} of the {len(named)} document ids the labels name are not in "
                f"{collection}: {', '.join(map(repr, missing[:3]))}"
                f"{' …' if len(missing) > 3 else ''} (index them, or send them as text)"
            )
        texts = {doc: stored[doc].text for doc in named if doc in stored}
        pools: dict[str, Pool] = {}

        # The searcher's calls are coroutines: one event loop runs them all.
        async def search_all() -> None:
            for number, item in enumerate(judged, start=1):
                rankings = {}
                for side in dict.fromkeys((stage, FirstStage.DENSE)):
                    result = await searcher.search(
                        item.query, recall_k=depth, top_n=depth, mode=Mode.RETRIEVE_ONLY,
                        include_text=True, first_stage=side, fusion=fusion,
                    )  # fmt: skip
                    rankings[side] = result.hits
                    texts.update({hit.id: hit.text or "" for hit in result.hits})
                dense = rankings[FirstStage.DENSE]
                pools[item.query_id] = Pool(
                    first_stage=[hit.id for hit in rankings[stage]],
                    dense=[hit.id for hit in dense],
                    teacher={hit.id: float(hit.stage1_score or 0.0) for hit in dense},
                )
                print(f"\rfirst stage: {number}/{len(judged)} queries", end="", file=sys.stderr)

        asyncio.run(search_all())
        print(file=sys.stderr)
        return Retrieved(pools, texts)
    finally:
        opened.close()


def drop_unstored(judged: Sequence[Judged], missing: set[str]) -> None:
    for item in judged:
        for doc in [doc for doc in item.grades if doc in missing]:
            del item.grades[doc]


def hard_negatives(item: Judged, pool: Pool, *, count: int, margin: float | None) -> list[str]:
    """Up to ``count`` documents the first stage ranks highest for the query that no label
    calls relevant (a document labelled 0 is a negative already, and is not repeated).
    ``margin``, as sentence-transformers' ``mine_hard_negatives`` has it: keep only those
    whose bi-encoder score is at least ``margin`` below the best positive's, since an
    unjudged document that scores above a positive is as likely relevant as not."""
    positives = [doc for doc, grade in item.grades.items() if grade > 0]
    ceiling = None
    if margin is not None and positives:
        ceiling = max(pool.teacher_score(doc) for doc in positives) - margin
    negatives = []
    for doc in pool.first_stage:
        if doc in item.grades:
            continue
        if ceiling is not None and pool.teacher_score(doc) > ceiling:
            continue
        negatives.append(doc)
        if len(negatives) == count:
            break
    return negatives


def teacher_scores(pool: Pool, docs: Sequence[str]) -> dict[str, float]:
    """The bi-encoder's scores for ``docs``, min-max scaled to [0, 1] within the list."""
    raw = {doc: pool.teacher_score(doc) for doc in docs}
    low, high = min(raw.values(), default=0.0), max(raw.values(), default=0.0)
    spread = high - low or 1.0
    return {doc: (value - low) / spread for doc, value in raw.items()}


def check_pools(judged: Sequence[Judged], pools: Mapping[str, Pool]) -> None:
    empty = [item.query_id for item in judged if not pools[item.query_id].first_stage]
    if len(empty) == len(judged):
        raise LabelError("the first stage found nothing for any query: is the collection empty?")
