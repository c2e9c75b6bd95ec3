"""Builds cross-encoder inputs from stored document ids: only the query is tokenized per request.

Tokenizing 100 (query, passage) pairs costs 15-45 ms on these cores; joining stored ids costs
well under 1 ms. The join must give exactly the ids the tokenizer would, so the special-token
layout is learned from the tokenizer itself and truncation follows its `longest_first` rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer

from tandem.artifact import open_checked
from tandem.encoders import CrossEncoder, TokenBatch, load_tokenizer, pad_rows
from tandem.tokens import window_starts

Ids = NDArray[np.int32]

# A stored document keeps at most this many of its ids: 64 windows (the most a call may ask
# for) of a 512-token reranker read fewer, so a call re-tokenizes a stored text only beyond
# that (``PairTokenizer.complete_enough``). At 4 bytes an id, 128 KiB a document at most.
STORED_TOKENS = 32_768


@dataclass(frozen=True)
class _Segment:
    ids: tuple[int, ...]
    types: tuple[int, ...]


@dataclass(frozen=True)
class PairTemplate:
    """``prefix + query + middle + document + suffix``, with each part's token type ids."""

    prefix: _Segment
    middle: _Segment
    suffix: _Segment
    query_type: int
    document_type: int
    max_length: int

    @property
    def specials(self) -> int:
        return len(self.prefix.ids) + len(self.middle.ids) + len(self.suffix.ids)

    @property
    def layout(self) -> tuple[_Segment, _Segment, _Segment, int, int]:
        """Everything but the length: how a query and a document become one pair."""
        return (self.prefix, self.middle, self.suffix, self.query_type, self.document_type)

    @classmethod
    def learn(cls, tokenizer: Tokenizer, *, max_length: int) -> PairTemplate:
        """Reads the layout off the tokenizer's own encoding of a probe pair."""
        first = tokenizer.encode("first", add_special_tokens=False).ids
        second = tokenizer.encode("second", add_special_tokens=False).ids
        pair = tokenizer.encode("first", "second")
        ids, types = pair.ids, pair.type_ids
        start = _find(ids, first, 0)
        middle_start = start + len(first)
        second_start = _find(ids, second, middle_start)
        suffix_start = second_start + len(second)
        return cls(
            prefix=_Segment(tuple(ids[:start]), tuple(types[:start])),
            middle=_Segment(
                tuple(ids[middle_start:second_start]), tuple(types[middle_start:second_start])
            ),
            suffix=_Segment(tuple(ids[suffix_start:]), tuple(types[suffix_start:])),
            query_type=types[start],
            document_type=types[second_start],
            max_length=max_length,
        )

    def join(self, query: Ids, document: Ids, *, document_cap: int | None = None) -> JoinedPair:
        """``document_cap``: at most this many of the document's tokens (Cohere's
        ``max_tokens_per_doc``); a document cut by it counts as truncated."""
        length = len(document) if document_cap is None else min(len(document), document_cap)
        keep_query, keep_document = longest_first(
            len(query), length, self.max_length - self.specials
        )
        return JoinedPair(self, query, document, keep_query, keep_document)

    def windows(
        self,
        query: Ids,
        document: Ids,
        *,
        document_cap: int | None = None,
        max_windows: int = 1,
        overlap: int = 0,
    ) -> Windows:
        """The document in overlapping windows, each paired with the same (kept) query.

        The first window is ``join``'s pair. A longer document gets windows as wide as the
        first, each starting ``overlap`` tokens (at most half a window) before the previous
        one ends, the last one ending at the document's end, and at most ``max_windows`` of
        them; what no window reaches is cut, and flagged."""
        first = self.join(query, document, document_cap=document_cap)
        length = len(document) if document_cap is None else min(len(document), document_cap)
        width = first.keep_document
        if length <= width or max_windows <= 1 or width == 0:
            return Windows((first,), cut=first.truncated)
        starts, past = window_starts(length, width, overlap=overlap, cap=max_windows)
        pairs = tuple(
            JoinedPair(self, query, document, first.keep_query, width, start) for start in starts
        )
        cut = first.keep_query < len(query) or past or length < len(document)
        return Windows(pairs, cut=cut)


