"""Server behaviour around the RPCs: warm-up health, admission, errors, auth, TLS, drain."""

from __future__ import annotations

import datetime
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import ServerThread, document, settings_for, upsert

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def collection(tmp_path_factory, bi_int8, ce_int8, data) -> Path:
    """A collection with 60 RAG24 segments, shared read-mostly by this module's servers."""
    folder = tmp_path_factory.mktemp("shared-collection")
    running = ServerThread(settings_for(folder, bi_int8[0], ce_int8[0]))
    try:
        documents = [document(s.id, s.text) for s in data.segments[:60]]
        assert upsert(running.stub(), documents).inserted == 60
    finally:
        running.stop()
    return folder


def check(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Retrieval")).status


def test_health_is_not_serving_until_warm_up_ends(collection, bi_int8, ce_int8):
    running = ServerThread(settings_for(collection, bi_int8[0], ce_int8[0]), warm=False)
    try:
        channel = running.channel()
        assert check(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        running.call(running.running.warm_up())
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop()


def test_a_stopped_server_releases_its_models(collection, bi_int8, ce_int8):
    """A process that starts servers one after another (this suite does) frees each stopped
    one: FastAPI's endpoint caches kept every engine, 400 MiB apiece, until CI ran out of
    memory."""
    running = ServerThread(settings_for(collection, bi_int8[0], ce_int8[0]))
    engine = weakref.ref(running.running.engine)
    reranker = weakref.ref(running.running.engine.searcher.reranker)
    running.stop()
    del running
    gc.collect()
    assert engine() is None
    assert reranker() is None


def test_in_flight_cap_answers_resource_exhausted(collection, bi_int8, ce_int8, data):
    running = ServerThread(settings_for(collection, bi_int8[0], ce_int8[0], max_in_flight=1))
    try:
        stub = running.stub()
        slow = [pb.RerankDocument(text=s.text) for s in data.segments[:60]]
        first = stub.Rerank.future(pb.RerankRequest(query="q", documents=slow, rerank_budget_ms=0))
        service_busy = time.monotonic() + 10
        while running.running.searcher.batcher.queued == 0 and time.monotonic() < service_busy:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Search(pb.SearchRequest(query="second caller"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit is 1" in caught.value.details()
        assert len(first.result(timeout=60).results) == 60
        assert stub.Search(pb.SearchRequest(query="later caller")).hits  # recovered
        text = running.running.metrics.exposition().decode()
        assert 'tandem_rejections_total{reason="in_flight"} 1.0' in text
    finally:
        running.stop()


def test_an_indexing_jobs_embeds_wait_their_turn_where_a_querys_are_refused(
    collection, bi_int8, ce_int8, data
):
    # A server as busy as its adaptive limit allows refuses a query's Embed at once (its
    # caller waits on it), but an Embed of bulk_embed_texts or more is index-time work: it
    # is let in, runs on the ingest lane beside upserts, and is answered, on every door.
    from serving import post

    from tandem.server.admission import AdaptiveLimit

    running = ServerThread(settings_for(collection, bi_int8[0], ce_int8[0], bulk_embed_texts=4))
    try:
        gate = running.running.gate
        gate.limit = AdaptiveLimit(limit=1, minimum=1, maximum=1)

        async def occupy():  # one call in flight, taken on the loop that owns the gate
            return gate.admit(queued=True, expected_wait_s=0.0, now=time.perf_counter())

        held = running.call(occupy())
        few = [s.text for s in data.segments[:3]]
        many = [s.text for s in data.segments[:4]]
        http = f"http://127.0.0.1:{running.running.http_port}"
        stub = running.stub()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(pb.EmbedRequest(texts=few))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "as many as it now admits" in caught.value.details()
        assert post(f"{http}/v1/embeddings", json={"model": "m", "input": few}).status_code == 429
        assert post(f"{http}/embed", json={"inputs": few}).status_code == 429
        assert post(f"{http}/v2/embed", json={"texts": few}).status_code == 429

        ingest_before = running.running.engine.lanes.service_seconds["ingest"]
        assert len(stub.Embed(pb.EmbedRequest(texts=many)).embeddings) == 4
        openai_reply = post(f"{http}/v1/embeddings", json={"model": "m", "input": many})
        assert openai_reply.status_code == 200, openai_reply.text
        assert len(openai_reply.json()["data"]) == 4
        tei_reply = post(f"{http}/embed", json={"inputs": many, "truncate": True})
        assert tei_reply.status_code == 200, tei_reply.text
        assert len(tei_reply.json()) == 4
        cohere_reply = post(f"{http}/v2/embed", json={"texts": many})
        assert cohere_reply.status_code == 200, cohere_reply.text
        assert len(cohere_reply.json()["embeddings"]["float"]) == 4
        assert running.running.engine.lanes.service_seconds["ingest"] != ingest_before

        async def free():
            now = time.perf_counter()
            gate.release(held, arrived=now, now=now, target_s=None, outcome="ok")

        running.call(free())
        assert len(stub.Embed(pb.EmbedRequest(texts=few)).embeddings) == 3  # room again
        text = running.running.metrics.exposition().decode()
        assert 'tandem_rejections_total{reason="concurrency_limit"} 4.0' in text
    finally:
        running.stop()


def test_full_rerank_queue_answers_resource_exhausted(collection, bi_int8, ce_int8, data):
    running = ServerThread(settings_for(collection, bi_int8[0], ce_int8[0], max_queued_pairs=10))
    try:
        stub = running.stub()
        documents = [pb.RerankDocument(text=s.text) for s in data.segments[:11]]
        with pytest.raises(grpc.RpcError) as caught:
            stub.Rerank(pb.RerankRequest(query="q", documents=documents))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 10" in caught.value.details()
        text = running.running.metrics.exposition().decode()
        assert 'tandem_rejections_total{reason="queue_full"} 1.0' in text
    finally:
        running.stop()


def test_unexpected_errors_are_internal_with_a_generic_message(
    collection, bi_int8, ce_int8, caplog
):
    running = ServerThread(settings_for(collection, bi_int8[0], ce_int8[0]))
    try:
        stub = running.stub()

        def broken(pairs):
            raise RuntimeError("onnxruntime exploded: secret internals")

        running.running.searcher.batcher.runner = broken
        with pytest.raises(grpc.RpcError) as caught:
            stub.Search(pb.SearchRequest(query="anything", rerank_budget_ms=0))
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in caught.value.details()
        assert "server log" in caught.value.details()
        assert "onnxruntime exploded" in caplog.text  # the traceback went to the log
        caplog.clear()

        async def crash(*args, **kwargs):
            raise KeyError("a bug")

        running.running.searcher.search = crash
        with pytest.raises(grpc.RpcError) as caught:
            stub.Search(pb.SearchRequest(query="anything"))
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "a bug" not in caught.value.details()
        assert "Traceback" in caplog.text or "KeyError" in caplog.text
    finally:
        running.stop()


def test_retrieve_only_server(tmp_path, bi_int8, data):
    running = ServerThread(settings_for(tmp_path / "c", bi_int8[0], None))
    try:
        stub = running.stub()
        upsert(stub, [document(s.id, s.text) for s in data.segments[:20]])
        reply = stub.Search(pb.SearchRequest(query=data.topics[0].query, top_n=3))
        assert len(reply.hits) == 3
        assert reply.reranked_count == 0
        for call, request in (
            (stub.Search, pb.SearchRequest(query="q", mode=pb.SEARCH_MODE_TWO_STAGE)),
            (stub.Rerank, pb.RerankRequest(query="q", documents=[pb.RerankDocument(text="d")])),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(request)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "retrieve-only" in caught.value.details()
        info = stub.Info(pb.InfoRequest())
        assert not info.HasField("reranker")
        assert not info.reranker_is_stand_in
    finally:
        running.stop()


def make_certificate(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_and_token_are_enforced(tmp_path, collection, bi_int8, ce_int8, caplog):
    cert, key = make_certificate(tmp_path)
    settings = settings_for(
        collection, bi_int8[0], ce_int8[0], tls_cert=cert, tls_key=key, token=TOKEN
    )
    running = ServerThread(settings)
    try:
        target = f"localhost:{running.running.port}"
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        secure = grpc.secure_channel(target, credentials)
        stub = tandem_pb2_grpc.RetrievalStub(secure)
        # Health needs no token, so orchestrators can probe it.
        assert check(secure) == health_pb2.HealthCheckResponse.SERVING
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Info(pb.InfoRequest(), metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:  # a streaming RPC is guarded too
            stub.Upsert(iter([pb.UpsertRequest(documents=[document("x", "y")])]), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", f"Bearer {TOKEN}"),)
        assert stub.Info(pb.InfoRequest(), metadata=good, timeout=10).version
        # A plaintext client gets no answer from the TLS port.
        plain = tandem_pb2_grpc.RetrievalStub(grpc.insecure_channel(target))
        with pytest.raises(grpc.RpcError) as caught:
            plain.Info(pb.InfoRequest(), metadata=good, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert TOKEN not in caplog.text
        text = running.running.metrics.exposition().decode()
        assert 'tandem_rejections_total{reason="unauthenticated"} 4.0' in text
    finally:
        running.stop()


def test_sigterm_drains_in_flight_calls(tmp_path, collection, bi_int8, ce_int8, data):
    command = [
        sys.executable, "-m", "tandem.cli", "serve", "--port", "0", "--metrics-port", "-1",
        "--http-port", "-1",
        "--collection", str(collection), "--bi-encoder", str(bi_int8[0]),
        "--reranker", str(ce_int8[0]), "--drain-seconds", "30",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "TANDEM_LOG_LEVEL": "debug"}
    )
    try:
        port = None
        lines = []
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            record = json.loads(line)
            assert "level" in record
            assert "msg" in record
            if record["msg"] == "serving":
                port = int(record["address"].rsplit(":", 1)[1])
                break
        assert port, "".join(lines)
        stub = tandem_pb2_grpc.RetrievalStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        slow = [pb.RerankDocument(text=s.text) for s in data.segments[:40]]
        call = stub.Rerank.future(pb.RerankRequest(query="q", documents=slow, rerank_budget_ms=0))
        time.sleep(0.3)  # let the call reach the server; the drain must then wait for it
        process.send_signal(signal.SIGTERM)
        reply = call.result(timeout=60)
        assert reply.reranked_count == 40
        assert process.wait(timeout=60) == 0
        rest = process.stderr.read()
        assert '"msg": "draining"' in rest
        assert '"msg": "stopped"' in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


NODE_CLIENT = Path(__file__).parent / "node"


def test_node_client_upserts_searches_reranks_and_checks_health(tmp_path, bi_int8, ce_int8):
    """A Node.js client (@grpc/grpc-js + @grpc/proto-loader) that loads the .proto file."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the CI machine has it)")
    assert (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "run `make test` (it runs `npm ci --prefix tests/node`) to install the Node client"
    )
    running = ServerThread(settings_for(tmp_path / "c", bi_int8[0], ce_int8[0]))
    try:
        finished = subprocess.run(
            [node, str(NODE_CLIENT / "client.mjs"), running.address],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert finished.returncode == 0, finished.stderr
        seen = json.loads(finished.stdout)
    finally:
        running.stop()
    assert seen["health"] == "SERVING"
    assert seen["upsert"]["received"] == 3
    assert seen["upsert"]["inserted"] == 3
    assert seen["search"][0]["id"] == "node-1"  # the Eiffel Tower answers "tower in Paris"
    assert seen["search"][0]["reranked"] is True
    assert "Eiffel" in seen["search"][0]["text"]
    assert seen["search_reranked"] == 3
    assert sorted(item["index"] for item in seen["rerank"]) == [0, 1]
    assert {item["id"] for item in seen["rerank"]} == {None, "node-2"}
    assert seen["bad_request"] == "INVALID_ARGUMENT"
