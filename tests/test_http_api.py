"""The HTTP door, through the clients users point at it (the Cohere and OpenAI SDKs, LangChain,
huggingface_hub's InferenceClient, plain HTTP for TEI and Jina), each compared with the gRPC
call of the same request, on real weights and RAG24 text."""

from __future__ import annotations

import base64
import json
import math
import ssl
import threading
import time
from dataclasses import replace

import cohere
import httpx
import numpy as np
import openai
import pytest
from google.protobuf import struct_pb2
from huggingface_hub import InferenceClient, get_session
from huggingface_hub.errors import HfHubHTTPError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_cohere import CohereEmbeddings, CohereRerank
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from serving import HTTP_TIMEOUT, ServerThread, document, get, post, settings_for, upsert

from tandem.artifact import read_manifest, write_manifest
from tandem.benchmarks.http_overhead import server_timing_ms
from tandem.tokens import load_tokenizer
from tandem.v1 import tandem_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CORPUS = 200
TOKEN = "http-test-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory, bi_int8, ce_int8, data):
    settings = settings_for(
        tmp_path_factory.mktemp("collection"), bi_int8[0], ce_int8[0],
        max_message_bytes=256 * 1024, max_embed_texts=16,
    )  # fmt: skip
    running = ServerThread(settings)
    upsert(running.stub(), [document(s.id, s.text) for s in data.segments[:CORPUS]])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def base(server) -> str:
    return f"http://127.0.0.1:{server.running.http_port}"


@pytest.fixture(scope="module")
def case(data) -> tuple[str, list[str]]:
    """A RAG24 topic and 20 real passages of various lengths."""
    return data.topics[3].query, [segment.text for segment in data.segments[200:220]]


def grpc_rerank(server, query: str, texts: list[str], **fields) -> list[pb.RerankResult]:
    reply = server.stub().Rerank(
        pb.RerankRequest(
            query=query,
            documents=[pb.RerankDocument(text=text) for text in texts],
            rerank_budget_ms=0,
            **fields,
        )
    )
    assert reply.reranked_count == len(texts)
    return list(reply.results)


def sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit))


def test_grpc_replies_carry_the_probability_beside_the_logit(server, case) -> None:
    query, texts = case
    results = grpc_rerank(server, query, texts)
    for result in results:
        assert result.HasField("probability")
        assert result.probability == pytest.approx(sigmoid(result.relevance_score), rel=1e-6)
        assert 0.0 <= result.probability <= 1.0
    assert server.stub().Info(pb.InfoRequest()).score_activation == "sigmoid"
    hits = server.stub().Search(pb.SearchRequest(query=query, rerank_budget_ms=0)).hits
    assert all(hit.probability == pytest.approx(sigmoid(hit.score), rel=1e-6) for hit in hits)


def test_cohere_sdk_v2_rerank_matches_grpc(server, base, case) -> None:
    query, texts = case
    expected = grpc_rerank(server, query, texts, top_n=5)
    with cohere.ClientV2(api_key="unused", base_url=base) as client:
        reply = client.rerank(model="rerank-v3.5", query=query, documents=texts, top_n=5)
    assert [r.index for r in reply.results] == [r.index for r in expected]
    for got, want in zip(reply.results, expected, strict=True):
        assert got.relevance_score == pytest.approx(want.probability, rel=1e-6)
    assert reply.meta is not None
    assert reply.meta.api_version is not None
    assert reply.meta.api_version.version == "2"


def test_cohere_sdk_v1_rerank_returns_documents_when_asked(server, base, case) -> None:
    query, texts = case
    expected = grpc_rerank(server, query, texts, top_n=3)
    with cohere.Client(api_key="unused", base_url=base) as client:
        reply = client.rerank(
            model="rerank-english-v3.0", query=query, documents=texts, top_n=3,
            return_documents=True,
        )  # fmt: skip
        bare = client.rerank(model="rerank-english-v3.0", query=query, documents=texts, top_n=3)
    assert [r.index for r in reply.results] == [r.index for r in expected]
    for result in reply.results:
        assert result.document is not None
        assert result.document.text == texts[result.index]
    assert all(result.document is None for result in bare.results)  # Cohere's default


def test_cohere_max_tokens_per_doc_cuts_documents(server, base, case) -> None:
    query, texts = case
    expected = grpc_rerank(server, query, texts, max_tokens_per_doc=16)
    assert all(result.truncated for result in expected if len(texts[result.index]) > 200)
    with cohere.ClientV2(api_key="unused", base_url=base) as client:
        reply = client.rerank(model="m", query=query, documents=texts, max_tokens_per_doc=16)
    assert [r.index for r in reply.results] == [r.index for r in expected]
    full = grpc_rerank(server, query, texts)
    assert [r.relevance_score for r in full] != [r.relevance_score for r in expected]


