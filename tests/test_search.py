"""The search pipeline on real weights: modes, budgets, and parity with the seeds' pipeline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tandem.encoders import BiEncoder, CrossEncoder
from tandem.export import reference
from tandem.export.pipeline import ExportRequest, export_model
from tandem.export.verify import Sample
from tandem.server.engine.batcher import RerankBatcher
from tandem.server.engine.collection import Collection
from tandem.server.engine.errors import InvalidArgument, NotFound
from tandem.server.engine.index import IndexSettings
from tandem.server.engine.pairs import PairTokenizer
from tandem.server.engine.requests import (
    REPLY_MARGIN_S,
    SearchRequest,
    budget_seconds,
    check_search,
)
from tandem.server.engine.search import Mode, Searcher, make_runner
from tandem.server.engine.store import NewDocument
from tandem.server.settings import Settings

pytestmark = pytest.mark.slow
CORPUS = 300


def corpus(data) -> list[NewDocument]:
    return [
        NewDocument(id=segment.id, text=segment.text, metadata={"n": position % 3})
        for position, segment in enumerate(data.segments[:CORPUS])
    ]


def serve(
    folder: Path, bi: Path, ce: Path, body, *, documents=None, dtype: str = "i8", max_passages=64
):
    """Opens the collection (adding ``documents`` if given) and runs ``body(searcher)``."""
    embedder = BiEncoder(bi)
    reranker = CrossEncoder(ce)
    pairs = PairTokenizer.for_reranker(reranker)
    collection = Collection(
        folder, embedder=embedder, pairs=pairs,
        settings=IndexSettings(dtype=dtype, max_passages=max_passages),
    )  # fmt: skip
    if documents:
        collection.upsert(documents)

    async def scenario():
        batcher = RerankBatcher(make_runner(reranker))
        await batcher.start()
        try:
            return await body(
                Searcher(
                    collection, embedder=embedder, reranker=reranker, pairs=pairs, batcher=batcher
                )
            )
        finally:
            await batcher.stop()

    try:
        return asyncio.run(scenario())
    finally:
        collection.close()


@pytest.fixture(scope="module")
def int8_parts(tmp_path_factory, bi_int8, ce_int8, data):
    folder = tmp_path_factory.mktemp("collection")
    serve(folder, bi_int8[0], ce_int8[0], _noop, documents=corpus(data))
    return folder, bi_int8[0], ce_int8[0]


async def _noop(searcher):
    return None


def scenario(parts, body):
    folder, bi, ce = parts
    return serve(folder, bi, ce, body)


def test_two_stage_reranks_every_candidate_without_a_deadline(int8_parts, data) -> None:
    query = data.topics[0].query
    result = scenario(int8_parts, lambda s: s.search(query, recall_k=20, top_n=5, budget_s=None))
    assert result.candidates == 20
    assert result.reranked_count == 20
    assert len(result.hits) == 5
    scores = [hit.rerank_score for hit in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(hit.stage1_score is not None and hit.text for hit in result.hits)
    assert {"embed", "search", "tokenize", "rerank"} <= set(result.timings_ms)


def test_retrieve_only_keeps_stage_one_order(int8_parts, data) -> None:
    query = data.topics[1].query
    result = scenario(
        int8_parts,
        lambda s: s.search(
            query, recall_k=50, top_n=10, mode=Mode.RETRIEVE_ONLY, include_text=False
        ),
    )
    assert result.reranked_count == 0
    assert [hit.stage1_rank for hit in result.hits] == list(range(10))
    similarities = [hit.stage1_score for hit in result.hits]
    assert similarities == sorted(similarities, reverse=True)
    assert all(hit.text is None and hit.rerank_score is None for hit in result.hits)


def test_budget_too_small_returns_stage_one_order_unscored(int8_parts, data) -> None:
    query = data.topics[2].query
    result = scenario(int8_parts, lambda s: s.search(query, recall_k=30, top_n=5, budget_s=0.0005))
    assert result.reranked_count < result.candidates
    unscored = [hit for hit in result.hits if hit.rerank_score is None]
    assert [hit.stage1_rank for hit in unscored] == sorted(hit.stage1_rank for hit in unscored)


def test_metadata_filter_keeps_only_matching_documents(int8_parts, data) -> None:
    query = data.topics[3].query
    result = scenario(
        int8_parts,
        lambda s: s.search(
            query, recall_k=20, top_n=20, mode=Mode.RETRIEVE_ONLY, metadata_filter={"n": 1}
        ),
    )
    assert result.hits
    assert all(hit.metadata == {"n": 1} for hit in result.hits)


def test_rerank_of_client_documents_matches_the_cross_encoder(int8_parts, ce_int8, data) -> None:
    query = data.topics[4].query
    documents = [segment.text for segment in data.segments[400:412]]
    result = scenario(
        int8_parts, lambda s: s.rerank_texts(query, documents, top_n=12, budget_s=None)
    )
    direct = CrossEncoder(ce_int8[0]).score(query, documents, batch_size=12)
    got = {int(hit.id): hit.rerank_score for hit in result.hits}
    assert sorted(got) == list(range(12))
    assert [hit.rerank_score for hit in result.hits] == sorted(got.values(), reverse=True)
    # Dynamic INT8 quantizes activations per batch, so a pair's score moves slightly with the
    # batch it shares; the batcher groups these 12 pairs differently from one direct call.
    gaps = [abs(got[i] - float(direct[i])) for i in range(12)]
    assert max(gaps) < 0.1, gaps


def test_rerank_by_id_and_unknown_ids(int8_parts, data) -> None:
    ids = [segment.id for segment in data.segments[:8]]
    result = scenario(
        int8_parts, lambda s: s.rerank_ids(data.topics[0].query, ids, top_n=3, budget_s=None)
    )
    assert len(result.hits) == 3
    assert {hit.id for hit in result.hits} <= set(ids)
    with pytest.raises(NotFound, match="document ids are not stored: 'nope'"):
        scenario(int8_parts, lambda s: s.rerank_ids("q", ["nope", ids[0]], budget_s=None))


def test_zero_budget_means_no_deadline_and_negative_is_refused(int8_parts, data) -> None:
    query = data.topics[5].query
    result = scenario(int8_parts, lambda s: s.search(query, recall_k=10, budget_s=0))
    assert result.reranked_count == 10
    with pytest.raises(InvalidArgument, match="must be >= 0"):
        budget_seconds(-1, Settings(), client_remaining_s=None)
    assert budget_seconds(0, Settings(), client_remaining_s=None) is None
    # A client deadline shrinks the budget, less the time to send the reply.
    assert budget_seconds(100, Settings(), client_remaining_s=0.05) == pytest.approx(
        0.05 - REPLY_MARGIN_S
    )


@pytest.mark.parametrize(("recall_k", "top_n"), [(0, 5), (10, 0), (-1, 5), (1001, 5)])
def test_bad_sizes_are_refused(recall_k: int, top_n: int) -> None:
    request = SearchRequest("q", recall_k=recall_k, top_n=top_n)
    with pytest.raises(InvalidArgument, match="must be between 1 and 1000"):
        check_search(request, Settings())


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_an_empty_query_is_refused(query: str) -> None:
    with pytest.raises(InvalidArgument, match="query is empty"):
        check_search(SearchRequest(query), Settings())


@pytest.fixture(scope="module")
def fp32_exports(tmp_path_factory, data, minilm_path, reranker_path):
    small = Sample(
        texts=32, queries=2, candidates=10
    )  # FP32 parity is ~1.0; keep the fixture quick
    root = tmp_path_factory.mktemp("fp32")
    for kind, model in (("bi-encoder", minilm_path), ("cross-encoder", reranker_path)):
        export_model(
            ExportRequest(
                kind=kind, model=str(model), out=root / kind, precision="fp32", sample=small
            ),
            data,
        )
    return root / "bi-encoder", root / "cross-encoder"


def test_fp32_pipeline_ranks_as_the_seeds_reference(
    tmp_path, fp32_exports, data, minilm_path, reranker_path
) -> None:
    bi, ce = fp32_exports
    documents = corpus(data)
    queries = [topic.query for topic in data.topics[:5]]

    async def body(searcher):
        return [
            await searcher.search(query, recall_k=20, top_n=20, budget_s=None) for query in queries
        ]

    # The seeds embedded each document's first window only: so does this collection.
    results = serve(tmp_path / "c", bi, ce, body, documents=documents, dtype="f32", max_passages=1)
    # The seeds' code: sentence-transformers encode, numpy cosine, CrossEncoder.predict, sort.
    doc_vectors = reference.embed(minilm_path, [d.text for d in documents], max_length=256)
    query_vectors = reference.embed(minilm_path, queries, max_length=256)
    for query, query_vector, result in zip(queries, query_vectors, results, strict=True):
        cosine = (
            doc_vectors
            @ query_vector
            / (np.linalg.norm(doc_vectors, axis=1) * np.linalg.norm(query_vector))
        )
        candidates = np.argsort(-cosine)[:20]
        scores = reference.score(
            reranker_path, [(query, [documents[i].text for i in candidates])], max_length=512
        )[0]
        expected = [documents[candidates[i]].id for i in np.argsort(-scores, kind="stable")]
        got = [hit.id for hit in result.hits]
        assert set(got) == {documents[i].id for i in candidates}
        by_id = dict(zip([documents[i].id for i in candidates], scores, strict=True))
        for mine, theirs in zip(got, expected, strict=True):
            # Equal ids, or a tie within FP32 noise between torch and onnxruntime.
            assert mine == theirs or abs(by_id[mine] - by_id[theirs]) < 1e-4
        for hit in result.hits:
            assert hit.rerank_score == pytest.approx(float(by_id[hit.id]), abs=1e-3)
