"""Long documents at rerank time, on real weights: read in windows, scored by the best (MaxP).

The needle is a RAG24 passage judged perfectly relevant to its topic; the hay is passages
judged for other topics. Placed past the reranker's first 512 tokens, the needle is read only
when the document is read in windows.
"""

from __future__ import annotations

import pytest
from serving import rerank_in_process

from tandem.server.engine.collection import TOKEN_CAP_KEY, Collection
from tandem.server.engine.errors import InvalidArgument
from tandem.server.engine.pairs import STORED_TOKENS
from tandem.server.engine.search import DocumentRef, Result
from tandem.server.engine.store import NewDocument
from tandem.server.engine.windows import Reading

pytestmark = [pytest.mark.slow, pytest.mark.reranker]


def rerank(parts, query: str, documents: list[str], reading: Reading, **fields) -> Result:
    refs = [DocumentRef(text=text) for text in documents]
    return rerank_in_process(parts, query, refs, reading=reading, **fields)


@pytest.fixture(scope="module")
def needle_case(data, searcher_parts) -> tuple[str, str, str, str]:
    """(query, needle, long document with the needle past token 512, hay of the same length)."""
    pairs = searcher_parts[3]
    texts = {segment.id: segment.text for segment in data.segments}
    for topic in data.topics:
        best = [sid for sid, grade in data.umbrela.get(topic.id, {}).items() if grade == 3]
        if best and best[0] in texts:
            query, needle = topic.query, texts[best[0]]
            break
    judged = {sid for grades in data.umbrela.values() for sid in grades}
    relevant_here = set(data.umbrela.get(topic.id, {}))
    hay = [s.text for s in data.segments if s.id in judged and s.id not in relevant_here]
    prefix, extra = "", iter(hay)
    while len(pairs.tokenize_whole([prefix])[0]) < 700:
        prefix += next(extra) + "\n\n"
    long_document = prefix + needle
    more_hay = prefix + next(extra)
    return query, needle, long_document, more_hay


def test_a_relevant_passage_past_token_512_is_found_only_in_windows(
    searcher_parts, needle_case
) -> None:
    query, needle, long_document, hay = needle_case
    documents = [hay, long_document]
    windows = rerank(searcher_parts, query, documents, Reading(max_windows=10), budget_s=None)
    first = rerank(searcher_parts, query, documents, Reading(max_windows=1), budget_s=None)
    alone = rerank(searcher_parts, query, [needle], Reading(max_windows=1), budget_s=None)
    by_id = {hit.id: hit for hit in windows.hits}
    found = by_id["1"]
    # Chunked: the needle's window wins the document, and the passage quoted holds it.
    assert windows.hits[0].id == "1"
    assert found.passage is not None
    assert found.passage.windows > 1
    assert found.passage.windows_scored == found.passage.windows
    start = long_document.index(needle)
    assert found.passage.start <= start + 50
    assert found.passage.end >= start + 50
    assert long_document[found.passage.start : found.passage.end] in long_document
    assert not found.truncated
    assert found.rerank_score is not None
    assert alone.hits[0].rerank_score is not None
    # Chunking off: only the hay before the needle is read; the document is flagged cut.
    missed = {hit.id: hit for hit in first.hits}["1"]
    assert missed.truncated
    assert missed.passage is not None
    assert missed.passage.end < start
    assert missed.rerank_score is not None
    assert found.rerank_score - missed.rerank_score > 1.0
    assert abs(found.rerank_score - alone.hits[0].rerank_score) < abs(
        missed.rerank_score - alone.hits[0].rerank_score
    )


def test_under_a_deadline_first_windows_come_before_second_ones(
    searcher_parts, needle_case
) -> None:
    query, _, long_document, hay = needle_case
    documents = [long_document, hay] * 6
    # About 36 windows of ~512 tokens: more than 1 s scores on 2 cores.
    result = rerank(
        searcher_parts, query, documents, Reading(max_windows=10), budget_s=1.0, top_n=None
    )
    counts = [hit.passage.windows_scored if hit.passage else 0 for hit in result.hits]
    assert result.reranked_count == sum(1 for count in counts if count) >= 1
    # Depth before length: no document has a second window scored while one has none.
    assert max(counts) <= 1 or min(counts) >= 1, counts
    assert all(
        hit.passage.partly_scored == (hit.passage.windows_scored < hit.passage.windows)
        for hit in result.hits
        if hit.passage is not None
    )


