"""Feedback through both doors, and a reranker published to a running server: swapped in under
load with no failed call, one model per reply, and a bad artifact refused while the old one
keeps serving."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time

import grpc
import pytest
from serving import ServerThread, document, get, post, settings_for, upsert

from tandem.artifact import read_manifest, write_manifest
from tandem.cli import main
from tandem.server.engine.store import DocumentStore
from tandem.server.replication.models import POINTER, publish_reranker, version_folder
from tandem.training.labels import from_feedback
from tandem.v1 import tandem_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.reranker, pytest.mark.timeout(900)]
CORPUS = 60
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(tmp_path_factory, bi_int8, ce_int8, data):
    root = tmp_path_factory.mktemp("models")
    assert publish_reranker(ce_int8[0], root) == "000001"
    folder = tmp_path_factory.mktemp("collection")
    running = ServerThread(settings_for(folder, bi_int8[0], root, follow_seconds=0.2))
    upsert(running.stub(), [document(s.id, s.text) for s in data.segments[:CORPUS]])
    yield running, root, folder
    running.stop()


def test_feedback_through_grpc_and_http_is_stored_all_or_none(server, data):
    running, _, folder = server
    stub = running.stub()
    first, second = data.segments[0].id, data.segments[1].id
    reply = stub.Feedback(
        pb.FeedbackRequest(
            items=[
                pb.FeedbackItem(query="vicarious trauma", document_id=first, label=3),
                pb.FeedbackItem(query="vicarious trauma", document_id=second, click=True),
            ]
        )
    )
    assert (reply.recorded, reply.total) == (2, 2)
    base = f"http://127.0.0.1:{running.running.http_port}"
    body = {"items": [{"query": "vicarious trauma", "document_id": second, "label": 0}]}
    answer = post(f"{base}/v1/feedback", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"recorded": 1, "total": 3}

    bad_items = [
        ({"query": "q", "document_id": "no-such-id", "label": 1}, "not stored"),
        ({"query": "  ", "document_id": first, "label": 1}, "query is empty"),
        ({"query": "q", "document_id": first, "label": 4}, "a label is a grade from 0"),
        ({"query": "q", "document_id": first, "label": 1, "click": True}, "sets both"),
        ({"query": "q", "document_id": first}, "neither a label nor a click"),
    ]
    for item, message in bad_items:
        # The good item first: a bad one anywhere in the call stores none of it.
        good = pb.FeedbackItem(query="kept?", document_id=first, label=1)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Feedback(pb.FeedbackRequest(items=[good, pb.FeedbackItem(**item)]))
        assert caught.value.code() == INVALID, item
        assert message in caught.value.details()
        refused = post(
            f"{base}/v1/feedback",
            json={"items": [{"query": "kept?", "document_id": first, "label": 1}, item]},
            timeout=30,
        )
        assert refused.status_code == 400, item
        assert message in refused.text
    assert stub.Info(pb.InfoRequest()).feedback_count == 3
    store = DocumentStore(folder / "documents.sqlite", read_only=True)
    try:
        (judged,) = from_feedback(store.feedback_labels())
    finally:
        store.close()
    assert judged.query == "vicarious trauma"
    assert judged.grades == {first: 3.0, second: 0.0}  # the later label replaced the click


def test_info_names_the_serving_reranker(server):
    running, _, _ = server
    info = running.stub().Info(pb.InfoRequest())
    assert info.reranker_version == "000001"
    assert info.reranker_id.startswith("000001@")
    assert info.reranker_since.endswith("+00:00")
    page = get(f"http://127.0.0.1:{running.running.http_port}/info", timeout=30).json()
    assert page["reranker_id"] == info.reranker_id


def test_publish_under_load_switches_once_with_no_failed_call(server, ce_other, data):
    running, root, _ = server
    stub = running.stub()
    before = stub.Info(pb.InfoRequest()).reranker_id
    seen: list[tuple[float, float, str]] = []  # (started, ended, reranker_id)
    failures: list[str] = []
    refused = 0
    stop = threading.Event()
    queries = [topic.query for topic in data.topics[:10]]

    def load() -> None:
        nonlocal refused
        client = running.stub()
        number = 0
        while not stop.is_set():
            started = time.monotonic()
            request = pb.SearchRequest(query=queries[number % len(queries)], recall_k=8,
                                       top_n=3, rerank_budget_ms=0)  # fmt: skip
            try:
                reply = client.Search(request, timeout=60)
                seen.append((started, time.monotonic(), reply.reranker_id))
            except grpc.RpcError as error:
                if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused += 1  # shed under load, as a client retries: not a failure
                    time.sleep(0.05)
                else:
                    failures.append(f"{error.code()}: {error.details()}")
            number += 1

    callers = [threading.Thread(target=load) for _ in range(3)]
    for caller in callers:
        caller.start()
    try:
        time.sleep(2)
        assert publish_reranker(ce_other[0], root) == "000002"
        deadline = time.monotonic() + 120
        while stub.Info(pb.InfoRequest()).reranker_version != "000002":
            assert time.monotonic() < deadline, "the new reranker never served"
            time.sleep(0.1)
        time.sleep(2)
    finally:
        stop.set()
        for caller in callers:
            caller.join(timeout=120)
    assert not failures
    after = stub.Info(pb.InfoRequest()).reranker_id
    assert after != before
    assert after.startswith("000002@")
    assert {reranker for _, _, reranker in seen} == {before, after}
    # One switch: a call takes the reranker once, somewhere between its start and its end,
    # so once a reply of the new reranker has come back, no call started later gets the
    # old one (and no reply mixes the two: each carries one id).
    first_new_end = min(ended for _, ended, reranker in seen if reranker == after)
    assert all(started < first_new_end for started, _, reranker in seen if reranker == before)
    assert refused < len(seen)


def test_a_bad_artifact_is_refused_and_the_old_reranker_keeps_serving(
    server, ce_int8, caplog, tmp_path
):
    running, root, _ = server
    stub = running.stub()
    serving = stub.Info(pb.InfoRequest()).reranker_id

    # Publishing refuses an unverified artifact outright.
    unverified = tmp_path / "unverified"
    shutil.copytree(ce_int8[0], unverified)
    manifest = read_manifest(unverified)
    assert manifest.parity is not None
    write_manifest(unverified, manifest.with_parity(
        type(manifest.parity)(**{**manifest.parity.__dict__, "passed": False})
    ))  # fmt: skip
    assert main(["models", "publish", str(unverified), "--root", str(root)]) == 2

    # One slipped in by hand, altered after export: the server refuses it.
    altered = version_folder(root, "000009")
    shutil.copytree(ce_int8[0], altered)
    weights = altered / ce_int8[1].graph_files[-1]
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    with caplog.at_level(logging.ERROR, logger="tandem.server.replication.models"):
        (root / POINTER).write_text("000009\n", encoding="utf-8")
        deadline = time.monotonic() + 60
        while "new reranker refused" not in caplog.text:
            assert time.monotonic() < deadline, "the altered reranker was never looked at"
            time.sleep(0.1)
    assert "does not match its manifest hash" in caplog.text
    info = stub.Info(pb.InfoRequest())
    assert info.reranker_id == serving
    reply = stub.Search(pb.SearchRequest(query="what is vicarious trauma", top_n=2), timeout=60)
    assert reply.reranker_id == serving
    assert reply.hits
    assert json.loads(info.reranker.manifest_json)["kind"] == "cross-encoder"


def test_a_reranker_of_another_length_swaps_in_and_reads_its_own_windows(server, ce_short, data):
    # The collection was built with the 512-token reranker and stores whole ids: one
    # exported at 128 (what `tandem train --max-length 128` exports) serves it, reading each
    # segment in windows of 128 tokens.
    running, root, _ = server
    stub = running.stub()
    version = publish_reranker(ce_short[0], root)
    deadline = time.monotonic() + 120
    while stub.Info(pb.InfoRequest()).reranker_version != version:
        assert time.monotonic() < deadline, "the 128-token reranker never served"
        time.sleep(0.1)
    info = stub.Info(pb.InfoRequest())
    assert json.loads(info.reranker.manifest_json)["max_length"] == 128
    query = data.topics[0].query
    reply = stub.Search(
        pb.SearchRequest(query=query, recall_k=20, top_n=20, rerank_budget_ms=0), timeout=60
    )
    assert reply.reranker_id.startswith(f"{version}@")
    assert reply.reranked_count == len(reply.hits) == 20
    # RAG24 segments run to ~250 tokens: most take more than one window of 128.
    assert sum(hit.passage.windows > 1 for hit in reply.hits) >= 10
    assert all(hit.passage.windows_scored == hit.passage.windows for hit in reply.hits)
