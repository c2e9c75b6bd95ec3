"""The engine behind every transport, and the defects a review found, through a real channel.

Each test names the defect it guards: unsupervised background tasks, index settings that did
not stick, two writers on one folder, unverified artifacts, empty input, a metadata filter
that lost recall, deleted vectors never reclaimed, and RESOURCE_EXHAUSTED that could not be
told apart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import ServerProcess, ServerThread, document, model_args, settings_for, upsert

from tandem import cli
from tandem.server.api.status import retry_delay
from tandem.server.app import Unverified, create_server
from tandem.server.engine.collection import Collection, CollectionError
from tandem.server.engine.supervisor import RestartPolicy, Supervisor
from tandem.v1 import tandem_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CORPUS = 120
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def failure(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def details_bin(error: grpc.RpcError) -> bytes | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return bytes(value)
    return None


def health_of(running: ServerThread) -> int:
    checker = health_pb2_grpc.HealthStub(running.channel())
    return checker.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Retrieval")).status


def wait_for(predicate, *, timeout: float = 30.0) -> None:
    """Polls ``predicate`` until it holds (a restart has its own backoff to wait out)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def filled(tmp_path_factory, bi_int8, ce_int8, data) -> Path:
    """A collection of CORPUS RAG24 segments; tests copy it before they change it."""
    folder = tmp_path_factory.mktemp("filled") / "c"
    running = ServerThread(settings_for(folder, bi_int8[0], ce_int8[0]))
    try:
        reply = upsert(running.stub(), [document(s.id, s.text) for s in data.segments[:CORPUS]])
        assert reply.inserted == CORPUS
    finally:
        running.stop()
    return folder


@pytest.fixture
def served(tmp_path, filled, bi_int8, ce_int8):
    def start(**overrides) -> ServerThread:
        folder = tmp_path / "c"
        if not folder.exists():
            shutil.copytree(filled, folder)
        return ServerThread(settings_for(folder, bi_int8[0], ce_int8[0], **overrides))

    started: list[ServerThread] = []

    def tracked(**overrides) -> ServerThread:
        started.append(start(**overrides))
        return started[-1]

    yield tracked
    for running in started:
        running.stop()


# Unsupervised background tasks


def test_a_crashed_batch_mover_fails_waiting_calls_turns_health_and_restarts(served, data, caplog):
    running = served()
    stub = running.stub()
    batcher = running.running.searcher.batcher
    assert batcher is not None
    original = batcher.on_batch

    def explode(pairs: int, tokens: int, seconds: float) -> None:
        batcher.on_batch = original
        raise RuntimeError("injected fault in the batch mover")

    batcher.on_batch = explode
    # Long enough to see health down before the restart, however slow this machine is.
    running.running.engine.supervisor.policy = RestartPolicy(backoff_s=3.0)
    # No budget: before supervision, this call waited forever for scores nobody would make.
    request = pb.SearchRequest(query=data.topics[0].query, rerank_budget_ms=0, recall_k=10)
    with caplog.at_level(logging.ERROR):
        error = failure(stub.Search, request, timeout=30)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "batch scheduler failed" in error.details()
    assert "injected fault in the batch mover" in caplog.text  # the traceback is logged
    assert any(record.exc_info for record in caplog.records if "crashed" in record.getMessage())
    # Health turns NOT_SERVING while it is down, then SERVING once it has restarted.
    assert health_of(running) == health_pb2.HealthCheckResponse.NOT_SERVING
    wait_for(lambda: health_of(running) == health_pb2.HealthCheckResponse.SERVING)
    reply = stub.Search(request, timeout=30)
    assert reply.reranked_count == 10


