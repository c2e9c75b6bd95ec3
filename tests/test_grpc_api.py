"""Every RPC of tandem.v1.Retrieval, through a real channel, on real weights and RAG24 text."""

from __future__ import annotations

import time
import urllib.request
from typing import cast

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving import ServerThread, document, settings_for, upsert

from tandem.devices import CPU_PRECISIONS, CpuPrecision
from tandem.encoders import BiEncoder
from tandem.server.api import status
from tandem.v1 import tandem_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CORPUS = 300
LONG_TEXT = "retrieval " * 2000  # ~2,000 tokens: past both models' max length
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(tmp_path_factory, bi_int8, ce_int8, data):
    settings = settings_for(
        tmp_path_factory.mktemp("collection"),
        bi_int8[0],
        ce_int8[0],
        max_rerank_documents=120,
        max_embed_texts=8,
        max_recall_k=200,
        max_message_bytes=2 * 1024 * 1024,
    )
    running = ServerThread(settings)
    documents = [
        document(segment.id, segment.text, topic_group=position % 3)
        for position, segment in enumerate(data.segments[:CORPUS])
    ]
    reply = upsert(running.stub(), documents)
    assert (reply.received, reply.inserted, reply.replaced) == (CORPUS, CORPUS, 0)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    return server.stub()


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value.code()


