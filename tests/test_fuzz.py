"""Property-based fuzzing of every RPC through a real gRPC channel.

The property: every answer is a well-formed reply or a deliberate status code (never
INTERNAL or UNKNOWN), and the server keeps serving.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import ServerThread, document, settings_for, upsert

from tandem.v1 import tandem_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
DELIBERATE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EDGE_TEXTS = [
    "",
    " ",
    "e\u0301\u0301\u0301",  # combining marks
    "\u05e9\u05dc\u05d5\u05dd \u202eevil\u202c",  # RTL and bidi overrides
    "zero\u200bwidth\u200d\ufeff",
    "emoji \U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f1fa\U0001f1f3",
    "control \x00\x01\x07\x1b[31m\x7f",
    "\U0010ffff\ufffe",
    "x" * 5000,
]
texts = st.one_of(st.sampled_from(EDGE_TEXTS), st.text(max_size=300))
sizes = st.one_of(
    st.none(),
    st.sampled_from([0, 1, 5, 100, 1000, 1001, 2**31 - 1, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
ids = st.one_of(st.sampled_from(["seg-0", "seg-1", "", "nope", "seg-0"]), st.text(max_size=40))


@pytest.fixture(scope="module")
def server(tmp_path_factory, bi_int8, ce_int8, data):
    # A small budget default keeps each example quick; the fuzzing is about inputs.
    settings_ = settings_for(
        tmp_path_factory.mktemp("fuzz"), bi_int8[0], ce_int8[0], default_rerank_budget_ms=20
    )
    running = ServerThread(settings_)
    upsert(running.stub(), [document(f"seg-{i}", s.text) for i, s in enumerate(data.segments[:30])])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    return server.stub()


def answered(call, request, **kwargs):
    try:
        return call(request, timeout=60, **kwargs)
    except grpc.RpcError as error:
        code = error.code()
        details = error.details()
    assert code in DELIBERATE, (code, details, request)
    return None


def optional(message, name, value):
    if value is not None:
        setattr(message, name, value)
    return message


@FUZZ
@given(query=texts, recall_k=sizes, top_n=sizes, mode=st.integers(-1, 4), budget=sizes,
       truncate=st.one_of(st.none(), st.booleans()), key=st.text(max_size=10),
       value=st.one_of(st.text(max_size=10), st.floats(allow_nan=True), st.booleans()))  # fmt: skip
def test_search(stub, query, recall_k, top_n, mode, budget, truncate, key, value):
    request = pb.SearchRequest(query=query, mode=mode, include_text=True)
    for name, setting in (("recall_k", recall_k), ("top_n", top_n),
                          ("rerank_budget_ms", budget), ("truncate", truncate)):  # fmt: skip
        optional(request, name, setting)
    if isinstance(value, str):
        request.metadata_filter[key].string_value = value
    elif isinstance(value, bool):
        request.metadata_filter[key].bool_value = value
    else:
        request.metadata_filter[key].number_value = value
    reply = answered(stub.Search, request)
    if reply is not None:
        assert len(reply.hits) <= (top_n or 5)
        assert reply.reranked_count <= reply.candidates


@FUZZ
@given(query=texts, documents=st.lists(st.one_of(texts.map(lambda t: ("text", t)),
                                                 ids.map(lambda i: ("id", i)),
                                                 st.just(("none", ""))), max_size=20),
       top_n=sizes, truncate=st.one_of(st.none(), st.booleans()))  # fmt: skip
def test_rerank(stub, query, documents, top_n, truncate):
    request = pb.RerankRequest(query=query, return_documents=True)
    for kind, value in documents:
        entry = request.documents.add()
        if kind == "text":
            entry.text = value
        elif kind == "id":
            entry.id = value
    optional(request, "top_n", top_n)
    optional(request, "truncate", truncate)
    reply = answered(stub.Rerank, request)
    if reply is not None:
        indexes = [result.index for result in reply.results]
        assert len(set(indexes)) == len(indexes)
        assert all(0 <= index < len(documents) for index in indexes)


@FUZZ
@given(texts=st.lists(texts, max_size=10), truncate=st.one_of(st.none(), st.booleans()))
def test_embed(stub, texts, truncate):
    reply = answered(stub.Embed, optional(pb.EmbedRequest(texts=texts), "truncate", truncate))
    if reply is not None:
        assert len(reply.embeddings) == len(texts)
        assert all(len(e.values) == reply.dimension for e in reply.embeddings)


@FUZZ
@given(batches=st.lists(st.lists(st.tuples(ids, texts), max_size=5), max_size=3),
       truncate=st.one_of(st.none(), st.booleans()))  # fmt: skip
def test_upsert_get_delete(stub, batches, truncate):
    messages = [
        optional(
            pb.UpsertRequest(documents=[document(i, t) for i, t in batch]), "truncate", truncate
        )
        for batch in batches
    ]
    reply = answered(stub.Upsert, iter(messages))
    if reply is not None:
        assert reply.received == sum(map(len, batches))
    every_id = [i for batch in batches for i, _ in batch]
    got = answered(stub.Get, pb.GetRequest(ids=every_id))
    if got is not None:
        assert {d.id for d in got.documents}.isdisjoint(got.not_found)
    answered(stub.Delete, pb.DeleteRequest(ids=every_id[:2]))


def test_bytes_no_python_client_would_send(server):
    """Invalid UTF-8 (a lone surrogate, as a Java or Go client could encode it) and
    truncated fields reach the server as raw bytes: INVALID_ARGUMENT, not INTERNAL."""
    channel = server.channel()
    raw = channel.unary_unary(
        "/tandem.v1.Retrieval/Search",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    lone_surrogate = b"\xed\xa0\x80"  # U+D800 in CESU-style UTF-8
    for payload in (
        b"\x0a\x03" + lone_surrogate,  # field 1 (query): a string that is not UTF-8
        b"\x0a\x10abc",  # a length running past the end
        b"\xff\xff\xff\xff",  # not protobuf at all
    ):
        with pytest.raises(grpc.RpcError) as caught:
            raw(payload, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, payload
    stream = channel.stream_unary(
        "/tandem.v1.Retrieval/Upsert",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    with pytest.raises(grpc.RpcError) as caught:
        stream(iter([b"\x0a\x05\x0a\x03" + lone_surrogate]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.stub().Info(pb.InfoRequest()).version  # still serving


def test_ten_megabyte_strings(stub):
    huge = "token " * (10 * 1024 * 1024 // 6)
    reply = stub.Search(pb.SearchRequest(query=huge, top_n=1, rerank_budget_ms=0), timeout=120)
    assert reply.truncated
    reply = stub.Embed(pb.EmbedRequest(texts=[huge]), timeout=120)
    assert reply.truncated


@pytest.mark.parametrize("number", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_metadata_filter_is_invalid_argument(stub, number):
    """Found by the fuzzer: a filter value JSON cannot hold was INTERNAL."""
    request = pb.SearchRequest(query="q")
    request.metadata_filter["year"].number_value = number
    with pytest.raises(grpc.RpcError) as caught:
        stub.Search(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "metadata_filter['year']" in caught.value.details()


@pytest.mark.parametrize("number", [float("inf"), float("nan")])
def test_non_finite_metadata_is_invalid_argument_and_nothing_is_stored(stub, number):
    """Found while building the HTTP door: such metadata was INTERNAL over gRPC, and over
    HTTP (whose parser accepts NaN) it was stored, where SQLite's JSON functions choke on it."""
    document = pb.Document(id="non-finite", text="a document")
    document.metadata.update({"score": number})
    with pytest.raises(grpc.RpcError) as caught:
        stub.Upsert(iter([pb.UpsertRequest(documents=[document])]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or Infinity" in caught.value.details()
    assert list(stub.Get(pb.GetRequest(ids=["non-finite"]), timeout=30).not_found) == ["non-finite"]