def test_supervisor_restarts_with_backoff_and_gives_up_on_a_crash_loop():
    changes: list[bool] = []
    runs = 0

    async def crashing() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError(f"crash {runs}")

    async def scenario() -> dict[str, str]:
        async def on_change(healthy: bool) -> None:
            changes.append(healthy)

        supervisor = Supervisor(
            on_change=on_change, policy=RestartPolicy(backoff_s=0.001, max_crashes=2)
        )
        crashed: list[str] = []
        supervisor.spawn("job", crashing, on_crash=lambda error: crashed.append(str(error)))
        await asyncio.wait_for(asyncio.shield(supervisor.tasks["job"]), timeout=10)
        assert crashed == ["crash 1", "crash 2", "crash 3"]
        return supervisor.down

    down = asyncio.run(scenario())
    assert runs == 3  # two restarts, then it stays down
    assert down == {"job": "RuntimeError: crash 3"}
    assert changes == [False, True, False, True, False]


# Index settings belong to the collection


def test_index_settings_chosen_at_build_time_stick(tmp_path, bi_int8, ce_int8, data):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": s.id, "text": s.text}) + "\n" for s in data.segments[:30])
    )
    folder = tmp_path / "c"
    code = cli.main([
        "index", "build", "--corpus", str(corpus), "--out", str(folder),
        "--bi-encoder", str(bi_int8[0]), "--reranker", str(ce_int8[0]),
        "--dtype", "f32", "--expansion-search", "200",
    ])  # fmt: skip
    assert code == 0
    index_file = folder / "vectors.usearch"
    before = hashlib.sha256(index_file.read_bytes()).hexdigest()
    running = ServerThread(settings_for(folder, bi_int8[0], ce_int8[0]))  # default flags
    try:
        info = running.stub().Info(pb.InfoRequest())
        assert info.index_dtype == "f32"
        index = running.running.engine.collection.index
        assert index.settings.expansion_search == 200
        assert index.index.expansion_search == 200
    finally:
        running.stop()
    # Served as built: not rebuilt as i8 and saved over its file.
    assert hashlib.sha256(index_file.read_bytes()).hexdigest() == before
    # A conflicting explicit flag is a clear start-up error, and changes nothing on disk.
    server = ServerProcess(
        "--collection", str(folder), "--index-dtype", "i8", *model_args(bi_int8, ce_int8)
    )
    assert server.finish() == 1
    assert "was built with other index settings than asked for: dtype='i8'" in server.log
    assert hashlib.sha256(index_file.read_bytes()).hexdigest() == before


# Two writers on one folder