def details_of(call, *args, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value.details()


def test_health_and_reflection(server):
    channel = server.channel()
    checker = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tandem.v1.Retrieval"):
        reply = checker.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflector = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflector.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {
        service.name for answer in answers for service in answer.list_services_response.service
    }
    assert {"tandem.v1.Retrieval", "grpc.health.v1.Health"} <= names


def test_search_two_stage_returns_reranked_hits_with_timings(stub, data):
    query = data.topics[0].query
    reply = stub.Search(
        pb.SearchRequest(query=query, recall_k=20, top_n=5, include_text=True, rerank_budget_ms=0)
    )
    assert reply.candidates == 20
    assert reply.reranked_count == 20  # no deadline: every candidate is scored
    assert len(reply.hits) == 5
    scores = [hit.score for hit in reply.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(hit.reranked and hit.text for hit in reply.hits)
    assert len({hit.stage1_rank for hit in reply.hits}) == 5
    assert all(0 <= hit.stage1_rank < 20 and -1 <= hit.stage1_score <= 1 for hit in reply.hits)
    assert all(hit.metadata["topic_group"] in (0, 1, 2) for hit in reply.hits)
    timings = reply.timings
    assert timings.embed_ms > 0
    assert timings.search_ms > 0
    assert timings.rerank_ms > 0
    assert timings.total_ms >= timings.rerank_ms


def test_search_finds_judged_relevant_text(stub, data):
    """Retrieve-only over the seeded segments finds segments RAG24's assessors judged relevant."""
    present = {segment.id for segment in data.segments[:CORPUS]}
    topics = [
        topic
        for topic in data.topics
        if sum(grade >= 2 and doc in present for doc, grade in data.umbrela[topic.id].items()) >= 2
    ][:10]
    assert len(topics) >= 5
    found = 0
    for topic in topics:
        reply = stub.Search(
            pb.SearchRequest(query=topic.query, top_n=5, mode=pb.SEARCH_MODE_RETRIEVE_ONLY)
        )
        found += any(data.umbrela[topic.id].get(hit.id, 0) >= 2 for hit in reply.hits)
    assert found >= len(topics) * 0.7


def test_search_retrieve_only_and_filter(stub, data):
    reply = stub.Search(
        pb.SearchRequest(
            query=data.topics[1].query,
            top_n=7,
            mode=pb.SEARCH_MODE_RETRIEVE_ONLY,
            metadata_filter={"topic_group": struct_pb2.Value(number_value=2)},
        )
    )
    assert len(reply.hits) == 7
    assert reply.reranked_count == 0
    assert all(not hit.reranked and not hit.HasField("text") for hit in reply.hits)
    assert all(hit.metadata["topic_group"] == 2 for hit in reply.hits)
    similarities = [hit.stage1_score for hit in reply.hits]
    assert similarities == sorted(similarities, reverse=True)
    assert reply.timings.rerank_ms == 0


def test_each_first_stage_says_where_its_hits_came_from(stub, data):
    query = data.topics[2].query

    def search(stage: int, **weights: float) -> pb.SearchResponse:
        return stub.Search(
            pb.SearchRequest(
                query=query,
                recall_k=30,
                top_n=30,
                first_stage=stage,
                mode=pb.SEARCH_MODE_RETRIEVE_ONLY,
                **weights,
            )
        )

    dense, lexical = search(pb.FIRST_STAGE_DENSE), search(pb.FIRST_STAGE_LEXICAL)
    hybrid = search(pb.FIRST_STAGE_HYBRID)
    for reply, side, other in ((dense, "dense", "lexical"), (lexical, "lexical", "dense")):
        assert reply.candidates == 30
        assert getattr(reply, f"{side}_candidates") == 30
        assert getattr(reply, f"{other}_candidates") == 0
        assert all(getattr(hit, f"{side}_rank") == hit.stage1_rank for hit in reply.hits)
        assert not any(hit.HasField(f"{other}_rank") for hit in reply.hits)
    assert dense.first_stage == pb.FIRST_STAGE_DENSE
    assert lexical.first_stage == pb.FIRST_STAGE_LEXICAL
    assert hybrid.first_stage == pb.FIRST_STAGE_HYBRID
    assert hybrid.candidates == 30
    assert hybrid.dense_candidates + hybrid.lexical_candidates >= 30
    for hit in hybrid.hits:  # each side's rank points at the same document on that side
        assert hit.HasField("dense_rank") or hit.HasField("lexical_rank")
        if hit.HasField("dense_rank"):
            assert dense.hits[hit.dense_rank].id == hit.id
        if hit.HasField("lexical_rank"):
            assert lexical.hits[hit.lexical_rank].id == hit.id
    only_dense = search(pb.FIRST_STAGE_HYBRID, lexical_weight=0.0)
    assert [hit.id for hit in only_dense.hits] == [hit.id for hit in dense.hits]
    only_lexical = search(pb.FIRST_STAGE_HYBRID, dense_weight=0.0)
    assert [hit.id for hit in only_lexical.hits] == [hit.id for hit in lexical.hits]
    default = stub.Search(pb.SearchRequest(query=query, mode=pb.SEARCH_MODE_RETRIEVE_ONLY))
    assert default.first_stage == pb.FIRST_STAGE_HYBRID  # the server's default
    assert code_of(stub.Search, pb.SearchRequest(query="q", dense_weight=-1.0)) == INVALID
    assert code_of(stub.Search, pb.SearchRequest(query="q", first_stage=9)) == INVALID


def test_search_rejects_bad_sizes_and_modes(stub):
    for request in (
        pb.SearchRequest(query="q", recall_k=0),
        pb.SearchRequest(query="q", recall_k=201),
        pb.SearchRequest(query="q", top_n=0),
        pb.SearchRequest(query="q", mode=7),
    ):
        assert code_of(stub.Search, request) == INVALID
    assert "between 1 and 200" in details_of(stub.Search, pb.SearchRequest(query="q", recall_k=999))


def test_overlong_query_is_truncated_and_flagged_or_refused(stub):
    reply = stub.Search(pb.SearchRequest(query=LONG_TEXT, recall_k=5, top_n=1))
    assert reply.truncated
    message = details_of(stub.Search, pb.SearchRequest(query=LONG_TEXT, truncate=False))
    assert "longer than the bi-encoder's 256 tokens" in message


def test_rerank_texts_and_stored_ids_in_cohere_shape(stub, data):
    query = data.topics[2].query
    stored = [segment.id for segment in data.segments[:3]]
    documents = [
        pb.RerankDocument(text="an unrelated sentence about cooking pasta"),
        pb.RerankDocument(id=stored[0]),
        pb.RerankDocument(text=data.segments[5].text),
        pb.RerankDocument(id=stored[1]),
    ]
    reply = stub.Rerank(
        pb.RerankRequest(
            query=query, documents=documents, return_documents=True, rerank_budget_ms=0
        )
    )
    assert sorted(result.index for result in reply.results) == [0, 1, 2, 3]
    assert reply.reranked_count == 4
    scores = [result.relevance_score for result in reply.results]
    assert scores == sorted(scores, reverse=True)
    by_index = {result.index: result for result in reply.results}
    assert by_index[1].id == stored[0]
    assert by_index[3].id == stored[1]
    assert not by_index[0].HasField("id")
    assert by_index[2].text == data.segments[5].text
    # No deadline here either: under the default 100 ms, 2 AVX2 cores score only some of
    # these four pairs, and which ones depends on the machine's speed.
    top = stub.Rerank(
        pb.RerankRequest(query=query, documents=documents, top_n=2, rerank_budget_ms=0)
    )
    assert [result.index for result in top.results] == [
        result.index for result in reply.results[:2]
    ]
    assert all(not result.HasField("text") for result in top.results)


def test_max_tokens_per_doc_cuts_candidates_in_search(stub, data):
    query = data.topics[2].query
    whole = stub.Search(pb.SearchRequest(query=query, top_n=10, rerank_budget_ms=0))
    capped = stub.Search(
        pb.SearchRequest(query=query, top_n=10, rerank_budget_ms=0, max_tokens_per_doc=16)
    )
    assert capped.reranked_count == capped.candidates
    assert all(hit.truncated for hit in capped.hits)  # RAG24 segments run past 16 tokens
    assert capped.truncated
    assert {hit.id: hit.score for hit in capped.hits} != {hit.id: hit.score for hit in whole.hits}
    assert code_of(stub.Search, pb.SearchRequest(query=query, max_tokens_per_doc=0)) == INVALID


def test_server_default_max_tokens_per_doc(tmp_path, bi_int8, ce_int8, data):
    running = ServerThread(settings_for(tmp_path, bi_int8[0], ce_int8[0], max_tokens_per_doc=16))
    try:
        stub = running.stub()
        upsert(stub, [document(s.id, s.text) for s in data.segments[:20]])
        assert stub.Info(pb.InfoRequest()).limits.default_max_tokens_per_doc == 16
        reply = stub.Search(pb.SearchRequest(query=data.topics[0].query, rerank_budget_ms=0))
        assert all(hit.truncated for hit in reply.hits)
        texts = [pb.RerankDocument(text="word " * 40)]
        assert stub.Rerank(pb.RerankRequest(query="q", documents=texts)).results[0].truncated
        wider = pb.RerankRequest(query="q", documents=texts, max_tokens_per_doc=100)
        assert not stub.Rerank(wider).results[0].truncated  # a call's own cap wins
    finally:
        running.stop()


def test_min_rerank_refuses_a_call_its_budget_cannot_rerank_deeply_enough(stub, data):
    query = data.topics[4].query
    # 100 candidates of RAG24 length in 5 ms: nowhere near 50 of them, on any CPU.
    shallow = pb.SearchRequest(query=query, rerank_budget_ms=5, min_rerank=50)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Search(shallow)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "min_rerank=50" in caught.value.details()
    details = dict(caught.value.trailing_metadata())["grpc-status-details-bin"]
    assert status.retry_delay(details) is not None  # retryable, with a delay to wait
    assert status.retry_delay_of(caught.value) == status.retry_delay(details)  # as clients read it
    texts = [pb.RerankDocument(text=s.text) for s in data.segments[:60]]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Rerank(pb.RerankRequest(query=query, documents=texts, rerank_budget_ms=5,
                                     min_rerank=50))  # fmt: skip
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Within reach, or with no budget, the call is answered as before.
    assert stub.Search(pb.SearchRequest(query=query, rerank_budget_ms=0, min_rerank=50))
    reply = stub.Search(pb.SearchRequest(query=query, recall_k=3, rerank_budget_ms=5000,
                                         min_rerank=3))  # fmt: skip
    assert reply.reranked_count == 3


def test_rerank_errors(stub):
    assert code_of(stub.Rerank, pb.RerankRequest(query="q")) == INVALID
    too_many = [pb.RerankDocument(text="x")] * 121
    message = details_of(stub.Rerank, pb.RerankRequest(query="q", documents=too_many))
    assert "at most 120 per call (max_rerank_documents)" in message
    assert (
        code_of(stub.Rerank, pb.RerankRequest(query="q", documents=[pb.RerankDocument()]))
        == INVALID
    )
    unknown = [pb.RerankDocument(id="no-such-id")]
    assert (
        code_of(stub.Rerank, pb.RerankRequest(query="q", documents=unknown))
        == grpc.StatusCode.NOT_FOUND
    )
    long_pair = [pb.RerankDocument(text=LONG_TEXT)]
    # ~2,000 tokens: read whole in the default 10 windows; cut (and flagged) at 1 or 2.
    whole = stub.Rerank(pb.RerankRequest(query="q", documents=long_pair, rerank_budget_ms=0))
    assert not whole.truncated
    assert whole.results[0].passage.windows == 5
    for windows in (1, 2):
        reply = stub.Rerank(
            pb.RerankRequest(
                query="q", documents=long_pair, rerank_budget_ms=0, max_chunks_per_doc=windows
            )
        )
        assert reply.truncated
        assert reply.results[0].truncated
        assert reply.results[0].passage.windows == windows
    refused = pb.RerankRequest(query="q", documents=long_pair, truncate=False, max_chunks_per_doc=2)
    assert "do not fit the reranker's 2 windows of 512 tokens" in details_of(stub.Rerank, refused)
    for bad in (0, 65):
        request = pb.RerankRequest(query="q", documents=long_pair, max_chunks_per_doc=bad)
        assert "max_chunks_per_doc must be between 1 and 64" in details_of(stub.Rerank, request)


def test_embed_matches_the_bi_encoder(stub, bi_int8, data):
    texts = [segment.text for segment in data.segments[:4]]
    reply = stub.Embed(pb.EmbedRequest(texts=texts))
    # The bi-encoder as the server runs it: on a CPU with bf16 matmuls, start-up may have
    # kept OpenVINO's bf16 variant (--cpu-precision auto), whose vectors differ by up to ~5e-3.
    served = stub.Info(pb.InfoRequest()).bi_encoder.inference_precision or "f32"
    expected = BiEncoder(bi_int8[0], cpu_precision=cast(CpuPrecision, served)).embed(texts)
    got = np.array([list(embedding.values) for embedding in reply.embeddings], dtype=np.float32)
    assert reply.dimension == 384
    assert got.shape == (4, 384)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert code_of(stub.Embed, pb.EmbedRequest()) == INVALID
    assert code_of(stub.Embed, pb.EmbedRequest(texts=["t"] * 9)) == INVALID
    flagged = stub.Embed(pb.EmbedRequest(texts=["short", LONG_TEXT]))
    assert flagged.truncated
    assert [e.truncated for e in flagged.embeddings] == [False, True]
    assert code_of(stub.Embed, pb.EmbedRequest(texts=[LONG_TEXT], truncate=False)) == INVALID


def test_upsert_get_delete_round_trip(stub):
    fresh = [document(f"new-{i}", f"zebra migration fact number {i}", batch=i) for i in range(5)]
    reply = upsert(stub, fresh, per_message=2)
    assert (reply.received, reply.inserted, reply.replaced) == (5, 5, 0)
    assert reply.generation > 0
    assert reply.timings.embed_ms > 0
    again = upsert(stub, [document("new-0", "zebras cross the Mara river", batch=9)])
    assert (again.inserted, again.replaced) == (0, 1)
    got = stub.Get(pb.GetRequest(ids=["new-0", "missing", "new-1"]))
    assert [d.id for d in got.documents] == ["new-0", "new-1"]
    assert got.documents[0].text == "zebras cross the Mara river"
    assert got.documents[0].metadata["batch"] == 9
    assert list(got.not_found) == ["missing"]
    hits = stub.Search(
        pb.SearchRequest(
            query="zebras crossing a river", top_n=1, mode=pb.SEARCH_MODE_RETRIEVE_ONLY
        )
    ).hits
    assert hits[0].id == "new-0"
    deleted = stub.Delete(pb.DeleteRequest(ids=["new-0", "new-1", "missing"]))
    assert deleted.deleted == 2
    assert list(deleted.not_found) == ["missing"]
    assert list(stub.Get(pb.GetRequest(ids=["new-0"])).not_found) == ["new-0"]
    hits = stub.Search(
        pb.SearchRequest(
            query="zebras crossing a river", top_n=3, mode=pb.SEARCH_MODE_RETRIEVE_ONLY
        )
    ).hits
    assert {"new-0", "new-1"}.isdisjoint(hit.id for hit in hits)


def test_bad_upsert_message_commits_nothing_of_itself(stub):
    good = pb.UpsertRequest(documents=[document("kept-1", "first message is fine")])
    twice = pb.UpsertRequest(documents=[document("dup", "a"), document("dup", "b")])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Upsert(iter([good, twice]))
    assert caught.value.code() == INVALID
    assert "appears twice" in caught.value.details()
    assert "1 documents of earlier messages" in caught.value.details()
    got = stub.Get(pb.GetRequest(ids=["kept-1", "dup"]))
    assert [d.id for d in got.documents] == ["kept-1"]
    for bad in (document("", "no id"), document("x" * 600, "id too long")):
        assert code_of(stub.Upsert, iter([pb.UpsertRequest(documents=[bad])])) == INVALID
    # Past the bi-encoder's window a document is embedded as passages, whole.
    long_doc = pb.UpsertRequest(documents=[document("long", LONG_TEXT)], truncate=False)
    assert stub.Upsert(iter([long_doc])).truncated == 0
    # Past the collection's 64 passages (~14,000 tokens), truncate=false refuses it; by
    # default its tail is left unembedded and counted.
    longer = "retrieval " * 16_000
    too_long = pb.UpsertRequest(documents=[document("longer", longer)], truncate=False)
    assert code_of(stub.Upsert, iter([too_long])) == INVALID
    counted = stub.Upsert(iter([pb.UpsertRequest(documents=[document("longer", longer)])]))
    assert counted.truncated == 1


def test_info_states_models_limits_and_stand_in(stub):
    info = stub.Info(pb.InfoRequest())
    assert info.version
    assert info.bi_encoder.kind == "bi-encoder"
    assert info.bi_encoder.verified
    assert info.reranker.kind == "cross-encoder"
    assert info.reranker.precision == "int8"
    assert info.reranker_is_stand_in  # exported from ../shared/models/stand-in-reranker
    assert '"files"' in info.reranker.manifest_json
    # How each runs here, and why: OpenVINO names its precision, onnxruntime none.
    for model in (info.bi_encoder, info.reranker):
        assert model.runtime in ("onnxruntime", "openvino")
        assert model.runtime_choice
        assert model.inference_precision in (
            CPU_PRECISIONS if model.runtime == "openvino" else ("",)
        )
    assert info.limits.max_rerank_documents == 120
    assert info.limits.query_max_tokens == 256
    assert info.limits.pair_max_tokens == 512
    assert info.index_size >= CORPUS
    assert info.index_dtype == "i8"
    assert info.dimension == 384
    assert info.lexical_index_size == info.index_size
    assert info.default_first_stage == pb.FIRST_STAGE_HYBRID
    assert info.rrf_k == 10


def test_message_size_cap(stub):
    huge = "word " * (600 * 1024)  # 3 MB, past the 2 MiB cap
    assert code_of(stub.Search, pb.SearchRequest(query=huge)) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_deadline_shrinks_the_budget(stub, data):
    """No budget of its own, but a 0.4 s deadline (200 pairs take ~3 s here): the answer comes
    in time (else gRPC would say DEADLINE_EXCEEDED), partly reranked."""
    request = pb.SearchRequest(query=data.topics[3].query, recall_k=200, rerank_budget_ms=0)
    reply = stub.Search(request, timeout=0.4)
    assert reply.candidates > 0
    assert reply.reranked_count < reply.candidates


def test_cancelled_calls_leave_the_queue(server, stub, data):
    documents = [pb.RerankDocument(text=segment.text) for segment in data.segments[:100]]
    call = stub.Rerank.future(pb.RerankRequest(query="q", documents=documents, rerank_budget_ms=0))
    batcher = server.running.searcher.batcher
    deadline = time.monotonic() + 10
    while batcher.queued < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.queued >= 50  # the call's pairs are waiting
    call.cancel()
    deadline = time.monotonic() + 10
    while batcher.queued and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.queued == 0


def test_metrics_endpoint(server, stub):
    stub.Search(pb.SearchRequest(query="metrics please", recall_k=10))
    code_of(stub.Search, pb.SearchRequest(query="q", recall_k=0))
    url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    for line in (
        'tandem_requests_total{code="OK",method="Search"}',
        'tandem_requests_total{code="INVALID_ARGUMENT",method="Search"}',
        'tandem_stage_seconds_bucket{le="0.1",stage="rerank"}',
        'tandem_stage_seconds_bucket{le="0.1",stage="embed"}',
        "tandem_batch_pairs_count",
        "tandem_batch_padded_tokens_sum",
        "tandem_batch_seconds_count",
        "tandem_rerank_cost_seconds_per_token",
        "tandem_rerank_cost_seconds_per_run 0.0",  # a CPU's: no fixed cost
        "tandem_rerank_queue_pairs",
        "tandem_reranked_fraction_count",
        'tandem_winner_stage1_rank_fraction_bucket{first_stage="hybrid",le="1.0"}',
        'tandem_winners_from_pool_tail_total{first_stage="hybrid"}',
        "tandem_in_flight",
    ):
        assert line in text, line
