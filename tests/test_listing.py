"""Listing documents a page at a time: every page walk lists each kept document once, in id
order, under writes between pages; the page token's checks; and the listing served through
gRPC, HTTP and `tandem documents` over real RAG24 segments."""

from __future__ import annotations

import json
import math
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import ServerThread, document, grpc_filter, post, settings_for, upsert

from tandem import cli
from tandem.server.engine import store as store_module
from tandem.server.engine.errors import InvalidArgument
from tandem.server.engine.filters import parse_filter
from tandem.server.engine.listing import MAX_LIMIT, ListRequest, check_listing
from tandem.server.engine.store import DocumentStore, NewDocument
from tandem.server.settings import Settings
from tandem.v1 import tandem_pb2 as pb


def fill(store: DocumentStore, documents: dict[str, dict[str, Any]]) -> None:
    store.upsert(
        [NewDocument(id=item, text=f"text of {item}", metadata=m) for item, m in documents.items()],
        np.ones((len(documents), 4), dtype=np.float32),
        [np.zeros(1, dtype=np.int32)] * len(documents),
    )


def walk(
    store: DocumentStore, *, prefix: str = "", raw: dict[str, Any] | None = None, **kwargs: Any
) -> list[list[str]]:
    """Every page's ids, from the first page until nothing is left."""
    pages: list[list[str]] = []
    after: str | None = None
    while True:
        documents, after = store.listed(
            after=after, prefix=prefix, matching=parse_filter(raw), **kwargs
        )
        pages.append([d.id for d in documents])
        if after is None:
            return pages
        assert len(pages) < 10_000, "the walk never ends"


def in_store_order(ids: list[str]) -> list[str]:
    # SQLite compares TEXT as UTF-8 bytes; Python's str order is the same for valid text.
    return sorted(ids, key=lambda item: item.encode("utf-8"))


IDS = st.text(alphabet="ab/é🙂", min_size=1, max_size=4)
FILTERS = [None, {"n": {"$gte": 3}}, {"tag": "x"}, {"n": {"$lt": 0}}]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.lists(IDS, min_size=0, max_size=30, unique=True),
    prefix=st.sampled_from(["", "a", "ab", "é", "🙂", "b/"]),
    raw=st.sampled_from(FILTERS),
    limit=st.integers(1, 6),
    scan=st.integers(1, 9),
    window=st.integers(1, 5),
)
def test_a_walk_lists_each_kept_document_once_in_id_order(
    ids, prefix, raw, limit, scan, window
) -> None:
    documents = {item: {"n": i % 7, "tag": ["x", "y"][i % 2]} for i, item in enumerate(ids)}
    wanted = parse_filter(raw)
    expected = in_store_order(
        [
            item
            for item, m in documents.items()
            if item.startswith(prefix) and (wanted is None or wanted.matches(m))
        ]
    )
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        # Small windows, so that one page spans several and a scan ends inside one.
        patch.setattr(store_module, "LIST_WINDOW", window)
        store = DocumentStore(Path(folder) / "docs.sqlite")
        try:
            if documents:
                fill(store, documents)
            pages = walk(store, prefix=prefix, raw=raw, limit=limit, scan=scan)
        finally:
            store.close()
    assert [item for page in pages for item in page] == expected
    assert all(len(page) <= limit for page in pages)
    # A page stops short only where its share of ids ran out or nothing is left, and the
    # last page is never an empty one after a full one.
    if scan > len(ids):
        assert len(pages) == max(1, math.ceil(len(expected) / limit))


def test_a_page_holds_text_and_metadata_and_the_walk_survives_writes(tmp_path) -> None:
    store = DocumentStore(tmp_path / "docs.sqlite")
    try:
        fill(store, {f"d{i:02d}": {"n": i} for i in range(10)})
        first, after = store.listed(after=None, prefix="", matching=None, limit=4, scan=100)
        assert [d.id for d in first] == ["d00", "d01", "d02", "d03"]
        assert (first[1].text, first[1].metadata) == ("text of d01", {"n": 1})
        assert after == "d03"
        # Between pages: one written before the cursor, one past it, one deleted past it,
        # and one listed already rewritten.
        fill(store, {"c": {"n": 99}, "d05x": {"n": 98}, "d01": {"n": 97}})
        store.delete(["d06"])
        rest: list[str] = []
        while after is not None:
            page, after = store.listed(after=after, prefix="", matching=None, limit=4, scan=100)
            rest.extend(d.id for d in page)
        assert rest == ["d04", "d05", "d05x", "d07", "d08", "d09"]
    finally:
        store.close()


