"""Metadata filters: each operator's meaning, the refusals, the SQL that narrows a scan never
dropping a match, and a served collection of RAG24 segments filtered through gRPC, HTTP and
`tandem search` against the unfiltered ranking."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import ServerThread, document, grpc_filter, post, settings_for, upsert

from tandem import cli
from tandem.server.engine.filters import MAX_DEPTH, InvalidFilter, narrowing, parse_filter
from tandem.server.engine.store import DocumentStore, NewDocument
from tandem.v1 import tandem_pb2 as pb

DOC = {
    "lang": "en",
    "year": 2021,
    "price": 9.5,
    "tags": ["faq", "howto"],
    "reviewed": True,
    "editor": None,
    "date": "2024-06-15",
    "author": {"name": "ada"},
}

# (filter, does DOC match it): each operator on a scalar, an array, a missing key and null.
SEMANTICS = [
    ({"lang": "en"}, True),
    ({"lang": "de"}, False),
    ({"lang": "en", "year": 2020}, False),  # every key must hold
    ({"year": 2021.0}, True),  # numbers by value
    ({"reviewed": 1}, False),  # true is not 1, as JSON sees it (Python's True == 1)
    ({"year": True}, False),
    ({"reviewed": True}, True),
    ({"tags": "faq"}, True),  # an array matches by any element
    ({"tags": ["faq", "howto"]}, True),  # or as a whole
    ({"tags": ["howto", "faq"]}, False),
    ({"author": {"name": "ada"}}, True),  # an object without operators is a plain value
    ({"author": {"$eq": {"name": "ada"}}}, True),
    ({"missing": None}, True),  # null matches a missing key, as MongoDB's
    ({"editor": None}, True),
    ({"editor": {"$exists": True}}, True),  # a null value is present
    ({"missing": {"$exists": False}}, True),
    ({"lang": {"$exists": False}}, False),
    ({"lang": {"$ne": "de"}}, True),
    ({"lang": {"$ne": "en"}}, False),
    ({"missing": {"$ne": "x"}}, True),  # a negation holds where the key is missing
    ({"missing": {"$ne": None}}, False),
    ({"tags": {"$ne": "faq"}}, False),
    ({"year": {"$gt": 2020}}, True),
    ({"year": {"$gt": 2021}}, False),
    ({"year": {"$gte": 2021, "$lt": 2022}}, True),
    ({"year": {"$gte": 2021, "$lt": 2021.5}}, True),
    ({"price": {"$lte": 9.5}}, True),
    ({"price": {"$lt": 9.5}}, False),
    ({"year": {"$lt": "2100"}}, False),  # a number never compares with a string
    ({"date": {"$gte": "2024-06-01", "$lt": "2024-07-01"}}, True),  # ISO dates order as text
    ({"date": {"$gt": "2024-06-15"}}, False),
    ({"missing": {"$lt": 1}}, False),
    ({"reviewed": {"$gt": 0}}, False),  # nor does a boolean
    ({"lang": {"$in": ["de", "en"]}}, True),
    ({"lang": {"$in": []}}, False),
    ({"tags": {"$in": ["news", "howto"]}}, True),
    ({"tags": {"$in": ["news"]}}, False),
    ({"missing": {"$in": [None, 1]}}, True),
    ({"lang": {"$nin": ["de", "fr"]}}, True),
    ({"tags": {"$nin": ["howto"]}}, False),
    ({"missing": {"$nin": ["x"]}}, True),
    ({"missing": {"$nin": [None]}}, False),
    ({"tags": {"$all": ["howto", "faq"]}}, True),
    ({"tags": {"$all": ["howto", "news"]}}, False),
    ({"tags": {"$all": []}}, False),
    ({"lang": {"$all": ["en"]}}, True),
    ({"missing": {"$all": ["x"]}}, False),
    ({"$or": [{"lang": "de"}, {"year": 2021}]}, True),
    ({"$or": [{"lang": "de"}, {"year": 2020}]}, False),
    ({"$and": [{"lang": "en"}, {"year": {"$gt": 2000}}]}, True),
    ({"$and": [{"lang": "en"}, {"$or": [{"tags": "news"}, {"price": {"$lt": 10}}]}]}, True),
    ({"$and": [{"lang": "en"}], "year": 1999}, False),
    ({"$nor": [{"lang": "de"}, {"year": 2020}]}, True),
    ({"$nor": [{"lang": "de"}, {"year": 2021}]}, False),  # one holding is enough to fail
    ({"$nor": [{"$and": [{"lang": "en"}, {"tags": "news"}]}]}, True),
    ({"year": {"$not": {"$gt": 2021}}}, True),
    ({"year": {"$not": {"$gte": 2021, "$lt": 2022}}}, False),  # not both, as MongoDB's
    ({"year": {"$not": {"$gte": 2000, "$lt": 2021}}}, True),
    ({"missing": {"$not": {"$gt": 1}}}, True),  # a negation holds where the key is missing
    ({"tags": {"$not": {"$in": ["faq"]}}}, False),
    ({"year": {"$gt": 2000, "$not": {"$eq": 2021}}}, False),
]


@pytest.mark.parametrize(("raw", "expected"), SEMANTICS, ids=[json.dumps(r) for r, _ in SEMANTICS])
def test_each_operator_means_what_mongodb_and_pinecone_say(raw, expected) -> None:
    wanted = parse_filter(raw)
    assert wanted is not None
    assert wanted.matches(DOC) is expected


def nested(depth: int) -> dict[str, Any]:
    raw: dict[str, Any] = {"lang": "en"}
    for _ in range(depth):
        raw = {"$and": [raw]}
    return raw


REFUSED = [
    (
        {"$not": {"a": 1}},
        "metadata_filter['$not']: unknown operator '$not'; at the top of a filter only $and, "
        "$or, $nor combine filters ($nor: [filter] negates a filter)",
    ),
    (
        {"year": {"$not": 2020}},
        "metadata_filter['year']['$not'] takes an object of comparisons to negate, such as "
        '{"$gte": 2000} (got a number)',
    ),
    ({"year": {"$not": {}}}, "(got an empty object)"),
    ({"year": {"$not": {"$not": {"$eq": 1}}}}, "['$not'] holds another $not"),
    ({"year": {"$not": {"$between": 1}}}, "['year']['$not']['$between']: unknown operator"),
    ({"$nor": []}, "metadata_filter['$nor'] must be a non-empty list of filters"),
    ({"year": {"$gte": 1, "$between": 2}}, "metadata_filter['year']['$between']: unknown operator"),
    (
        {"year": {"$gt": [1, 2]}},
        "metadata_filter['year']['$gt'] compares with a number or a string",
    ),
    ({"year": {"$gt": True}}, "not a boolean"),
    ({"year": {"$lt": None}}, "not null"),
    (
        {"tags": {"$in": "faq"}},
        "metadata_filter['tags']['$in'] takes a list of values (got a string)",
    ),
    ({"tags": {"$nin": 3}}, "takes a list of values (got a number)"),
    ({"tags": {"$all": {"a": 1}}}, "takes a list of values (got an object)"),
    ({"tags": {"$exists": 1}}, "'$exists'] takes true or false (got a number)"),
    ({"year": {"$gt": 1, "max": 2}}, "mixes operators with plain keys ('max')"),
    ({"$or": []}, "metadata_filter['$or'] must be a non-empty list of filters"),
    ({"$or": {"a": 1}}, "must be a non-empty list of filters (got an object)"),
    ({"$and": [{"a": 1}, 3]}, "metadata_filter['$and'][1] must be an object of metadata keys"),
    ({"$and": [{}]}, "metadata_filter['$and'][0] is empty"),
    (nested(MAX_DEPTH + 1), f"nest deeper than {MAX_DEPTH} levels"),
]


@pytest.mark.parametrize(("raw", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_a_filter_that_means_nothing_is_refused_saying_where(raw, message) -> None:
    with pytest.raises(InvalidFilter) as caught:
        parse_filter(raw)
    assert message in str(caught.value)


def test_no_filter_and_an_empty_one_match_everything() -> None:
    assert parse_filter(None) is None
    assert parse_filter({}) is None
    assert parse_filter(nested(MAX_DEPTH)) is not None


# The store's SQL narrowing: a superset of the matches, never fewer

KEYS = ["a", "b", "\x00"]  # the last cannot be quoted in a JSON path
# A small pool, so a filter's operand often meets the same value stored (or in an array).
STORED = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1, 2),
    st.sampled_from([1.0, 1.5, 2**70, "", "x", "2024-01", "é"]),
)
# A filter may hold what the store never does: a lone surrogate (JSON can escape one).
SCALARS = st.one_of(STORED, st.just("\ud800"))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))
METADATA = st.dictionaries(
    st.sampled_from(KEYS), st.one_of(STORED, st.lists(STORED, max_size=3)), max_size=3
)


@st.composite
def filters(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    if depth < 2 and draw(st.integers(0, 4)) == 0:
        logical = draw(st.sampled_from(["$and", "$or", "$nor"]))
        return {logical: draw(st.lists(filters(depth + 1), min_size=1, max_size=3))}
    key = draw(st.sampled_from(KEYS))
    op = draw(st.sampled_from(["plain", "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in",
                               "$nin", "$all", "$exists"]))  # fmt: skip
    if op == "plain":
        return {key: draw(VALUES)}
    if op in ("$gt", "$gte", "$lt", "$lte"):
        operand: Any = draw(st.one_of(st.integers(-1, 2), st.sampled_from([1.5, "x", "2024"])))
    elif op in ("$in", "$nin", "$all"):
        operand = draw(st.lists(SCALARS, max_size=3))
    elif op == "$exists":
        operand = draw(st.booleans())
    else:
        operand = draw(VALUES)
    if draw(st.integers(0, 4)) == 0:
        return {key: {"$not": {op: operand}}}
    return {key: {op: operand}}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents=st.lists(METADATA, min_size=1, max_size=8), raw=filters())
def test_sql_narrowing_never_drops_a_match(documents, raw) -> None:
    wanted = parse_filter(raw)
    assert wanted is not None
    with tempfile.TemporaryDirectory() as folder:
        store = DocumentStore(Path(folder) / "docs.sqlite")
        try:
            written = store.upsert(
                [NewDocument(id=str(i), text="t", metadata=m) for i, m in enumerate(documents)],
                np.ones((len(documents), 4), dtype=np.float32),
                [np.zeros(1, dtype=np.int32)] * len(documents),
            )
            expected = [
                k for k, m in zip(written.keys, documents, strict=True) if wanted.matches(m)
            ]
            assert store.keys_matching(wanted) == expected
        finally:
            store.close()


OTHERS = [{}, {"tags": "faq", "year": "2021"}, {"year": True, "lang": ["en"]}, {"editor": 0}]


def test_the_store_scan_agrees_with_python_on_every_case(tmp_path) -> None:
    store = DocumentStore(tmp_path / "docs.sqlite")
    try:
        documents = [DOC, *OTHERS]
        written = store.upsert(
            [NewDocument(id=str(i), text="t", metadata=m) for i, m in enumerate(documents)],
            np.ones((len(documents), 4), dtype=np.float32),
            [np.zeros(1, dtype=np.int32)] * len(documents),
        )
        for raw, _ in SEMANTICS:
            wanted = parse_filter(raw)
            assert wanted is not None
            expected = [
                k for k, m in zip(written.keys, documents, strict=True) if wanted.matches(m)
            ]
            assert store.keys_matching(wanted) == expected, raw
    finally:
        store.close()


def test_the_scan_is_narrowed_where_sql_can_compare() -> None:
    """The narrowing is used (not just harmless): plain keys, ranges and lists narrow; a
    branch of $or that cannot narrow, a negation, null and an unquotable key do not."""
    for raw in (
        {"a": "x"}, {"a": {"$gte": 2}}, {"a": {"$in": [1, "x"]}}, {"a": {"$exists": True}},
        {"$or": [{"a": 1}, {"b": {"$lt": 2}}]}, {"a": {"$ne": 1}, "b": 2},
        {"a": 1, "b": {"$not": {"$gt": 2}}},
    ):  # fmt: skip
        assert narrowing(parse_filter(raw)) is not None, raw
    for raw in (
        {"a": {"$ne": 1}}, {"a": {"$nin": [1]}}, {"a": None}, {"a": {"$in": [None]}},
        {"\x00": 1}, {"$or": [{"a": 1}, {"b": {"$ne": 2}}]}, {"a": {"$exists": False}},
        {"$nor": [{"a": 1}]}, {"a": {"$not": {"$gt": 1}}},
        {"$or": [{"a": 1}, {"$nor": [{"b": 1}]}]},
    ):  # fmt: skip
        assert narrowing(parse_filter(raw)) is None, raw


# Served: RAG24 segments with metadata, through every door

SEGMENTS = 300
K = 20


def metadata_of(i: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "year": 1995 + i % 30,
        "lang": ["en", "de", "fr"][i % 3],
        "reviewed": i % 5 == 0,
        "date": f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}",
    }
    if i % 4 != 3:
        metadata["tags"] = [["faq"], ["howto", "faq"], []][i % 4]
    return metadata


# Each filter beside the same question asked in plain Python, which the test trusts instead of
# the server's matcher.
SERVED: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
    ({"lang": "en"}, lambda m: m["lang"] == "en"),
    ({"year": {"$gte": 2020}}, lambda m: m["year"] >= 2020),
    ({"year": {"$gt": 1996, "$lte": 1997}}, lambda m: m["year"] == 1997),
    ({"tags": "faq"}, lambda m: "faq" in m.get("tags", [])),
    ({"tags": {"$all": ["faq", "howto"]}}, lambda m: len(m.get("tags", [])) == 2),
    ({"tags": {"$exists": False}}, lambda m: "tags" not in m),
    ({"lang": {"$nin": ["en", "de"]}}, lambda m: m["lang"] == "fr"),
    ({"lang": {"$ne": "en"}, "reviewed": True}, lambda m: m["lang"] != "en" and m["reviewed"]),
    ({"date": {"$gte": "2024-06-01", "$lt": "2024-07-01"}}, lambda m: m["date"][5:7] == "06"),
    (
        {"$or": [{"year": 1995}, {"date": {"$lt": "2024-02"}}]},
        lambda m: m["year"] == 1995 or m["date"] < "2024-02",
    ),
    (
        {
            "$and": [
                {"year": {"$in": [2000, 2001, 2002]}},
                {"$or": [{"lang": "fr"}, {"tags": {"$exists": True}}]},
            ]
        },
        lambda m: m["year"] in (2000, 2001, 2002) and (m["lang"] == "fr" or "tags" in m),
    ),
    ({"year": {"$in": []}}, lambda m: False),
    ({"year": {"$lt": "2000"}}, lambda m: False),
    (
        {"$nor": [{"lang": "en"}, {"tags": "faq"}]},
        lambda m: m["lang"] != "en" and "faq" not in m.get("tags", []),
    ),
    ({"year": {"$not": {"$gte": 2000, "$lt": 2020}}}, lambda m: not 2000 <= m["year"] < 2020),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, bi_int8, data):
    """A retrieve-only server over SEGMENTS segments, each with ``metadata_of`` its position;
    f32 vectors, so the exact scan of a selective filter ranks as the index does."""
    folder = tmp_path_factory.mktemp("filters") / "c"
    running = ServerThread(settings_for(folder, bi_int8[0], None, index_dtype="f32"))
    segments = data.segments[:SEGMENTS]
    reply = upsert(
        running.stub(),
        [document(s.id, s.text, **metadata_of(i)) for i, s in enumerate(segments)],
    )
    assert reply.inserted == SEGMENTS
    yield running, {s.id: metadata_of(i) for i, s in enumerate(segments)}
    running.stop()


@pytest.mark.slow
def test_every_door_returns_the_nearest_matches_and_only_them(server, data) -> None:
    running, metadata = server
    stub = running.stub()
    base = f"http://127.0.0.1:{running.running.http_port}"
    query = data.topics[3].query
    everything = stub.Search(
        pb.SearchRequest(
            query=query, recall_k=SEGMENTS, top_n=SEGMENTS, first_stage=pb.FIRST_STAGE_DENSE
        )
    )
    ranking = [hit.id for hit in everything.hits]
    assert sorted(ranking) == sorted(metadata)
    for raw, holds in SERVED:
        matching = [item for item in ranking if holds(metadata[item])]
        for stage in (pb.FIRST_STAGE_DENSE, pb.FIRST_STAGE_HYBRID, pb.FIRST_STAGE_LEXICAL):
            reply = stub.Search(
                pb.SearchRequest(
                    query=query, recall_k=K, top_n=K, first_stage=stage,
                    metadata_filter=grpc_filter(raw),
                )
            )  # fmt: skip
            ids = [hit.id for hit in reply.hits]
            where = (raw, pb.FirstStage.Name(stage))
            assert all(holds(metadata[item]) for item in ids), where
            assert len(set(ids)) == len(ids), where
            if stage == pb.FIRST_STAGE_DENSE:
                # Exact: the K nearest that match, however few match or where they lie.
                assert ids == matching[:K], where
            elif stage == pb.FIRST_STAGE_HYBRID:
                assert len(ids) == min(K, len(matching)), where
            else:
                # BM25 ranks only documents holding a query term: no more than K.
                assert len(ids) <= min(K, len(matching)), where
            if stage != pb.FIRST_STAGE_LEXICAL:
                # Those known to match: all of them, once fewer than K turned up near the query.
                assert reply.filter_matched <= len(matching), where
                if len(matching) < K:
                    assert reply.filter_matched == len(matching), where
        http = post(
            f"{base}/v1/search",
            json={"query": query, "recall_k": K, "top_n": K, "first_stage": "dense",
                  "metadata_filter": raw},
        )  # fmt: skip
        assert http.status_code == 200, http.text
        assert [hit["id"] for hit in http.json()["hits"]] == matching[:K], raw


@pytest.mark.slow
def test_a_bad_filter_is_invalid_argument_on_every_door(server, data, capsys) -> None:
    running, _ = server
    stub = running.stub()
    raw = {"year": {"$gte": 2020, "$between": [1, 2]}}
    with pytest.raises(grpc.RpcError) as caught:
        stub.Search(pb.SearchRequest(query="q", metadata_filter=grpc_filter(raw)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "metadata_filter['year']['$between']: unknown operator" in caught.value.details()
    http = post(
        f"http://127.0.0.1:{running.running.http_port}/v1/search",
        json={"query": "q", "metadata_filter": {"tags": {"$in": "faq"}}},
    )
    assert http.status_code == 400
    assert "metadata_filter['tags']['$in'] takes a list of values" in http.text
    code = cli.main(["search", "q", "--address", running.address, "--filter", json.dumps(raw)])
    assert code == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


@pytest.mark.slow
def test_tandem_search_takes_a_filter(server, data, capsys) -> None:
    running, metadata = server
    code = cli.main([
        "search", data.topics[3].query, "--address", running.address, "--top-n", "5",
        "--filter", '{"year": {"$gte": 2020}, "lang": {"$in": ["de", "fr"]}}',
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("5 hits")
    shown = [item for item in metadata if f" {item}  (" in out]
    assert len(shown) == 5
    assert all(metadata[item]["year"] >= 2020 and metadata[item]["lang"] != "en" for item in shown)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["search", "q", "--filter", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err


# Delete by filter


@pytest.fixture
def writable(tmp_path, bi_int8, data):
    running = ServerThread(settings_for(tmp_path / "c", bi_int8[0], None))
    segments = data.segments[:30]
    tenants = {s.id: "abc"[i % 3] for i, s in enumerate(segments)}
    reply = upsert(
        running.stub(),
        [document(s.id, s.text, tenant=tenants[s.id], n=i) for i, s in enumerate(segments)],
    )
    assert reply.inserted == len(segments)
    yield running, tenants
    running.stop()


def stored_ids(stub, ids) -> set[str]:
    return {d.id for d in stub.Get(pb.GetRequest(ids=ids)).documents}


@pytest.mark.slow
def test_delete_by_filter_takes_every_match_and_nothing_else(writable, data) -> None:
    running, tenants = writable
    stub = running.stub()
    ids = list(tenants)
    reply = stub.Delete(pb.DeleteRequest(metadata_filter=grpc_filter({"tenant": "a"})))
    gone = {item for item, tenant in tenants.items() if tenant == "a"}
    assert reply.deleted == len(gone) == 10
    assert stored_ids(stub, ids) == set(ids) - gone
    assert stub.Info(pb.InfoRequest()).index_size == len(ids) - len(gone)
    search = pb.SearchRequest(
        query=data.topics[0].query,
        recall_k=30,
        top_n=30,
        metadata_filter=grpc_filter({"tenant": "a"}),
    )
    assert not stub.Search(search).hits
    # Ids and a filter together: their union, once each; unknown ids are reported.
    b0 = next(item for item, tenant in tenants.items() if tenant == "b")
    both = stub.Delete(
        pb.DeleteRequest(
            ids=[b0, "missing"], metadata_filter=grpc_filter({"tenant": "b", "n": {"$lt": 10}})
        )
    )
    b_low = {item for i, item in enumerate(ids) if tenants[item] == "b" and i < 10}
    assert b0 in b_low
    assert both.deleted == len(b_low)
    assert list(both.not_found) == ["missing"]
    assert stored_ids(stub, ids) == set(ids) - gone - b_low
    # Over HTTP, as over gRPC.
    base = f"http://127.0.0.1:{running.running.http_port}"
    http = post(f"{base}/v1/delete", json={"metadata_filter": {"tenant": {"$in": ["c"]}}})
    assert http.status_code == 200, http.text
    c = {item for item, tenant in tenants.items() if tenant == "c"}
    assert http.json()["deleted"] == len(c)
    left = set(ids) - gone - b_low - c
    assert stored_ids(stub, ids) == left
    # A filter that matches nothing deletes nothing.
    assert stub.Delete(pb.DeleteRequest(metadata_filter=grpc_filter({"tenant": "z"}))).deleted == 0
    assert stored_ids(stub, ids) == left


@pytest.mark.slow
def test_a_delete_that_cannot_be_read_deletes_nothing(writable) -> None:
    running, tenants = writable
    stub = running.stub()
    ids = list(tenants)
    base = f"http://127.0.0.1:{running.running.http_port}"
    for request in (
        pb.DeleteRequest(ids=ids[:2], metadata_filter=grpc_filter({"tenant": {"$like": "a"}})),
        pb.DeleteRequest(),  # an empty filter is none: neither ids nor a filter
        pb.DeleteRequest(metadata_filter={}),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Delete(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "unknown operator '$like'"
        in post(f"{base}/v1/delete", json={"metadata_filter": {"tenant": {"$like": "a"}}}).text
    )
    assert post(f"{base}/v1/delete", json={"metadata_filter": {}}).status_code == 400
    assert stored_ids(stub, ids) == set(ids)