def test_a_second_writer_is_refused_and_a_busy_database_says_so(served, bi_int8, ce_int8, data):
    running = served()
    folder = running.running.settings.collection
    server = ServerProcess("--collection", str(folder), *model_args(bi_int8, ce_int8))
    assert server.finish() == 1
    assert "is open for writing by another process" in server.log
    # Another program holding SQLite's write lock (a backup tool, say) is busy, not read-only.
    holder = sqlite3.connect(folder / "documents.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        error = failure(upsert, running.stub(), [document("late", "written while locked")])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "busy" in error.details()
    assert "read-only" not in error.details()
    assert retry_delay(details_bin(error)) == pytest.approx(1.0)
    assert upsert(running.stub(), [document("late", "written once the lock is gone")]).inserted


def test_a_folder_a_process_writes_cannot_be_opened_for_writing_twice(filled, tmp_path, bi_int8):
    from tandem.encoders import BiEncoder

    folder = tmp_path / "c"
    shutil.copytree(filled, folder)
    embedder = BiEncoder(bi_int8[0])
    first = Collection(folder, embedder=embedder, pairs=None)
    try:
        with pytest.raises(CollectionError, match="one writer per folder"):
            Collection(folder, embedder=embedder, pairs=None)
        reader = Collection(folder, embedder=embedder, pairs=None, read_only=True)
        assert len(reader) == CORPUS  # readers are welcome
        reader.close()
    finally:
        first.close()
    Collection(folder, embedder=embedder, pairs=None).close()  # the lock went with its holder


# Unverified artifacts


def test_an_unverified_artifact_stops_start_up_unless_allowed(tmp_path, filled, bi_int8, ce_int8):
    reranker = tmp_path / "reranker"
    shutil.copytree(ce_int8[0], reranker)
    manifest = json.loads((reranker / "manifest.json").read_text())
    manifest["parity"]["passed"] = False
    (reranker / "manifest.json").write_text(json.dumps(manifest))
    folder = tmp_path / "c"
    shutil.copytree(filled, folder)
    settings = settings_for(folder, bi_int8[0], reranker)
    with pytest.raises(Unverified, match=r"parity check failed.*--allow-unverified"):
        asyncio.run(create_server(settings))
    running = ServerThread(settings_for(folder, bi_int8[0], reranker, allow_unverified=True))
    try:
        info = running.stub().Info(pb.InfoRequest())
    finally:
        running.stop()
    assert not info.reranker.verified
    assert info.bi_encoder.verified
    assert info.reranker.parity["mean_spearman"] == manifest["parity"]["metrics"]["mean_spearman"]
    assert "min_mean_spearman" in info.reranker.parity_thresholds


# Empty input


def test_empty_input_is_invalid_argument_and_stores_nothing(served, data):
    running = served()
    stub = running.stub()
    generation = stub.Info(pb.InfoRequest()).store_generation
    for query in ("", "   ", "\n\t"):
        assert "query is empty" in failure(stub.Search, pb.SearchRequest(query=query)).details()
        rerank = pb.RerankRequest(query=query, documents=[pb.RerankDocument(text="a document")])
        assert failure(stub.Rerank, rerank).code() == INVALID
    rerank = pb.RerankRequest(query="q", documents=[pb.RerankDocument(text=" ")])
    assert "documents[0].text is empty" in failure(stub.Rerank, rerank).details()
    assert "texts[1] is empty" in failure(stub.Embed, pb.EmbedRequest(texts=["fine", ""])).details()
    # A message with no documents: what a client that put id and text at the wrong level of
    # the message sends, since its library drops the fields the message does not have.
    error = failure(stub.Upsert, iter([pb.UpsertRequest(truncate=True)]))
    assert error.code() == INVALID
    assert "holds no documents" in error.details()
    assert failure(stub.Upsert, iter([])).code() == INVALID
    empty_text = failure(upsert, stub, [document("blank", "   ")])
    assert "has no text" in empty_text.details()
    # (An empty Get lists the first page: test_listing.) An empty Delete deletes nothing.
    assert failure(stub.Delete, pb.DeleteRequest(ids=[])).code() == INVALID
    assert stub.Info(pb.InfoRequest()).store_generation == generation  # nothing bumped
    assert not stub.Get(pb.GetRequest(ids=["blank", "x"])).documents


# The metadata filter is exact


def test_a_selective_filter_finds_every_match(served, data):
    running = served()
    stub = running.stub()
    query = data.topics[3].query
    everything = stub.Search(
        pb.SearchRequest(
            query=query, recall_k=CORPUS, top_n=CORPUS, mode=pb.SEARCH_MODE_RETRIEVE_ONLY
        )
    )
    farthest = [hit.id for hit in everything.hits[-3:]]
    by_id = {segment.id: segment for segment in data.segments[:CORPUS]}
    upsert(stub, [document(item, by_id[item].text, tag="rare") for item in farthest])
    request = pb.SearchRequest(query=query, recall_k=10, top_n=10, rerank_budget_ms=0)
    request.metadata_filter["tag"].string_value = "rare"
    reply = stub.Search(request)
    # The three matches are the farthest of 120; the nearest 40 hold none of them.
    assert sorted(hit.id for hit in reply.hits) == sorted(farthest)
    assert reply.candidates == 3
    assert reply.filter_matched == 3
    assert reply.reranked_count == 3
    unfiltered = stub.Search(pb.SearchRequest(query=query, recall_k=10))
    assert not unfiltered.HasField("filter_matched")


# Deleted vectors are reclaimed


def test_deletes_past_the_threshold_compact_the_index(served, data):
    running = served(compact_min_removed=20, compact_removed_fraction=0.25)
    stub = running.stub()
    engine = running.running.engine
    query = pb.SearchRequest(
        query=data.topics[1].query, recall_k=20, mode=pb.SEARCH_MODE_RETRIEVE_ONLY
    )
    ids = [segment.id for segment in data.segments[:CORPUS]]
    vectors = len(engine.collection.index)
    assert stub.Delete(pb.DeleteRequest(ids=ids[:10])).deleted == 10
    # Every passage of each: 11 vectors here, below both bars, so no compaction yet.
    assert engine.collection.index.removed == vectors - len(engine.collection.index) >= 10
    assert stub.Delete(pb.DeleteRequest(ids=ids[10:40])).deleted == 30
    running.call(engine.compaction_done())
    index = engine.collection.index
    assert index.removed == 0
    assert index.documents == CORPUS - 40
    assert len(index) == engine.collection.store.vector_count(index.ndim)
    sidecar = json.loads((running.running.settings.collection / "vectors.usearch.json").read_text())
    assert sidecar["removed"] == 0
    assert sidecar["count"] == len(index)
    hits = [hit.id for hit in stub.Search(query).hits]
    assert not set(hits) & set(ids[:40])


def test_compaction_builds_on_another_thread_and_catches_up(filled, tmp_path, bi_int8, data):
    """The rebuild reads a snapshot through its own connection, on another thread, while the
    store's owner goes on writing; the swap then catches the new graph up."""
    from tandem.encoders import BiEncoder
    from tandem.server.engine.store import NewDocument

    folder = tmp_path / "c"
    shutil.copytree(filled, folder)
    collection = Collection(folder, embedder=BiEncoder(bi_int8[0]), pairs=None)
    try:
        vectors = len(collection.index)
        collection.delete([segment.id for segment in data.segments[:50]])
        assert collection.index.removed == vectors - len(collection.index) >= 50
        fresh = []
        worker = threading.Thread(target=lambda: fresh.append(collection.build_compact_index()))
        worker.start()
        worker.join(timeout=120)
        collection.upsert([NewDocument(id="late", text="written while the graph was rebuilt")])
        assert collection.swap_index(fresh[0]) == 1  # the late document, added in catch-up
        assert collection.index.removed == 0
        assert collection.index.documents == CORPUS - 50 + 1
        assert len(collection.index) == collection.store.vector_count(collection.index.ndim)
    finally:
        collection.close()


# RESOURCE_EXHAUSTED: retryable or not


def test_only_retryable_refusals_carry_retry_info(served, data):
    running = served(max_queued_pairs=4)
    stub = running.stub()
    rerank = pb.RerankRequest(
        query=data.topics[0].query,
        documents=[pb.RerankDocument(text=s.text) for s in data.segments[:8]],
    )
    error = failure(stub.Rerank, rerank)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry with backoff" in error.details()
    assert retry_delay(details_bin(error)) is not None
    too_big = failure(stub.Embed, pb.EmbedRequest(texts=["x" * (17 * 1024 * 1024)]))
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # over max_message_bytes
    assert retry_delay(details_bin(too_big)) is None


# The event loop only moves messages


def test_client_texts_are_tokenized_on_the_pairs_lane(served, data):
    running = served()
    pairs = running.running.searcher.pairs
    assert pairs is not None
    threads: set[str] = set()
    original = pairs.tokenize

    def recording(texts):
        threads.add(threading.current_thread().name)
        return original(texts)

    pairs.tokenize = recording
    try:
        rerank = pb.RerankRequest(
            query="q", documents=[pb.RerankDocument(text=s.text) for s in data.segments[:5]]
        )
        assert len(running.stub().Rerank(rerank).results) == 5
    finally:
        pairs.tokenize = original
    assert threads
    assert all(name.startswith("pairs") for name in threads)


# tandem search sends only what the user set


def test_tandem_search_sends_only_what_was_set_and_reads_the_token_env(
    served, data, monkeypatch, capsys
):
    running = served(token="s3cret", default_top_n=2)
    monkeypatch.setenv("TANDEM_TOKEN", "s3cret")
    code = cli.main(["search", data.topics[0].query, "--address", running.address])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("2 hits")  # the server's default top_n, not the client's 5
    args = cli.build_parser().parse_args(["search", "q", "--top-n", "3"])
    from tandem.client import search_request

    request = search_request(args)
    assert request.top_n == 3
    assert not request.HasField("recall_k")
    assert not request.HasField("rerank_budget_ms")