@dataclass(frozen=True, slots=True)
class JoinedPair:
    """One (query, document) pair, cut to fit the reranker. Its ids are assembled only when
    read, by the batch that runs it: under a budget most candidates are never scored, and
    assembling all 100 of a call's pairs up front took a fifth of the event loop's time."""

    template: PairTemplate
    query: Ids
    document: Ids
    keep_query: int
    keep_document: int
    start: int = 0  # the document's first token in this pair (a later window's is past 0)

    @property
    def end(self) -> int:
        """One past the document's last token in this pair."""
        return self.start + self.keep_document

    def __len__(self) -> int:
        return self.template.specials + self.keep_query + self.keep_document

    def assemble(self) -> PairIds:
        return PairIds(self.input_ids, self.token_type_ids, self.truncated)

    @property
    def truncated(self) -> bool:
        return self.keep_query < len(self.query) or self.end < len(self.document) or self.start > 0

    @property
    def input_ids(self) -> NDArray[np.int64]:
        template = self.template
        parts = (
            template.prefix.ids,
            self.query[: self.keep_query],
            template.middle.ids,
            self.document[self.start : self.end],
            template.suffix.ids,
        )
        return np.concatenate([np.asarray(part, dtype=np.int64) for part in parts])

    @property
    def token_type_ids(self) -> NDArray[np.int64]:
        template = self.template
        parts = (
            template.prefix.types,
            (template.query_type,) * self.keep_query,
            template.middle.types,
            (template.document_type,) * self.keep_document,
            template.suffix.types,
        )
        return np.concatenate([np.asarray(part, dtype=np.int64) for part in parts])


@dataclass(frozen=True)
class Windows:
    """A document's pairs with the query: one, or several overlapping windows of it."""

    pairs: tuple[JoinedPair, ...]
    cut: bool  # some of the query or the document is in no window


@dataclass(frozen=True)
class PairIds:
    """A pair's model inputs, assembled (see ``JoinedPair``)."""

    input_ids: NDArray[np.int64]
    token_type_ids: NDArray[np.int64]
    truncated: bool

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class HasPairIds(Protocol):
    @property
    def input_ids(self) -> NDArray[np.int64]: ...

    @property
    def token_type_ids(self) -> NDArray[np.int64]: ...

    @property
    def truncated(self) -> bool: ...


def longest_first(first: int, second: int, budget: int) -> tuple[int, int]:
    """How many tokens of each sequence the tokenizers library keeps under ``longest_first``."""
    if first + second <= budget:
        return first, second
    swapped = first > second
    short, long = (second, first) if swapped else (first, second)
    long = max(short, budget - short)
    if short + long > budget:
        short = budget // 2
        long = short + budget % 2
    return (long, short) if swapped else (short, long)


def _find(haystack: Sequence[int], needle: Sequence[int], start: int) -> int:
    for position in range(start, len(haystack) - len(needle) + 1):
        if list(haystack[position : position + len(needle)]) == list(needle):
            return position
    raise ValueError("the tokenizer's pair encoding does not contain its parts")


# A first guess at the characters that hold a window's tokens, generous for English (about
# 4.5 characters a token) so that one prefix mostly suffices.
SPAN_CHARS_PER_TOKEN = 6


