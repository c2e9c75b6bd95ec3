"""Inverse-cloze queries from a collection's own text (`tandem train --pseudo-queries`)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tandem.server.engine.store import DocumentStore, NewDocument
from tandem.training.labels import TEXT_PREFIX, LabelError
from tandem.training.pseudo import MIN_REST_WORDS, PREFIX, cloze, inverse_cloze

FILLER = " ".join(f"word{n}" for n in range(MIN_REST_WORDS))
PROSE = (
    "Vicarious trauma is the strain of hearing about other people's suffering at work. "
    f"It builds up slowly in nurses, therapists and aid workers over years. {FILLER}."
)


def stored(tmp_path, texts: dict[str, str]) -> DocumentStore:
    store = DocumentStore(tmp_path / "docs.sqlite")
    store.upsert(
        [NewDocument(id=item, text=text) for item, text in texts.items()],
        np.ones((len(texts), 4), dtype=np.float32),
        [np.zeros(1, dtype=np.int32)] * len(texts),
    )
    return store


def test_a_sentence_becomes_the_query_and_leaves_the_document_without_it() -> None:
    sentence, rest = cloze(PROSE, random.Random(0)) or ("", "")
    assert sentence in {
        "Vicarious trauma is the strain of hearing about other people's suffering at work.",
        "It builds up slowly in nurses, therapists and aid workers over years.",
    }
    assert sentence not in rest
    assert rest.startswith(("Vicarious", "It builds"))
    assert rest.endswith(f"{FILLER}.")


@pytest.mark.parametrize(
    "text",
    [
        "One sentence only, however long it runs on and on without an end in sight at all",
        "Short. Bits. Only.",  # no sentence of a question's length
        "Vicarious trauma is the strain of hearing about suffering at work. Little else.",
    ],
)
def test_text_without_a_question_sized_sentence_and_enough_besides_gives_none(text) -> None:
    assert cloze(text, random.Random(0)) is None


def test_queries_label_both_answers_with_the_top_grade_and_are_seeded(tmp_path) -> None:
    texts = {f"doc{n}": PROSE.replace("work", f"work {n}") for n in range(6)}
    texts["short"] = "Too short to ask about."
    store = stored(tmp_path, texts)
    try:
        made = inverse_cloze(store, count=4, seed=1, grade=3.0)
        assert len(made) == 4
        for item in made:
            document = item.query_id.removeprefix(PREFIX)
            assert document in texts
            assert document != "short"
            assert item.query in texts[document]
            (kept, rest), = item.texts.items()  # fmt: skip
            assert kept.startswith(TEXT_PREFIX)
            assert item.query not in rest
            assert item.grades == {document: 3.0, kept: 3.0}
            assert item.ids == [document]
        again = inverse_cloze(store, count=4, seed=1, grade=3.0)
        assert [(item.query_id, item.query) for item in again] == [
            (item.query_id, item.query) for item in made
        ]
        # Fewer documents that can make one than asked: every one that can, once.
        assert len(inverse_cloze(store, count=50, seed=1, grade=1.0)) == 6
        assert inverse_cloze(store, count=0, seed=1, grade=1.0) == []
    finally:
        store.close()


def test_a_collection_with_no_prose_is_refused_with_what_to_do(tmp_path) -> None:
    store = stored(tmp_path, {"a": "Tiny.", "b": "Also tiny. Yes."})
    try:
        with pytest.raises(LabelError, match="--pseudo-queries needs prose"):
            inverse_cloze(store, count=3, seed=0, grade=1.0)
    finally:
        store.close()