def test_a_page_reads_at_most_its_share_of_ids(tmp_path) -> None:
    """A filter nothing matches costs each page its scan, not the store: the walk goes on in
    empty pages, each ending past the ids it read."""
    store = DocumentStore(tmp_path / "docs.sqlite")
    try:
        fill(store, {f"d{i:03d}": {"n": i} for i in range(50)})
        none_match = parse_filter({"n": {"$lt": 0}})
        page, after = store.listed(after=None, prefix="", matching=none_match, limit=5, scan=20)
        assert (page, after) == ([], "d019")
        page, after = store.listed(after=after, prefix="", matching=none_match, limit=5, scan=20)
        assert (page, after) == ([], "d039")
        page, after = store.listed(after=after, prefix="", matching=none_match, limit=5, scan=20)
        assert (page, after) == ([], None)
        # A prefix ends the walk where its ids end, not at the store's last.
        last = parse_filter({"n": 10})
        page, after = store.listed(after=None, prefix="d01", matching=last, limit=5, scan=20)
        assert ([d.id for d in page], after) == (["d010"], None)
    finally:
        store.close()


def test_a_store_written_before_the_metadata_index_lists_by_filter(tmp_path) -> None:
    path = tmp_path / "docs.sqlite"
    store = DocumentStore(path)
    fill(store, {f"d{i}": {"n": i} for i in range(9)})
    store.close()
    old = sqlite3.connect(path)
    old.execute("DROP INDEX documents_metadata")
    old.close()
    store = DocumentStore(path, read_only=True)  # read-only: the index is not made again
    try:
        assert walk(store, raw={"n": {"$gte": 6}}, limit=2, scan=100) == [["d6", "d7"], ["d8"]]
    finally:
        store.close()


# The request's checks and its page token

SETTINGS = Settings()


def checked(**fields: Any) -> Any:
    return check_listing(ListRequest(**fields), SETTINGS)


