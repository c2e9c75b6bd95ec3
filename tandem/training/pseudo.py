"""Queries made from the collection's own text, for training only: the inverse cloze task
(Lee, Chang and Toutanova, ACL 2019). A sentence of a stored document becomes a query, and the
document is its answer twice over: stored whole, and sent as text with that sentence taken out,
so that finding the sentence word for word is not all the reranker learns.

Labels cover the few hundred queries someone judged; these cover every topic the collection
holds. A reranker trained on labelled queries alone learns those queries, their topics and
documents, rather than what makes a document answer a query (RESULTS, "What a reranker trained
here learned").
"""

from __future__ import annotations

import random
import re

from tandem.server.engine.store import DocumentStore
from tandem.training.labels import Judged, LabelError, text_key

PREFIX = "pseudo:"
# A sentence ends at . ! or ? followed by white space: good enough for prose, and a sentence
# cut wrongly only makes a query a little longer or shorter.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_WORDS, MAX_WORDS = 6, 40  # a question's length, not a heading's or a paragraph's
MIN_REST_WORDS = 30  # what is left must still say something to read
TRIES_PER_QUERY = 4  # documents sampled per query wanted: short ones yield none


def inverse_cloze(store: DocumentStore, *, count: int, seed: int, grade: float) -> list[Judged]:
    """Up to ``count`` queries from documents sampled by ``seed``, each labelled ``grade``
    (the labels' top grade) on its two answers. Fewer where too few documents hold such a
    sentence (``cloze``); none at all is an error."""
    keys: list[int] = store.keys().tolist()
    if count <= 0 or not keys:
        return []
    rng = random.Random(seed)
    sampled = rng.sample(keys, min(len(keys), count * TRIES_PER_QUERY))
    documents = store.by_keys(sampled)
    made: list[Judged] = []
    for key in sampled:
        document = documents.get(key)
        query = None if document is None else cloze(document.text, rng)
        if document is None or query is None:
            continue
        sentence, rest = query
        kept = text_key(rest)
        made.append(
            Judged(
                PREFIX + document.id,
                sentence,
                {document.id: grade, kept: grade},
                {kept: rest},
            )
        )
        if len(made) == count:
            break
    if not made:
        raise LabelError(
            f"no stored document has a sentence of {MIN_WORDS} to {MAX_WORDS} words and "
            f"{MIN_REST_WORDS} words besides it: --pseudo-queries needs prose (or set it to 0)"
        )
    return made


def cloze(text: str, rng: random.Random) -> tuple[str, str] | None:
    """(a sentence of ``text``, ``text`` without it), or None where ``text`` has no such
    sentence beside enough other words."""
    sentences = SENTENCE_END.split(text.strip())
    lengths = [len(sentence.split()) for sentence in sentences]
    fitting = [
        position
        for position, length in enumerate(lengths)
        if MIN_WORDS <= length <= MAX_WORDS and sum(lengths) - length >= MIN_REST_WORDS
    ]
    if not fitting:
        return None
    chosen = rng.choice(fitting)
    rest = " ".join(sentence for position, sentence in enumerate(sentences) if position != chosen)
    return sentences[chosen], rest
