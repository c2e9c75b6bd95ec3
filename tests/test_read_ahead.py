"""A budgeted call reads only the candidates its budget can reach (``READ_AHEAD``).

Tokenizing 890 RAG24 passages took twice the default budget on 2 cores; a call now
tokenizes candidates in order, a chunk at a time, until their first windows hold the tokens
the model could score in the time left (twice over), and leaves the rest unread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving import rerank_in_process

from tandem.encoders import load_tokenizer
from tandem.server.engine.batcher import BatchLimits, CostModel
from tandem.server.engine.pairs import STORED_TOKENS, Ids, PairTokenizer, Windows
from tandem.server.engine.search import (
    READ_AHEAD,
    READ_AHEAD_STORED,
    READ_CHUNK,
    Candidate,
    DocumentRef,
    Result,
    Searcher,
)
from tandem.server.engine.windows import Reading

MAX_LENGTH = 512


@pytest.fixture(scope="module")
def pairs(reranker_path: Path) -> PairTokenizer:
    return PairTokenizer(
        load_tokenizer(reranker_path, max_length=MAX_LENGTH), max_length=MAX_LENGTH
    )


@pytest.fixture(scope="module")
def texts(data) -> list[str]:
    return [segment.text for segment in data.segments[:200]]


def read(
    pairs: PairTokenizer,
    texts: list[str],
    *,
    reach: int | None,
    at_least: int = 0,
    max_windows: int = 1,
    stored: list[Ids] | None = None,
) -> list[Windows]:
    """``texts`` as a Rerank sends them, or as a Search finds them, with ``stored`` ids."""
    ids = stored or [np.zeros(0, dtype=np.int32)] * len(texts)
    candidates = [Candidate(str(i), text, {}, ids[i], None) for i, text in enumerate(texts)]
    return Searcher._windows(
        pairs, "what is vicarious trauma?", candidates, [stored is None] * len(texts), None,
        Reading(max_windows=max_windows), STORED_TOKENS, reach, at_least,
    )  # fmt: skip


def layout(windows: Windows) -> tuple[list[list[int]], bool]:
    return [pair.assemble().input_ids.tolist() for pair in windows.pairs], windows.cut


def counting(pairs: PairTokenizer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patches both of ``pairs``' document tokenizers to record how many texts each call took."""
    sizes: list[int] = []
    for name in ("tokenize", "tokenize_whole"):
        original = getattr(pairs, name)

        def spy(batch, original=original):  # type: ignore[no-untyped-def]
            sizes.append(len(batch))
            return original(batch)

        monkeypatch.setattr(pairs, name, spy)
    return sizes


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("max_windows", [1, 10])
@pytest.mark.parametrize("reach", [1, 300, 1200])
def test_a_reach_reads_a_prefix_just_past_it_and_tokenizes_nothing_more(
    pairs: PairTokenizer,
    texts: list[str],
    reach: int,
    max_windows: int,
    stored: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = pairs.tokenize_stored(texts) if stored else None
    everything = read(pairs, texts, reach=None, max_windows=max_windows, stored=ids)
    assert len(everything) == len(texts)
    # Texts are read READ_AHEAD times past the reach; stored ids, which need no tokenizer,
    # READ_AHEAD_STORED times.
    ahead = READ_AHEAD_STORED if stored else READ_AHEAD
    firsts = np.cumsum([len(windows.pairs[0]) for windows in everything]) / ahead
    needed = int(np.searchsorted(firsts, reach)) + 1  # the fewest that reach it
    sizes = counting(pairs, monkeypatch)
    got = read(pairs, texts, reach=reach, max_windows=max_windows, stored=ids)
    prefix = len(got)  # the windows of the candidates read, which come first
    assert needed <= prefix <= 2 * needed + READ_CHUNK < len(texts)
    # The prefix reads exactly as reading everything would, and only it was tokenized.
    assert [layout(w) for w in got[:prefix]] == [layout(w) for w in everything[:prefix]]
    assert sum(sizes) == (0 if stored else prefix) + 1  # and the query


def test_at_least_reads_past_the_reach(pairs: PairTokenizer, texts: list[str]) -> None:
    got = read(pairs, texts, reach=1, at_least=30)
    assert 30 <= len(got) < len(texts)


def rerank(parts, texts: list[str], budget_s: float | None, **fields: Any) -> Result:
    refs = [DocumentRef(text=text) for text in texts]
    query = "what is vicarious trauma?"
    return rerank_in_process(parts, query, refs, budget_s=budget_s, top_n=None, **fields)


@pytest.mark.slow
@pytest.mark.reranker
def test_a_budgeted_rerank_tokenizes_only_what_it_can_score(
    searcher_parts, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = counting(searcher_parts[3], monkeypatch)
    # 0.5 s reaches ~40 of 200 RAG24 passages at the batcher's first rate (1e-4 s a token).
    result = rerank(searcher_parts, texts, 0.5)
    tokenized = sum(sizes) - 1
    assert result.reranked_count >= 1
    assert tokenized < len(texts)
    scored = {int(hit.id): hit.rerank_score for hit in result.hits if hit.rerank_score is not None}
    assert max(scored) < tokenized
    # What was scored is what scoring those passages with no budget gives, within what a
    # pair's INT8 score moves with the pairs it is batched with (the budget forms other
    # batches; 0.0011 was seen on OpenVINO static INT8, up to ~0.1 on onnxruntime's
    # dynamic INT8: test_http_api). A passage scored as another would be off by logits.
    alone = rerank(searcher_parts, texts[:tokenized], None)
    expected = {int(hit.id): hit.rerank_score for hit in alone.hits}
    for position, score in scored.items():
        assert score == pytest.approx(expected[position], abs=0.1)
    assert np.ptp(list(expected.values())) > 1.0  # scores that a swap would give away
    # Without truncate every passage is read, since one cut anywhere refuses the call.
    sizes.clear()
    rerank(searcher_parts, texts, 0.5, truncate=False)
    assert sum(sizes) - 1 == len(texts)


@pytest.mark.slow
@pytest.mark.reranker
def test_a_round_scored_with_time_to_spare_reads_on(searcher_parts, texts: list[str]) -> None:
    # A rate 16 times too slow (a slow spell just ended) reaches about 8 of these passages
    # in 1 s; their batches teach the batcher the real rate and leave time, so later rounds
    # read and score more of them.
    slow = CostModel(seconds_per_token=1e-3)
    reach = max(int(1.0 / 1e-3), BatchLimits().max_batch_tokens)  # as _score_within has it
    first_round = read(searcher_parts[3], texts, reach=reach)
    reachable = len(first_round)
    result = rerank(searcher_parts, texts, 1.0, cost=slow)
    scored = {int(hit.id) for hit in result.hits if hit.rerank_score is not None}
    assert result.reranked_count > reachable
    assert set(range(reachable)) <= scored
