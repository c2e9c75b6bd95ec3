"""Training labels from what users have: TREC qrels, JSON lines, or feedback the server stored.

Every source becomes the same thing: a list of ``Judged`` queries, each with graded labels on
documents. A document is named by its id in the collection, or sent as text (JSON lines only;
it gets a ``text:`` key of its own). Grades are numbers >= 0, higher meaning more relevant
(TREC's 0-3, 1 for a JSON positive or a click, 0 for a JSON negative).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.relevance import InputError, read_qrels, read_queries

TEXT_PREFIX = "text:"


class LabelError(InputError):
    """Labels the trainer cannot use: a missing file, a malformed line, no judged query."""


@dataclass
class Judged:
    """One query and its labels: ``grades`` by document key (a collection id, or the
    ``text:`` key of a document sent as text, whose text is in ``texts``)."""

    query_id: str
    query: str
    grades: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        """The collection ids this query's labels name."""
        return [key for key in self.grades if not key.startswith(TEXT_PREFIX)]


def text_key(text: str) -> str:
    return TEXT_PREFIX + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def from_trec(queries: Path, qrels: Path) -> list[Judged]:
    """TREC topics (``id<TAB>query``, JSON lines or a query per line) and a qrels file; a
    query without judgements is left out (it has nothing to learn from)."""
    if not qrels.is_file():
        raise LabelError(f"{qrels}: no such qrels file (--qrels)")
    topics = read_queries(queries)
    grades = read_qrels(qrels)
    judged = [
        Judged(query_id, text, {doc: float(grade) for doc, grade in grades[query_id].items()})
        for query_id, text in topics
        if grades.get(query_id)
    ]
    if not judged:
        raise LabelError(
            f"no query in {queries} has a judgement in {qrels}: do their query ids match?"
        )
    return judged


def from_jsonl(path: Path) -> list[Judged]:
    """``{"query", "positives", "negatives"?, "scores"?, "id"?}`` per line. A document is an
    id string, or ``{"id": ...}``, or ``{"text": ...}``. ``scores``, when given, has one number
    per positive then negative, in order, and replaces their 1 / 0 labels (graded labels, or a
    teacher's scores rescaled to >= 0)."""
    if not path.is_file():
        raise LabelError(f"{path}: no such file")
    judged: dict[str, Judged] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise LabelError(f"{where}: not JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise LabelError(f"{where}: expected a JSON object")
        query = record.get("query")
        if not isinstance(query, str) or not query.strip():
            raise LabelError(f'{where}: "query" must be a non-empty string')
        positives = _documents(record.get("positives"), f'{where}: "positives"', required=True)
        negatives = _documents(record.get("negatives", []), f'{where}: "negatives"')
        labels = [1.0] * len(positives) + [0.0] * len(negatives)
        if "scores" in record:
            labels = _scores(record["scores"], len(labels), where)
        query_id = str(record.get("id", query))
        entry = judged.setdefault(query_id, Judged(query_id, query))
        for (key, text), label in zip(positives + negatives, labels, strict=True):
            entry.grades[key] = label
            if text is not None:
                entry.texts[key] = text
    if not judged:
        raise LabelError(f"{path} holds no labels")
    return list(judged.values())


def from_feedback(rows: Iterable[tuple[str, str, float]]) -> list[Judged]:
    """(query, document id, grade) rows, oldest first: a later grade for the same pair
    replaces an earlier one. Queries are keyed by their text."""
    judged: dict[str, Judged] = {}
    for query, document_id, grade in rows:
        judged.setdefault(query, Judged(query, query)).grades[document_id] = grade
    if not judged:
        raise LabelError("the collection holds no feedback yet (send Feedback calls first)")
    return list(judged.values())


def _documents(raw: Any, where: str, *, required: bool = False) -> list[tuple[str, str | None]]:
    if not isinstance(raw, list) or (required and not raw):
        raise LabelError(f"{where} must be a {'non-empty ' if required else ''}list")
    documents: list[tuple[str, str | None]] = []
    for item in raw:
        if isinstance(item, str) and item.strip():
            documents.append((item, None))
        elif isinstance(item, Mapping) and isinstance(item.get("id"), str) and item["id"]:
            documents.append((item["id"], None))
        elif isinstance(item, Mapping) and isinstance(item.get("text"), str) and item["text"]:
            documents.append((text_key(item["text"]), item["text"]))
        else:
            raise LabelError(
                f'{where}: each item is an id string, {{"id": ...}} or {{"text": ...}}'
            )
    return documents


def _scores(raw: Any, count: int, where: str) -> list[float]:
    if (
        not isinstance(raw, list)
        or len(raw) != count
        or not all(isinstance(value, int | float) and value >= 0 for value in raw)
    ):
        raise LabelError(
            f'{where}: "scores" must list {count} numbers >= 0, one per positive then negative'
        )
    return [float(value) for value in raw]


def split(
    judged: Sequence[Judged], *, eval_fraction: float, seed: int
) -> tuple[list[Judged], list[Judged]]:
    """(train, held out). A query is held out when the sha1 of ``seed:query_id`` falls in the
    first ``eval_fraction`` of its range: stable per query, whatever else the file holds."""
    if not 0 < eval_fraction < 1:
        raise LabelError(f"--eval-fraction must be between 0 and 1 (got {eval_fraction})")
    cut = int(eval_fraction * 10_000)
    held = [
        item
        for item in judged
        if int(hashlib.sha1(f"{seed}:{item.query_id}".encode()).hexdigest(), 16) % 10_000 < cut
    ]
    held_ids = {item.query_id for item in held}
    return [item for item in judged if item.query_id not in held_ids], held