class PairTokenizer:
    """Tokenizes documents once (for the store) and queries per request, then joins them."""

    def __init__(self, tokenizer: Tokenizer, *, max_length: int) -> None:
        self.template = PairTemplate.learn(tokenizer, max_length=max_length)
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_padding()
        # One token more than any pair can hold, so a join can tell that a document was cut.
        self.tokenizer.enable_truncation(max_length + 1)
        # Whole texts, for documents read in several windows, and the character spans of
        # their tokens, for the window a reply quotes.
        self.whole = Tokenizer.from_str(tokenizer.to_str())
        self.whole.no_padding()
        self.whole.no_truncation()

    @classmethod
    def for_reranker(cls, reranker: CrossEncoder) -> PairTokenizer:
        return cls(reranker.tokenizer, max_length=reranker.manifest.max_length)

    @classmethod
    def from_artifact(cls, folder: Path) -> PairTokenizer:
        """The reranker's pair tokenizer without loading its model (for indexing)."""
        manifest = open_checked(folder, "cross-encoder")
        tokenizer = load_tokenizer(folder, max_length=manifest.max_length)
        return cls(tokenizer, max_length=manifest.max_length)

    def same_ids_as(self, other: PairTokenizer) -> bool:
        """Whether both give every text the same ids and every pair the same layout, so that
        documents tokenized by one can be scored by the other's model. The vocabulary, the
        layout and a probe of the normalizer and pre-tokenizer (case, accents, codes).

        The two lengths may differ: documents are stored whole (up to ``STORED_TOKENS``)
        and each reranker reads them in windows of its own length. A reranker trained at
        128 tokens scores best served at 128 (RESULTS), beside a collection built with a
        512-token one."""
        probe = ["Café CLUB naïve 12-b e-mail ÜBER straße", "what is vicarious trauma?"]
        return (
            self.template.layout == other.template.layout
            and self.tokenizer.get_vocab() == other.tokenizer.get_vocab()
            and self.tokenize(probe)[0].tolist() == other.tokenize(probe)[0].tolist()
            and self.tokenize(probe)[1].tolist() == other.tokenize(probe)[1].tolist()
        )

    def tokenize(self, texts: Sequence[str]) -> list[Ids]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

    def tokenize_whole(self, texts: Sequence[str]) -> list[Ids]:
        encodings = self.whole.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

    def tokenize_stored(self, texts: Sequence[str]) -> list[Ids]:
        """Ids as the store keeps them: whole, up to ``STORED_TOKENS``, so that reading a
        stored document in windows needs no tokenizer at query time."""
        return [ids[:STORED_TOKENS] for ids in self.tokenize_whole(texts)]

    def complete_enough(self, stored: int, kept: int, *, max_windows: int) -> bool:
        """Whether ``stored`` ids, kept by a store that cuts at ``kept``, give ``max_windows``
        windows exactly as the whole text would: either they are the whole text, or those
        windows run out before the cut (each reads under ``max_length`` of them)."""
        return stored < kept or max_windows * self.template.max_length < kept

    def span(self, text: str, start: int, end: int) -> tuple[int, int]:
        """The characters of ``text`` that its tokens ``start`` to ``end`` (exclusive) cover.

        Tokenizes only a prefix of ``text`` that reaches past token ``end``, longer each try:
        a reply quotes its documents' winning windows after the budget is spent, and the
        whole of a 10,000-word document took ~25 ms to tokenize again, each (2 cores).
        A prefix cut at a space begins with the tokens the whole text begins with (the
        pre-tokenizers split there); only its last token may differ (trailing whitespace
        in byte-level BPE), so the prefix must hold one token past ``end``."""
        if end <= start:
            return 0, 0
        chars = SPAN_CHARS_PER_TOKEN * (end + 1)
        while True:
            cut = text.rfind(" ", 0, chars) if chars < len(text) else -1
            prefix = text[:cut] if cut > 0 else text
            offsets = self.whole.encode(prefix, add_special_tokens=False).offsets
            if cut <= 0 or len(offsets) > end:
                break
            chars *= 2
        if not offsets:
            return 0, 0
        return offsets[start][0], offsets[min(end, len(offsets)) - 1][1]

    def join(
        self, query: Ids, documents: Sequence[Ids], *, document_cap: int | None = None
    ) -> list[JoinedPair]:
        return [
            self.template.join(query, document, document_cap=document_cap) for document in documents
        ]


def pad_pairs(pairs: Sequence[HasPairIds], *, pad_id: int = 0) -> TokenBatch:
    return pad_rows(
        [pair.input_ids for pair in pairs],
        [pair.token_type_ids for pair in pairs],
        [pair.truncated for pair in pairs],
        pad_id=pad_id,
    )