def test_refusal_past_the_window_cap_when_truncate_is_off(searcher_parts, needle_case) -> None:
    query, _, long_document, _ = needle_case
    with pytest.raises(InvalidArgument, match="do not fit the reranker's 1 windows"):
        rerank(
            searcher_parts, query, [long_document], Reading(max_windows=1), budget_s=None,
            truncate=False,
        )  # fmt: skip
    whole = rerank(
        searcher_parts, query, [long_document], Reading(max_windows=10), budget_s=None,
        truncate=False,
    )  # fmt: skip
    assert not whole.hits[0].truncated


def rerank_stored(
    collection: Collection, parts, query: str, refs: list[str], reading: Reading
) -> Result:
    stored = [DocumentRef(id=ref) for ref in refs]
    return rerank_in_process(
        (collection, *parts[1:]), query, stored, reading=reading, budget_s=None
    )


def test_stored_long_documents_are_read_in_windows_too(
    searcher_parts, needle_case, monkeypatch
) -> None:
    query, needle, long_document, hay = needle_case
    collection, _, _, pairs = searcher_parts
    collection.upsert([NewDocument("long", long_document, {}), NewDocument("hay", hay, {})])
    refs = ["hay", "long"]
    whole = pairs.tokenize_whole([long_document])[0]
    assert collection.token_cap == STORED_TOKENS
    assert collection.store.by_ids(["long"])["long"].token_ids.tolist() == whole.tolist()

    sent = rerank(
        searcher_parts, query, [hay, long_document], Reading(max_windows=10), budget_s=None
    )
    # Stored whole at index time: reading them in windows tokenizes no document again.
    monkeypatch.setattr(pairs, "tokenize_whole", _no_tokenizing)
    stored = rerank_stored(collection, searcher_parts, query, refs, Reading(max_windows=10))
    assert stored.hits[0].id == "long"
    got = {hit.id: hit.rerank_score for hit in stored.hits}
    want = {refs[int(hit.id)]: hit.rerank_score for hit in sent.hits}
    assert got == pytest.approx(want, abs=0.05)
    hit = stored.hits[0]
    assert hit.passage is not None
    assert needle[:40] in long_document[hit.passage.start : hit.passage.end]


def _no_tokenizing(texts: list[str]) -> None:
    raise AssertionError(f"tokenized {len(texts)} documents again at query time")


def test_a_collection_that_kept_a_pair_of_ids_is_read_whole_and_upgraded_once(
    tmp_path, searcher_parts, needle_case
) -> None:
    query, _, long_document, hay = needle_case
    _, embedder, _, pairs = searcher_parts
    whole = pairs.tokenize_whole([long_document])[0]
    legacy_cap = pairs.template.max_length + 1
    built = Collection(tmp_path, embedder=embedder, pairs=pairs)
    built.upsert([NewDocument("long", long_document, {}), NewDocument("hay", hay, {})])
    # As a collection written before whole ids were kept: one id past a pair, no cap recorded.
    key = built.store.by_ids(["long"])["long"].key
    built.store.replace_token_ids([key], [whole[:legacy_cap]])
    with built.store._transaction():
        built.store.db.execute("DELETE FROM meta WHERE name = ?", (TOKEN_CAP_KEY,))
    built.close()

    served = Collection(tmp_path, embedder=embedder, pairs=pairs, read_only=True)
    try:
        assert served.token_cap == legacy_cap
        old = rerank_stored(served, searcher_parts, query, ["hay", "long"], Reading(max_windows=10))
    finally:
        served.close()
    assert old.hits[0].id == "long"
    assert old.hits[0].passage is not None
    assert old.hits[0].passage.windows > 1

    upgraded = Collection(tmp_path, embedder=embedder, pairs=pairs)
    try:
        assert upgraded.token_cap == STORED_TOKENS
        assert upgraded.store.get_meta(TOKEN_CAP_KEY) == str(STORED_TOKENS)
        assert upgraded.store.by_ids(["long"])["long"].token_ids.tolist() == whole.tolist()
        new = rerank_stored(
            upgraded, searcher_parts, query, ["hay", "long"], Reading(max_windows=10)
        )
    finally:
        upgraded.close()
    assert [hit.rerank_score for hit in new.hits] == pytest.approx(
        [hit.rerank_score for hit in old.hits], abs=1e-5
    )