def test_langchain_cohere_rerank_in_a_retriever_pipeline(server, base, data) -> None:
    class TandemRetriever(BaseRetriever):
        """Stage 1 from Tandem's JSON search, retrieve-only: LangChain reranks next."""

        url: str
        k: int = 20

        def _get_relevant_documents(
            self, query: str, *, run_manager: CallbackManagerForRetrieverRun
        ) -> list[Document]:
            reply = post(
                f"{self.url}/v1/search",
                json={"query": query, "mode": "retrieve_only", "top_n": self.k,
                      "include_text": True},
            ).json()  # fmt: skip
            hits = reply["hits"]
            return [Document(page_content=h["text"], metadata={"id": h["id"]}) for h in hits]

    query = data.topics[5].query
    reranker = CohereRerank(cohere_api_key="unused", base_url=base, model="rerank-v3.5", top_n=3)
    pipeline = ContextualCompressionRetriever(
        base_compressor=reranker, base_retriever=TandemRetriever(url=base)
    )
    try:
        reranked = pipeline.invoke(query)
    finally:
        reranker.client.__exit__(None, None, None)  # closes its connections
    candidates = TandemRetriever(url=base).invoke(query)
    expected = grpc_rerank(server, query, [c.page_content for c in candidates], top_n=3)
    assert [d.metadata["id"] for d in reranked] == [
        candidates[r.index].metadata["id"] for r in expected
    ]
    for got, want in zip(reranked, expected, strict=True):
        assert got.metadata["relevance_score"] == pytest.approx(want.probability, rel=1e-6)


def test_openai_sdk_embeddings_match_grpc_embed(server, base, data, request) -> None:
    texts = [segment.text for segment in data.segments[:5]]
    expected = server.stub().Embed(pb.EmbedRequest(texts=texts))
    client = openai.OpenAI(api_key="unused", base_url=f"{base}/v1")
    request.addfinalizer(client.close)
    for encoding in ("base64", "float"):  # the SDK asks for base64 unless told
        kwargs = {"encoding_format": encoding} if encoding == "float" else {}
        reply = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, **kwargs)
        assert [item.index for item in reply.data] == list(range(len(texts)))
        for got, want in zip(reply.data, expected.embeddings, strict=True):
            np.testing.assert_allclose(got.embedding, want.values, rtol=0, atol=1e-6)
        assert reply.usage.prompt_tokens > len(texts) * 10
    single = client.embeddings.create(model="m", input="one text", encoding_format="float")
    assert len(single.data) == 1
    assert len(single.data[0].embedding) == expected.dimension