def test_a_token_carries_on_only_the_listing_it_came_from() -> None:
    first = checked(metadata_filter={"a": 1, "b": {"$gt": 2}}, id_prefix="doc/")
    token = first.token_after("doc/17")
    assert first.after is None
    assert first.limit == 100
    assert first.token_after(None) == ""
    # Key order is not meaning, and the limit may change between pages.
    same = checked(metadata_filter={"b": {"$gt": 2}, "a": 1}, id_prefix="doc/", page_token=token)
    assert same.after == "doc/17"
    assert (
        checked(
            metadata_filter={"a": 1, "b": {"$gt": 2}}, id_prefix="doc/", limit=7, page_token=token
        ).limit
        == 7
    )
    for other in (
        {"metadata_filter": {"a": 2, "b": {"$gt": 2}}, "id_prefix": "doc/"},
        {"metadata_filter": {"a": 1, "b": {"$gt": 2}}, "id_prefix": "doc"},
        {},
    ):
        with pytest.raises(InvalidArgument, match="issued for another metadata_filter"):
            checked(page_token=token, **other)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"page_token": "not-a-token"}, "is not one this server issued"),
        ({"page_token": "eyJ2IjoyfQ"}, "is not one this server issued"),  # {"v":2}
        ({"page_token": "WzFd"}, "is not one this server issued"),  # [1]
        ({"page_token": "é"}, "is not one this server issued"),
        ({"limit": 0}, "limit must be between 1 and 1000"),
        ({"limit": MAX_LIMIT + 1}, "limit must be between 1 and 1000"),
        ({"limit": -1}, "limit must be between 1 and 1000"),
        ({"metadata_filter": {"year": {"$between": 1}}}, "unknown operator '\\$between'"),
        ({"metadata_filter": {"x": float("nan")}}, "NaN or Infinity"),
        ({"id_prefix": "x" * 600}, "longer than"),
    ],
)
def test_a_listing_that_cannot_be_read_says_what_to_fix(fields, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        checked(**fields)


# Served


@pytest.fixture(scope="module")
def server(tmp_path_factory, bi_int8, data):
    folder = tmp_path_factory.mktemp("listing") / "c"
    running = ServerThread(settings_for(folder, bi_int8[0], None))
    segments = data.segments[:60]
    documents = [
        document(f"{'ab'[i % 2]}/{s.id}", s.text, tenant="xyz"[i % 3], n=i)
        for i, s in enumerate(segments)
    ]
    assert upsert(running.stub(), documents).inserted == len(documents)
    yield running, {d.id: (d.text, json_format.MessageToDict(d.metadata)) for d in documents}
    running.stop()


def grpc_walk(stub: Any, **fields: Any) -> list[pb.GetResponse]:
    replies: list[pb.GetResponse] = []
    token = ""
    while True:
        reply = stub.Get(pb.GetRequest(page_token=token, **fields))
        replies.append(reply)
        token = reply.next_page_token
        if not token:
            return replies


@pytest.mark.slow
def test_every_door_lists_what_was_stored(server, tmp_path, capsys) -> None:
    running, stored = server
    stub = running.stub()
    replies = grpc_walk(stub, limit=7)
    listed = [d for reply in replies for d in reply.documents]
    assert [d.id for d in listed] == in_store_order(list(stored))
    assert [len(reply.documents) for reply in replies] == [7] * 8 + [4]
    for d in listed:
        assert (d.text, json_format.MessageToDict(d.metadata)) == stored[d.id]
    # No fields at all: the first page of everything.
    first = stub.Get(pb.GetRequest())
    assert [d.id for d in first.documents] == in_store_order(list(stored))[:60]
    assert first.next_page_token == ""
    # A filter and a prefix together.
    kept = in_store_order(
        [item for item, (_, m) in stored.items() if item.startswith("b/") and m["tenant"] == "y"]
    )
    replies = grpc_walk(stub, id_prefix="b/", metadata_filter=grpc_filter({"tenant": "y"}), limit=3)
    assert [d.id for reply in replies for d in reply.documents] == kept
    # HTTP, the same walk.
    base = f"http://127.0.0.1:{running.running.http_port}"
    http_ids: list[str] = []
    body: dict[str, Any] = {"id_prefix": "b/", "metadata_filter": {"tenant": "y"}, "limit": 3}
    while True:
        reply = post(f"{base}/v1/get", json=body)
        assert reply.status_code == 200, reply.text
        http_ids.extend(d["id"] for d in reply.json()["documents"])
        if not reply.json()["next_page_token"]:
            break
        body["page_token"] = reply.json()["next_page_token"]
    assert http_ids == kept
    # `tandem documents` writes the corpus format, which `tandem index build` reads back.
    capsys.readouterr()
    argv = ["documents", "--address", running.address, "--page-size", "11"]
    assert cli.main([*argv, "--filter", '{"n": {"$gte": 30}}']) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    wanted = [item for item in in_store_order(list(stored)) if stored[item][1]["n"] >= 30]
    assert [line["id"] for line in lines] == wanted
    assert all((line["text"], line["metadata"]) == stored[line["id"]] for line in lines)
    assert f"{len(wanted)} documents" in err


@pytest.mark.slow
def test_a_listing_that_cannot_be_read_is_invalid_argument_on_every_door(server, capsys) -> None:
    running, stored = server
    stub = running.stub()
    base = f"http://127.0.0.1:{running.running.http_port}"
    token = stub.Get(pb.GetRequest(limit=2)).next_page_token
    refused = [
        (pb.GetRequest(ids=["a/x"], limit=5), "not both"),
        (pb.GetRequest(ids=["a/x"], id_prefix="a/"), "not both"),
        (pb.GetRequest(page_token="garbage"), "not one this server issued"),
        (pb.GetRequest(page_token=token, id_prefix="a/"), "issued for another"),
        (pb.GetRequest(limit=MAX_LIMIT + 1), "limit must be between"),
        (pb.GetRequest(metadata_filter=grpc_filter({"n": {"$near": 1}})), "unknown operator"),
    ]
    for request, message in refused:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Get(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()
    for body, message in (
        ({"ids": ["a/x"], "metadata_filter": {"n": 1}}, "not both"),
        ({"limit": 0}, "limit must be between"),
        ({"page_token": token, "metadata_filter": {"n": 1}}, "issued for another"),
    ):
        reply = post(f"{base}/v1/get", json=body)
        assert reply.status_code == 400, reply.text
        assert message in reply.text
    capsys.readouterr()
    argv = ["documents", "--address", running.address, "--filter", '{"n": {"$near": 1}}']
    assert cli.main(argv) == 1
    assert "INVALID_ARGUMENT: metadata_filter['n']['$near']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["documents", "--address", running.address, "--page-size", "0"])
    assert "--page-size: must be between 1 and 1000" in capsys.readouterr().err
    # Nothing was lost on the way.
    assert len(stub.Get(pb.GetRequest(limit=MAX_LIMIT)).documents) == len(stored)


@pytest.mark.slow
def test_pages_never_wait_for_the_store_lane(server) -> None:
    """An export reads pages back to back; on the store lane each page would queue the
    searches' reads (RESULTS, "Listing documents"). Held shut, that lane stops no page, and
    a page sees a write committed after its connection opened."""
    running, stored = server
    stub = running.stub()
    engine = running.running.engine
    assert len(stub.Get(pb.GetRequest(limit=MAX_LIMIT)).documents) == len(stored)
    upsert(stub, [document("a/new", "a document written after the first page")])
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(60)

    running.loop.call_soon_threadsafe(
        lambda: running.loop.create_task(engine.lanes.run("store", hold))
    )
    try:
        assert held.wait(30)
        listed = stub.Get(pb.GetRequest(id_prefix="a/new"), timeout=20)
        assert [d.id for d in listed.documents] == ["a/new"]
    finally:
        release.set()
    stub.Delete(pb.DeleteRequest(ids=["a/new"]))
    assert not stub.Get(pb.GetRequest(id_prefix="a/new")).documents
