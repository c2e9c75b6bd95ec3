"""Joining stored document ids with a query gives exactly what the tokenizer gives for the pair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from tandem.encoders import load_tokenizer, pad_encodings
from tandem.server.engine.pairs import PairTokenizer, Windows, longest_first, pad_pairs


@pytest.mark.parametrize("max_length", [512, 96, 24])
def test_join_matches_the_tokenizer_on_real_pairs(
    reranker_path: Path, data, max_length: int
) -> None:
    reference = load_tokenizer(reranker_path, max_length=max_length)
    pairs = PairTokenizer(reference, max_length=max_length)
    documents = [segment.text for segment in data.segments[:60]] + ["", "x", "word " * 700]
    queries = [topic.query for topic in data.topics[:4]] + ["a " * 40]
    stored = pairs.tokenize(documents)
    for query in queries:
        query_ids = pairs.tokenize([query])[0]
        joined = pad_pairs(pairs.join(query_ids, stored))
        expected = pad_encodings(reference.encode_batch([(query, doc) for doc in documents]))
        assert joined.input_ids.tolist() == expected.input_ids.tolist()
        assert joined.token_type_ids.tolist() == expected.token_type_ids.tolist()
        assert joined.attention_mask.tolist() == expected.attention_mask.tolist()
        assert joined.truncated.tolist() == expected.truncated.tolist()


def test_document_cap_keeps_the_first_tokens_and_flags_the_cut(reranker_path: Path, data) -> None:
    # max_tokens_per_doc: the pair equals the tokenizer's pair of the first `cap` tokens.
    reference = load_tokenizer(reranker_path, max_length=512)
    pairs = PairTokenizer(reference, max_length=512)
    query, text = data.topics[0].query, data.segments[0].text
    query_ids, document_ids = pairs.tokenize([query])[0], pairs.tokenize([text])[0]
    cap = 12
    assert len(document_ids) > cap
    joined = pairs.join(query_ids, [document_ids], document_cap=cap)[0]
    cut_text = reference.decode(document_ids[:cap].tolist())
    expected = reference.encode(query, cut_text)
    assert joined.input_ids.tolist() == expected.ids
    assert joined.truncated
    whole = pairs.join(query_ids, [document_ids], document_cap=len(document_ids))[0]
    assert not whole.truncated
    assert len(whole) == len(reference.encode(query, text).ids)


@pytest.mark.parametrize(
    ("first", "second", "budget", "kept"),
    [(5, 5, 20, (5, 5)), (3, 30, 20, (3, 17)), (30, 3, 20, (17, 3)), (30, 40, 21, (10, 11)),
     (40, 30, 21, (11, 10)), (12, 12, 20, (10, 10))],
)  # fmt: skip
def test_longest_first_rule(first: int, second: int, budget: int, kept: tuple[int, int]) -> None:
    assert longest_first(first, second, budget) == kept
    assert sum(kept) <= budget


def test_padding_marks_only_real_tokens(reranker_path: Path) -> None:
    pairs = PairTokenizer(load_tokenizer(reranker_path, max_length=64), max_length=64)
    query = pairs.tokenize(["q"])[0]
    batch = pad_pairs(pairs.join(query, pairs.tokenize(["short", "a much longer document text"])))
    assert batch.attention_mask.sum(axis=1).tolist() == [
        len(p) for p in pairs.join(query, pairs.tokenize(["short", "a much longer document text"]))
    ]
    assert np.all(batch.input_ids[batch.attention_mask == 0] == 0)


def test_windows_read_a_long_document_whole_with_overlap(reranker_path: Path, data) -> None:
    reference = load_tokenizer(reranker_path, max_length=64)
    pairs = PairTokenizer(reference, max_length=64)
    text = " ".join(segment.text for segment in data.segments[:4])
    query_ids = pairs.tokenize([data.topics[0].query])[0]
    document = pairs.tokenize_whole([text])[0]
    assert len(document) > 300
    read = pairs.template.windows(query_ids, document, max_windows=100, overlap=8)
    first = pairs.join(query_ids, [document])[0]
    width = first.keep_document
    assert not read.cut
    assert read.pairs[0].input_ids.tolist() == first.input_ids.tolist()
    starts = [pair.start for pair in read.pairs]
    assert starts[:-1] == list(range(0, width * len(starts), width - 8))[: len(starts) - 1]
    assert read.pairs[-1].end == len(document)  # the last window ends at the document's end
    assert all(len(pair) <= 64 and pair.keep_document == width for pair in read.pairs)
    for pair in read.pairs:  # each window is the query with exactly that slice of the document
        ids = pair.input_ids.tolist()
        assert ids[-(width + 1) : -1] == document[pair.start : pair.end].tolist()
    capped = pairs.template.windows(query_ids, document, max_windows=3, overlap=8)
    assert capped.cut
    assert [pair.start for pair in capped.pairs] == starts[:3]
    # An overlap past half a window is held to half: the document still moves forward.
    wide = pairs.template.windows(query_ids, document, max_windows=100, overlap=10_000)
    assert wide.pairs[1].start == (width + 1) // 2
    short = pairs.template.windows(query_ids, document[:10], max_windows=100, overlap=8)
    assert (len(short.pairs), short.cut) == (1, False)
    off = pairs.template.windows(query_ids, document, max_windows=1, overlap=8)
    assert off.cut
    assert off.pairs[0].input_ids.tolist() == first.input_ids.tolist()


def test_window_spans_are_the_characters_of_their_tokens(reranker_path: Path, data) -> None:
    reference = load_tokenizer(reranker_path, max_length=512)
    pairs = PairTokenizer(reference, max_length=512)
    text = "Café naïve, straße — " + data.segments[0].text
    ids = pairs.tokenize_whole([text])[0]
    start, end = pairs.span(text, 0, len(ids))
    assert (start, end) == (0, len(text.rstrip()))
    offsets = reference.encode(text, add_special_tokens=False).offsets
    assert pairs.span(text, 5, 9) == (offsets[5][0], offsets[8][1])


def test_a_span_read_from_a_prefix_is_the_span_of_the_whole_text(reranker_path: Path, data) -> None:
    # A window deep in a 10,000-word document, early in it, at its very end, and texts
    # whose spaces come doubled, after newlines, or not at all for a long stretch.
    reference = load_tokenizer(reranker_path, max_length=512)
    pairs = PairTokenizer(reference, max_length=512)
    reference.no_truncation()
    long = " ".join(segment.text for segment in data.segments[:60])
    texts = [
        long,
        "Café  naïve,\n\nstraße — " + data.segments[1].text.replace(" ", "  "),
        "x" * 5000 + " " + data.segments[2].text,
        "数据" * 300 + " " + data.segments[3].text,
    ]
    for text in texts:
        offsets = reference.encode(text, add_special_tokens=False).offsets
        count = len(offsets)
        ends = [(0, 1), (0, 510), (5, 9), (count // 2, count // 2 + 510), (count - 510, count),
                (count - 1, count), (count - 3, count + 40)]  # fmt: skip
        for start, end in ((max(0, start), end) for start, end in ends):
            expected = (offsets[start][0], offsets[min(end, count) - 1][1])
            assert pairs.span(text, start, end) == expected, (text[:30], start, end)


@pytest.mark.parametrize("max_windows", [1, 2, 3, 10])
@pytest.mark.parametrize("document_cap", [None, 40, 90])
def test_stored_ids_complete_enough_give_the_windows_of_the_whole(
    reranker_path: Path, max_windows: int, document_cap: int | None
) -> None:
    # A store that cut a document at `kept` ids may serve its windows from them only where
    # complete_enough says so: those windows must then be the whole document's, id for id.
    pairs = PairTokenizer(load_tokenizer(reranker_path, max_length=24), max_length=24)
    whole = np.arange(1000, 1300, dtype=np.int32)
    query = np.arange(5, dtype=np.int32)
    served = 0
    for kept in (25, 40, 49, 73, 97, 250, 300, 301):
        stored = whole[:kept]
        if not pairs.complete_enough(len(stored), kept, max_windows=max_windows):
            assert max_windows > 1
            continue
        served += 1
        stored_windows, whole_windows = (
            pairs.template.windows(
                query, document, document_cap=document_cap, max_windows=max_windows, overlap=4
            )
            for document in (stored, whole)
        )
        assert layout(stored_windows) == layout(whole_windows)
    assert served >= 2


def layout(windows: Windows) -> tuple[list[tuple[int, int, bool, list[int]]], bool]:
    pairs = [(p.start, p.end, p.truncated, p.input_ids.tolist()) for p in windows.pairs]
    return pairs, windows.cut


def test_rerankers_of_two_lengths_read_the_same_stored_ids(reranker_path: Path) -> None:
    # A collection stores whole ids, so a reranker trained (and exported) at 128 tokens may
    # replace the 512-token one it was built with; one that lowercases differently may not.
    serving = PairTokenizer(load_tokenizer(reranker_path, max_length=512), max_length=512)
    shorter = PairTokenizer(load_tokenizer(reranker_path, max_length=128), max_length=128)
    assert serving.same_ids_as(shorter)
    assert shorter.same_ids_as(serving)
    spec = json.loads(load_tokenizer(reranker_path, max_length=512).to_str())
    spec["normalizer"]["lowercase"] = False
    cased = PairTokenizer(Tokenizer.from_str(json.dumps(spec)), max_length=512)
    assert not serving.same_ids_as(cased)