def test_openai_errors_are_openai_shaped(base) -> None:
    with (
        openai.OpenAI(api_key="unused", base_url=f"{base}/v1", max_retries=0) as client,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client.embeddings.create(model="m", input=[1, 2, 3])
    assert "send the text" in caught.value.message
    reply = post(f"{base}/v1/embeddings", json={"model": "m", "input": "x", "color": 1})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "color" in error["message"]


def test_tei_rerank_and_embed_match_grpc(server, base, case, data) -> None:
    query, texts = case
    expected = grpc_rerank(server, query, texts)
    reply = post(
        f"{base}/rerank",
        json={"query": query, "texts": texts, "truncate": True, "return_text": True},
    )
    assert reply.status_code == 200, reply.text
    ranks = reply.json()
    assert [r["index"] for r in ranks] == [r.index for r in expected]
    for got, want in zip(ranks, expected, strict=True):
        assert got["score"] == pytest.approx(want.probability, rel=1e-6)
        assert got["text"] == texts[got["index"]]
    raw = post(
        f"{base}/rerank",
        json={"query": query, "texts": texts, "truncate": True, "raw_scores": True},
    ).json()
    assert [r["score"] for r in raw] == pytest.approx([r.relevance_score for r in expected])
    assert "text" not in raw[0]

    sample = [segment.text for segment in data.segments[:3]]
    want = server.stub().Embed(pb.EmbedRequest(texts=sample))
    vectors = post(f"{base}/embed", json={"inputs": sample, "truncate": True}).json()
    for got, wanted in zip(vectors, want.embeddings, strict=True):
        np.testing.assert_allclose(got, wanted.values, atol=1e-6)
    one = post(f"{base}/embed", json={"inputs": "a single input"}).json()
    assert len(one) == 1
    assert len(one[0]) == want.dimension


def test_infinity_rerank_on_the_tei_path_matches_grpc(server, base, case, ce_int8) -> None:
    """LiteLLM's infinity/ provider posts Cohere's fields to {api_base}/rerank and reads
    Infinity's reply: scores as sigmoids (logits with raw_scores), documents as strings."""
    query, texts = case
    expected = grpc_rerank(server, query, texts)[:5]
    body = {"model": "infinity/rerank", "query": query, "documents": texts, "top_n": 5}
    reply = post(f"{base}/rerank", json={**body, "return_documents": True})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert set(answer) == {"object", "results", "model", "usage", "id", "created"}
    assert (answer["object"], answer["model"]) == ("rerank", "infinity/rerank")
    assert [r["index"] for r in answer["results"]] == [r.index for r in expected]
    for got, want in zip(answer["results"], expected, strict=True):
        assert got["relevance_score"] == pytest.approx(want.probability, rel=1e-6)
        assert got["document"] == texts[got["index"]]
    raw = post(f"{base}/rerank", json={**body, "raw_scores": True}).json()["results"]
    assert [r["relevance_score"] for r in raw] == pytest.approx(
        [r.relevance_score for r in expected]
    )
    assert "document" not in raw[0]
    # Usage: the tokens of every pair the reranker read, as its own tokenizer counts them.
    short = ["Paris is the capital of France.", "Berlin is in Germany.", "The sky is blue."]
    usage = post(f"{base}/rerank", json={"query": "capital of France", "documents": short}).json()[
        "usage"
    ]
    tokenizer = load_tokenizer(ce_int8[0], max_length=ce_int8[1].max_length)
    pairs = tokenizer.encode_batch([("capital of France", text) for text in short])
    tokens = sum(len(pair.ids) for pair in pairs)
    assert usage == {"prompt_tokens": tokens, "total_tokens": tokens}
    refused = post(f"{base}/rerank", json={"query": query, "documents": texts, "top_n": 0})
    assert refused.status_code == 400
    assert "top_n" in refused.text


def test_openai_sdk_lists_the_served_models(server, base, bi_int8, ce_int8, request) -> None:
    client = openai.OpenAI(api_key="unused", base_url=f"{base}/v1")
    request.addfinalizer(client.close)
    listed = client.models.list().data
    assert [(model.id, model.owned_by) for model in listed] == [
        (bi_int8[1].source, "tandem"),
        (ce_int8[1].source, "tandem"),
    ]
    assert [model.capabilities for model in listed] == [["embed"], ["rerank"]]  # type: ignore[attr-defined]
    bare = get(f"{base}/models").json()["data"]
    assert [(model["id"], model["created"]) for model in bare] == [
        (model.id, model.created) for model in listed
    ]


def test_huggingface_inference_client_embeds_and_reranks_at_the_root(
    server, base, case, data, request
) -> None:
    # Haystack's and LlamaIndex's TEI embedders call InferenceClient(url).feature_extraction,
    # which posts TEI's embed body to the URL itself, with its options under "parameters".
    texts = [segment.text for segment in data.segments[:3]]
    expected = server.stub().Embed(pb.EmbedRequest(texts=texts))
    client = InferenceClient(base)
    request.addfinalizer(get_session().close)  # the thread's pooled session, kept by the hub
    vectors = client.feature_extraction(texts, truncate=True, normalize=True)
    assert vectors.shape == (len(texts), expected.dimension)
    for got, want in zip(vectors, expected.embeddings, strict=True):
        np.testing.assert_allclose(got, want.values, atol=1e-6)
    one = client.feature_extraction("a single input")
    assert one.shape == (1, expected.dimension)
    with pytest.raises(HfHubHTTPError) as refused:  # the artifact's vectors are unit length
        client.feature_extraction("x", normalize=False)
    assert refused.value.response.status_code == 400
    assert "normalize" in refused.value.response.json()["error"]
    # TEI's default is truncate=false there too: a text past the model's length is refused.
    overlong = post(f"{base}/", json={"inputs": "word " * 2000})
    assert overlong.status_code == 400
    assert overlong.json()["error_type"] == "validation"

    query, documents = case
    at_root = post(f"{base}/", json={"query": query, "texts": documents, "truncate": True})
    assert at_root.status_code == 200, at_root.text
    ranks = post(f"{base}/rerank", json={"query": query, "texts": documents, "truncate": True})
    assert [r["index"] for r in at_root.json()] == [r["index"] for r in ranks.json()]
    assert [r["score"] for r in at_root.json()] == pytest.approx(
        [r["score"] for r in ranks.json()], rel=1e-6
    )


def test_cohere_sdk_embed_v1_and_v2_match_grpc(server, base, data, request) -> None:
    texts = [segment.text for segment in data.segments[:4]]
    expected = server.stub().Embed(pb.EmbedRequest(texts=texts))
    want = np.array([list(vector.values) for vector in expected.embeddings], dtype=np.float32)
    v1 = cohere.Client(api_key="unused", base_url=base)
    v2 = cohere.ClientV2(api_key="unused", base_url=base)
    for client in (v1, v2):
        request.addfinalizer(client._client_wrapper.httpx_client.httpx_client.close)

    floats = v1.embed(texts=texts, model="embed-english-v3.0", input_type="search_document")
    assert floats.response_type == "embeddings_floats"
    np.testing.assert_allclose(floats.embeddings, want, atol=1e-6)
    assert floats.texts == texts
    assert floats.meta.api_version.version == "1"
    assert floats.meta.billed_units.input_tokens > len(texts) * 10

    kinds = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    typed = v2.embed(texts=texts, model="m", input_type="search_query", embedding_types=kinds)
    assert typed.response_type == "embeddings_by_type"
    by_type = typed.embeddings
    np.testing.assert_allclose(by_type.float_, want, atol=1e-6)
    decoded = [np.frombuffer(base64.b64decode(item), dtype="<f4") for item in by_type.base64]
    np.testing.assert_allclose(decoded, want, atol=1e-6)
    # Signs and scaled components, as the index stores the same vectors.
    np.testing.assert_array_equal(np.unpackbits(np.array(by_type.ubinary, np.uint8), axis=1),
                                  (want > 0).astype(np.uint8))  # fmt: skip
    np.testing.assert_array_equal(np.array(by_type.binary) + 128, by_type.ubinary)
    assert np.abs(np.array(by_type.int8) / 127 - want).max() <= 0.5 / 127 + 1e-6
    np.testing.assert_array_equal(np.array(by_type.uint8) - 128, by_type.int8)

    inputs = [{"content": [{"type": "text", "text": text}]} for text in texts[:2]]
    from_inputs = v2.embed(inputs=inputs, model="m", input_type="search_document",
                           embedding_types=["float"])  # fmt: skip
    # Against the same two texts embedded together: an INT8 vector moves (~1e-4) with the
    # padding its batch gets.
    pair = server.stub().Embed(pb.EmbedRequest(texts=texts[:2]))
    want_pair = [list(vector.values) for vector in pair.embeddings]
    np.testing.assert_allclose(from_inputs.embeddings.float_, want_pair, atol=1e-6)
    with pytest.raises(cohere.errors.BadRequestError) as refused:
        v2.embed(texts=texts, model="m", input_type="search_query", output_dimension=256)
    assert "output_dimension" in refused.value.body["message"]


# langchain-cohere 0.6.0 reads the reply through pydantic's deprecated .dict() and
# parse_obj: its warnings, not ours (the suite turns warnings into errors).
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")
def test_langchain_cohere_embeddings_match_grpc(server, base, data, request) -> None:
    texts = [segment.text for segment in data.segments[5:8]]
    expected = server.stub().Embed(pb.EmbedRequest(texts=texts))
    embeddings = CohereEmbeddings(model="embed-english-v3.0", base_url=base,
                                  cohere_api_key="unused", max_retries=0)  # fmt: skip
    request.addfinalizer(embeddings.client._client_wrapper.httpx_client.httpx_client.close)
    # In f32 a text's vector does not depend on the batch it shares. Where start-up chose a
    # bf16 variant (on AMX, the unquantized graph), the batch's padded width moves it.
    precision = server.stub().Info(pb.InfoRequest()).bi_encoder.inference_precision
    atol = 1e-6 if precision in ("", "f32") else 5e-3
    documents = embeddings.embed_documents(texts)
    for got, want in zip(documents, expected.embeddings, strict=True):
        np.testing.assert_allclose(got, want.values, atol=atol)
    query = embeddings.embed_query(texts[0])
    np.testing.assert_allclose(query, expected.embeddings[0].values, atol=atol)


def test_tei_refuses_an_overlong_pair_unless_told_to_truncate(base) -> None:
    # TEI's default is truncate=false: a pair past the model's length is an error, not cut.
    reply = post(f"{base}/rerank", json={"query": "q", "texts": ["word " * 2000]})
    assert reply.status_code == 400
    assert reply.json()["error_type"] == "validation"
    assert "truncate" in reply.json()["error"]


def test_jina_rerank_matches_grpc_and_returns_documents_by_default(server, base, case) -> None:
    query, texts = case
    expected = grpc_rerank(server, query, texts, top_n=4)
    reply = post(
        f"{base}/v1/rerank",
        json={"model": "jina-reranker-v2-base-multilingual", "query": query,
              "documents": [{"text": t} for t in texts], "top_n": 4},
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "jina-reranker-v2-base-multilingual"
    assert [r["index"] for r in body["results"]] == [r.index for r in expected]
    for got, want in zip(body["results"], expected, strict=True):
        assert got["relevance_score"] == pytest.approx(want.probability, rel=1e-6)
        assert got["document"]["text"] == texts[got["index"]]
    # Jina's usage: the tokens of every pair read, as Infinity's shape counts them (tested
    # against the reranker's tokenizer there); a Cohere model's reply has no such field.
    infinity = post(f"{base}/rerank", json={"query": query, "documents": texts}).json()
    assert body["usage"] == {"total_tokens": infinity["usage"]["total_tokens"]}
    assert body["usage"]["total_tokens"] > len(texts) * 10
    cohere_body = {"model": "rerank-v3.5", "query": query, "documents": texts, "top_n": 4}
    assert "usage" not in post(f"{base}/v1/rerank", json=cohere_body).json()


def test_jina_embeddings_body_matches_grpc(server, base, data) -> None:
    """What jina-embeddings-v3 clients post to {base}/v1/embeddings: OpenAI's body with
    Jina's task, embedding_type, normalized, truncate and late_chunking."""
    texts = [segment.text for segment in data.segments[:3]]
    expected = server.stub().Embed(pb.EmbedRequest(texts=texts))
    want = np.array([list(vector.values) for vector in expected.embeddings], dtype=np.float32)
    jina = {"model": "jina-embeddings-v3", "task": "retrieval.passage", "late_chunking": False,
            "normalized": True, "truncate": True, "input": texts}  # fmt: skip

    def embedded(kind: str) -> list:
        reply = post(f"{base}/v1/embeddings", json={**jina, "embedding_type": kind})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["total_tokens"] > len(texts) * 10
        return [item["embedding"] for item in reply.json()["data"]]

    np.testing.assert_allclose(embedded("float"), want, atol=1e-6)
    decoded = [np.frombuffer(base64.b64decode(item), dtype="<f4") for item in embedded("base64")]
    np.testing.assert_allclose(decoded, want, atol=1e-6)
    ubinary = np.array(embedded("ubinary"), dtype=np.uint8)
    np.testing.assert_array_equal(np.unpackbits(ubinary, axis=1), (want > 0).astype(np.uint8))
    np.testing.assert_array_equal(np.array(embedded("binary")) + 128, ubinary)
    int8 = np.array(embedded("int8"))
    assert int8.dtype == np.int64  # integers in the JSON, not floats
    assert np.abs(int8 / 127 - want).max() <= 0.5 / 127 + 1e-6
    for fields, says in (
        ({"late_chunking": True}, "late_chunking"),
        ({"task": "summarization"}, "retrieval.query"),
        ({"input_type": "query"}, "send one of them"),
        ({"input": ["word " * 2000], "truncate": False}, "allow truncate"),
    ):
        refused = post(f"{base}/v1/embeddings", json={**jina, **fields})
        assert refused.status_code == 400, fields
        assert says in refused.json()["error"]["message"]


def test_raw_vectors_are_scaled_only_where_a_caller_asks(tmp_path, bi_copy) -> None:
    """A bi-encoder without Normalize: Jina's normalized=true and TEI's normalize (true by
    default) scale its vectors to unit length, Jina's allowing int8 so; without it int8 is
    refused, on Jina's body and Cohere's."""
    manifest = read_manifest(bi_copy)
    assert manifest.pooling is not None
    raw_pooling = replace(manifest.pooling, normalize=False)
    write_manifest(bi_copy, replace(manifest, pooling=raw_pooling))
    running = ServerThread(settings_for(tmp_path / "collection", bi_copy, None))
    try:
        url = f"http://127.0.0.1:{running.running.http_port}"
        body = {"model": "jina-embeddings-v3", "input": ["northern lights", "the solar wind"]}

        def vectors(**fields: object) -> np.ndarray:
            reply = post(f"{url}/v1/embeddings", json={**body, **fields})
            assert reply.status_code == 200, reply.text
            return np.array([item["embedding"] for item in reply.json()["data"]])

        raw = vectors()
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        assert np.abs(norms - 1).min() > 0.05  # mean-pooled states are not unit length
        np.testing.assert_allclose(vectors(normalized=True), raw / norms, atol=1e-6)
        np.testing.assert_allclose(vectors(normalized=False), raw, atol=1e-6)
        scaled = vectors(normalized=True, embedding_type="int8")
        assert np.abs(scaled / 127 - raw / norms).max() <= 0.5 / 127 + 1e-6
        refused = post(f"{url}/v1/embeddings", json={**body, "embedding_type": "int8"})
        assert refused.status_code == 400
        assert "send normalized: true" in refused.json()["error"]["message"]
        # TEI's normalize defaults to true, as TEI's does; false returns the model's own.
        tei = post(f"{url}/embed", json={"inputs": body["input"]}).json()
        np.testing.assert_allclose(tei, raw / norms, atol=1e-6)
        tei_raw = post(f"{url}/embed", json={"inputs": body["input"], "normalize": False}).json()
        np.testing.assert_allclose(tei_raw, raw, atol=1e-6)
        cohere_int8 = {"texts": body["input"], "embedding_types": ["int8"]}
        refused = post(f"{url}/v2/embed", json=cohere_int8)
        assert refused.status_code == 400
        assert "not normalized" in refused.json()["message"]
    finally:
        running.stop()


def test_native_search_mirrors_grpc_search(server, base, data) -> None:
    query = data.topics[1].query
    expected = server.stub().Search(
        pb.SearchRequest(query=query, top_n=5, rerank_budget_ms=0, include_text=True)
    )
    reply = post(
        f"{base}/v1/search",
        json={"query": query, "top_n": 5, "rerank_budget_ms": 0, "include_text": True},
    ).json()
    assert [h["id"] for h in reply["hits"]] == [h.id for h in expected.hits]
    assert reply["reranked_count"] == expected.reranked_count == reply["candidates"]
    for got, want in zip(reply["hits"], expected.hits, strict=True):
        assert got["score"] == pytest.approx(want.score, rel=1e-6)
        assert got["probability"] == pytest.approx(want.probability, rel=1e-6)
        assert got["text"] == want.text
        assert got["stage1_rank"] == want.stage1_rank
    assert reply["timings"]["total_ms"] > 0
    retrieve = post(
        f"{base}/v1/search", json={"query": query, "mode": "retrieve_only", "top_n": 3}
    ).json()
    assert retrieve["reranked_count"] == 0
    assert all("probability" not in hit for hit in retrieve["hits"])  # unset, so left out
    assert retrieve["first_stage"] == "hybrid"  # the server's default, as over gRPC
    lexical = post(
        f"{base}/v1/search",
        json={"query": query, "mode": "retrieve_only", "top_n": 3, "first_stage": "lexical"},
    ).json()
    grpc_lexical = server.stub().Search(
        pb.SearchRequest(query=query, mode=pb.SEARCH_MODE_RETRIEVE_ONLY, top_n=3,
                         first_stage=pb.FIRST_STAGE_LEXICAL)
    )  # fmt: skip
    assert [h["id"] for h in lexical["hits"]] == [h.id for h in grpc_lexical.hits]
    assert [h["lexical_rank"] for h in lexical["hits"]] == [0, 1, 2]
    assert all("dense_rank" not in h for h in lexical["hits"])
    assert lexical["lexical_candidates"] == grpc_lexical.lexical_candidates
    assert lexical["dense_candidates"] == 0


def test_long_documents_score_alike_through_cohere_grpc_and_native(server, base, data) -> None:
    query = data.topics[5].query
    texts = [
        "\n".join(segment.text for segment in data.segments[start : start + 5])
        for start in (300, 305)
    ] + [data.segments[310].text]
    expected = grpc_rerank(server, query, texts, max_chunks_per_doc=3)
    assert max(result.passage.windows for result in expected) == 3  # read in windows
    with cohere.Client(api_key="unused", base_url=base) as client:
        reply = client.rerank(
            model="rerank-english-v3.0", query=query, documents=texts, max_chunks_per_doc=3
        )
    assert [r.index for r in reply.results] == [r.index for r in expected]
    for got, want in zip(reply.results, expected, strict=True):
        assert got.relevance_score == pytest.approx(want.probability, rel=1e-6)
    raw = post(
        f"{base}/v1/rerank", json={"query": query, "documents": texts, "max_chunks_per_doc": 3}
    ).json()
    for got, want in zip(raw["results"], expected, strict=True):
        assert got["passage"]["windows"] == want.passage.windows
        assert (got["passage"]["start"], got["passage"]["end"]) == (
            want.passage.start,
            want.passage.end,
        )
    # Stored: the native search route and gRPC Search read the same windows.
    upsert(server.stub(), [document("long-0", texts[0], long=True)])
    try:
        search = {"query": query, "rerank_budget_ms": 0, "metadata_filter": {"long": True}}
        native = post(f"{base}/v1/search", json={**search, "max_chunks_per_doc": 3}).json()
        grpc_hits = server.stub().Search(
            pb.SearchRequest(
                query=query, rerank_budget_ms=0,
                metadata_filter={"long": struct_pb2.Value(bool_value=True)},
                max_chunks_per_doc=3,
            )
        ).hits  # fmt: skip
        assert [h["id"] for h in native["hits"]] == [h.id for h in grpc_hits] == ["long-0"]
        assert native["hits"][0]["score"] == pytest.approx(grpc_hits[0].score, rel=1e-6)
        assert native["hits"][0]["passage"]["windows"] == grpc_hits[0].passage.windows == 3
        # Batched with other pairs, dynamic INT8 moves a score slightly (test_search).
        assert native["hits"][0]["score"] == pytest.approx(expected_score(expected, 0), abs=0.1)
    finally:
        server.stub().Delete(pb.DeleteRequest(ids=["long-0"]))


def expected_score(results: list[pb.RerankResult], index: int) -> float:
    return next(result.relevance_score for result in results if result.index == index)


def test_native_search_min_rerank_is_429_with_retry_after(base, data) -> None:
    body = {"query": data.topics[4].query, "rerank_budget_ms": 5, "min_rerank": 50}
    reply = post(f"{base}/v1/search", json=body)
    assert reply.status_code == 429, reply.text
    assert int(reply.headers["retry-after"]) >= 1
    assert "min_rerank=50" in reply.json()["error"]["message"]


def test_native_upsert_get_delete_round_trip(base) -> None:
    documents = [
        {"id": "http-1", "text": "Tandem serves rerankers over HTTP.", "metadata": {"lang": "en"}},
        {"id": "http-2", "text": "A second document about gRPC."},
    ]
    written = post(f"{base}/v1/upsert", json={"documents": documents}).json()
    assert (written["received"], written["inserted"]) == (2, 2)
    fetched = post(f"{base}/v1/get", json={"ids": ["http-1", "missing"]}).json()
    assert fetched["documents"] == [documents[0]]
    assert fetched["not_found"] == ["missing"]
    found = post(
        f"{base}/v1/search",
        json={"query": "rerankers over HTTP", "metadata_filter": {"lang": "en"},
              "mode": "retrieve_only"},
    ).json()  # fmt: skip
    assert [hit["id"] for hit in found["hits"]] == ["http-1"]
    deleted = post(f"{base}/v1/delete", json={"ids": ["http-1", "http-2"]}).json()
    assert deleted["deleted"] == 2


def test_info_and_health(base, server) -> None:
    info = get(f"{base}/info").json()
    assert info["score_activation"] == "sigmoid"
    assert info["reranker"]["verified"] is True
    grpc_reranker = server.stub().Info(pb.InfoRequest()).reranker
    assert info["reranker"]["runtime_choice"] == grpc_reranker.runtime_choice != ""
    assert info["reranker"]["inference_precision"] == grpc_reranker.inference_precision
    assert info["dimension"] == server.stub().Info(pb.InfoRequest()).dimension
    health = get(f"{base}/health")
    assert (health.status_code, health.json()) == (200, {"status": "SERVING"})


def test_every_reply_says_the_servers_own_time(base, case) -> None:
    query, texts = case
    started = time.perf_counter()
    reranked = post(f"{base}/v2/rerank", json={"query": query, "documents": texts})
    took_ms = (time.perf_counter() - started) * 1000
    assert reranked.status_code == 200
    timing = reranked.headers["server-timing"]
    total_ms, call_ms = server_timing_ms(timing, "total"), server_timing_ms(timing, "call")
    assert 0 < call_ms < total_ms < took_ms
    # Scoring every document takes far longer than answering /health.
    assert server_timing_ms(get(f"{base}/health").headers["server-timing"], "total") < call_ms
    # Refusals carry it too: a body the route refuses, and one the door refuses first.
    bad = post(f"{base}/v2/rerank", json={"query": query})
    too_large = post(f"{base}/rerank", json={"query": "q", "texts": ["x" * 1000] * 300})
    for refused, status in ((bad, 400), (too_large, 413)):
        assert refused.status_code == status
        assert server_timing_ms(refused.headers["server-timing"], "total") > 0


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/v2/rerank", {"query": "q", "documents": "not a list"}, "message"),
        ("/v2/rerank", {"documents": ["d"]}, "message"),
        ("/v2/rerank", {"query": "  ", "documents": ["d"]}, "message"),
        ("/v2/rerank", {"query": "q", "documents": ["d"], "top_n": 0}, "message"),
        ("/v1/rerank", {"query": "q", "documents": ["d"], "rank_fields": ["title"]}, "message"),
        ("/rerank", {"query": "q", "texts": [1, 2]}, "error"),
        ("/rerank", {"query": "q", "documents": "one text"}, "error"),
        ("/embed", {"inputs": []}, "error"),
        ("/embed", {"inputs": "x", "normalize": False}, "error"),
        ("/embed", {"inputs": "x", "prompt_name": "query"}, "error"),
        ("/", {"inputs": "x", "parameters": {"normalize": False}}, "error"),
        ("/", {"inputs": "x", "parameters": {"truncation_direction": "Left"}}, "error"),
        ("/", {"input": "x"}, "error"),
        ("/", ["x"], "error"),
        ("/", {"query": "q"}, "error"),
        ("/v1/embed", {"model": "m"}, "message"),
        ("/v1/embed", {"texts": []}, "message"),
        ("/v2/embed", {"texts": ["x"], "embedding_types": ["float16"]}, "message"),
        ("/v2/embed", {"texts": ["x"], "truncate": "START"}, "message"),
        ("/v2/embed", {"texts": ["x"], "output_dimension": 1024}, "message"),
        ("/v2/embed", {"texts": ["x"], "max_tokens": 16}, "message"),
        ("/v2/embed", {"images": ["data:image/png;base64,AAAA"]}, "message"),
        ("/v2/embed", {"inputs": [{"content": [{"type": "image_url"}]}]}, "message"),
        ("/v2/embed", {"texts": ["word " * 2000], "truncate": "NONE"}, "message"),
        ("/v1/search", {"query": "q", "recall_k": "many"}, "error"),
        ("/v1/search", {"query": "q", "mode": "sideways"}, "error"),
        ("/v1/search", {"query": "q", "first_stage": "sparse"}, "error"),
        ("/v1/search", {"query": "q", "lexical_weight": -1}, "error"),
        ("/v1/upsert", {"documents": [{"id": "", "text": "t"}]}, "error"),
    ],
)
def test_bad_requests_get_400_in_the_shape_of_the_route(base, path, payload, field) -> None:
    reply = post(f"{base}{path}", json=payload)
    assert reply.status_code == 400, reply.text
    body = reply.json()
    message = body[field]["message"] if isinstance(body[field], dict) else body[field]
    assert message
    assert "internal" not in message.lower()


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("/v1/upsert", '{"documents": [{"id": "nan", "text": "t", "metadata": {"x": NaN}}]}'),
        ("/v1/search", '{"query": "q", "metadata_filter": {"x": Infinity}}'),
        ("/v2/rerank", '{"query": "q", "documents": ["d"], "top_n": Infinity}'),
    ],
)
def test_nan_and_infinity_literals_are_refused_not_stored(base, path, content) -> None:
    # Python's JSON parser accepts these literals; JSON (and SQLite's JSON functions) do not.
    reply = post(f"{base}{path}", content=content, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert post(f"{base}/v1/get", json={"ids": ["nan"]}).json()["not_found"] == ["nan"]


def test_malformed_json_is_400_not_500(base) -> None:
    for path in ("/v2/rerank", "/rerank", "/v1/embeddings", "/v1/search"):
        reply = post(
            f"{base}{path}", content=b'{"query": ', headers={"content-type": "application/json"}
        )
        assert reply.status_code == 400, (path, reply.text)
        assert "not valid JSON" in reply.text


@pytest.mark.parametrize(
    ("path", "content"),
    [
        (
            "/v1/upsert",
            rb'{"documents": [{"id": "lone", "text": "t", "metadata": {"x": "\ud800"}}]}',
        ),
        ("/v1/upsert", rb'{"documents": [{"id": "lone", "text": "half \udc00 a pair"}]}'),
        ("/v1/upsert", b'{"documents": [{"id": "lone\xed\xa0\x80", "text": "t"}]}'),  # CESU-8
        ("/v1/search", rb'{"query": "q", "metadata_filter": {"x\uD800": 1}}'),
        ("/v2/rerank", rb'{"model": "m", "query": "q\ud800", "documents": ["d"]}'),
        ("/rerank", rb'{"query": "q", "texts": ["\ud83d"]}'),
        ("/v1/embeddings", rb'{"model": "m", "input": ["x\udfff"]}'),
        ("/", rb'{"inputs": "\ud800"}'),
    ],
)
def test_a_lone_surrogate_is_refused_as_not_json_not_a_500(base, path, content) -> None:
    """JSON's escapes can spell half a surrogate pair, which Python's parser accepts and no
    UTF-8 encoder does: once it reached SQLite or the tokenizer as a 500."""
    reply = post(f"{base}{path}", content=content, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert "lone UTF-16 surrogate" in reply.text
    assert post(f"{base}/v1/get", json={"ids": ["lone"]}).json()["not_found"] == ["lone"]


def test_a_surrogate_pair_and_an_escaped_backslash_are_text(base) -> None:
    text = "an emoji \U0001f600 and a literal \\ud800"
    content = json.dumps({"documents": [{"id": "pair", "text": text}]}).encode()  # escapes it
    assert rb"\ud83d\ude00" in content
    assert post(f"{base}/v1/upsert", content=content,
                headers={"content-type": "application/json"}).status_code == 200  # fmt: skip
    try:
        stored = post(f"{base}/v1/get", json={"ids": ["pair"]}).json()["documents"]
        assert stored[0]["text"] == text
    finally:
        post(f"{base}/v1/delete", json={"ids": ["pair"]})


def test_a_body_over_the_message_limit_is_413(base) -> None:
    big = {"query": "q", "texts": ["x" * 1000] * 300}  # ~300 KB, over the 256 KiB limit
    reply = post(f"{base}/rerank", json=big)
    assert reply.status_code == 413
    assert "max_message_bytes" in reply.json()["error"]
    chunked = post(
        f"{base}/rerank", content=iter([json.dumps(big).encode()]),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert chunked.status_code == 413


def test_unknown_route_and_state_conflicts(base, tmp_path, bi_int8, data) -> None:
    assert get(f"{base}/v9/nothing").status_code == 404
    retrieve_only = ServerThread(settings_for(tmp_path, bi_int8[0], None))
    try:
        url = f"http://127.0.0.1:{retrieve_only.running.http_port}"
        reply = post(f"{url}/v2/rerank", json={"query": "q", "documents": ["d"]})
        assert reply.status_code == 409
        assert "retrieve-only" in reply.json()["message"]
        assert get(f"{url}/info").json()["score_activation"] == ""
    finally:
        retrieve_only.stop()


def test_metrics_count_http_requests_by_route_and_status(server, base) -> None:
    get(f"{base}/health")
    post(f"{base}/v1/search", json={"query": ""})
    registry = server.running.metrics.registry

    def count(route: str, status: str) -> float:
        value = registry.get_sample_value(
            "tandem_http_requests_total", {"route": route, "status": status}
        )
        return value or 0.0

    # Counted once the reply is sent, so a moment after the client has it.
    deadline = time.monotonic() + 5
    while count("/v1/search", "400") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count("/health", "200") >= 1
    assert count("/v1/search", "400") >= 1
    assert registry.get_sample_value("tandem_http_request_seconds_count", {"route": "/health"})


def test_token_tls_and_overload_refusals(tmp_path, bi_int8, ce_int8, data) -> None:
    from test_grpc_server import make_certificate

    cert, key = make_certificate(tmp_path)
    settings = settings_for(
        tmp_path / "c", bi_int8[0], ce_int8[0], tls_cert=cert, tls_key=key, token=TOKEN,
        max_in_flight=1,
    )  # fmt: skip
    running = ServerThread(settings)
    url = f"https://localhost:{running.running.http_port}"
    try:
        with httpx.Client(
            verify=ssl.create_default_context(cafile=str(cert)), timeout=HTTP_TIMEOUT
        ) as client:
            assert client.get(f"{url}/health").status_code == 200  # open, as gRPC health is
            assert client.get(f"{url}/").status_code == 200  # the search page
            root = client.post(f"{url}/", json={"inputs": "x"})  # TEI's embed: not open
            assert root.status_code == 401
            assert "Authorization: Bearer" in root.json()["error"]
            refused = client.post(f"{url}/v2/rerank", json={"query": "q", "documents": ["d"]})
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in refused.json()["message"]
            wrong = client.post(
                f"{url}/v1/embeddings", json={"model": "m", "input": "x"},
                headers={"Authorization": "Bearer nope"},
            )  # fmt: skip
            assert wrong.status_code == 401
            assert wrong.json()["error"]["type"] == "authentication_error"
            sdk = cohere.ClientV2(api_key=TOKEN, base_url=url, httpx_client=client)
            assert len(sdk.rerank(model="m", query="q", documents=["a", "b"]).results) == 2

            # One call in flight (max_in_flight=1): a second is refused with 429, Retry-After.
            texts = [segment.text for segment in data.segments[:200]]
            slow = threading.Thread(
                target=client.post,
                args=(f"{url}/rerank",),
                kwargs={"json": {"query": "q", "texts": texts, "truncate": True},
                        "headers": {"Authorization": f"Bearer {TOKEN}"}, "timeout": 120},
            )  # fmt: skip
            slow.start()
            deadline = time.monotonic() + 30
            while running.running.gate.in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            shed = client.post(
                f"{url}/v1/search", json={"query": "q"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )  # fmt: skip
            slow.join()
            assert shed.status_code == 429, shed.text
            assert int(shed.headers["retry-after"]) >= 1
            assert shed.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    finally:
        running.stop()


def test_drain_finishes_http_requests_in_flight(tmp_path, bi_int8, ce_int8, data) -> None:
    running = ServerThread(settings_for(tmp_path, bi_int8[0], ce_int8[0], drain_seconds=60.0))
    url = f"http://127.0.0.1:{running.running.http_port}"
    texts = [segment.text for segment in data.segments[:150]]
    replies: list[httpx.Response] = []
    caller = threading.Thread(
        target=lambda: replies.append(
            post(f"{url}/rerank", json={"query": "q", "texts": texts, "truncate": True})
        )
    )  # fmt: skip
    caller.start()
    deadline = time.monotonic() + 30
    while running.running.gate.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    running.stop(grace=60.0)
    caller.join()
    assert replies
    assert replies[0].status_code == 200
    assert len(replies[0].json()) == len(texts)
    with pytest.raises(httpx.ConnectError):
        get(f"{url}/health")


FIELDS = ["query", "documents", "texts", "inputs", "input", "model", "top_n", "ids", "mode",
          "recall_k", "return_documents", "raw_scores", "truncate", "metadata_filter",
          "max_tokens_per_doc", "rerank_budget_ms", "encoding_format", "dimensions",
          "task", "embedding_type", "normalized", "late_chunking", "items"]  # fmt: skip
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)  # fmt: skip
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    json_values,
)
ROUTES = ["/v1/rerank", "/v2/rerank", "/rerank", "/embed", "/", "/v1/embed", "/v2/embed",
          "/v1/embeddings", "/v1/search", "/v1/upsert", "/v1/get", "/v1/delete",
          "/v1/feedback"]  # fmt: skip


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@given(route=st.sampled_from(ROUTES), payload=bodies)
@FUZZ
def test_any_json_body_gets_an_answer_or_a_4xx_never_a_500(base, route, payload) -> None:
    reply = post(f"{base}{route}", json=payload)
    assert reply.status_code in (200, 400, 404, 409, 413), (route, payload, reply.text)
    assert reply.headers["content-type"].startswith("application/json")
