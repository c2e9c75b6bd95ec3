"""Faults: kill -9 mid-upsert, damaged index files, altered models, full and read-only disks,
garbage on the port. Nothing acknowledged is lost, and the server keeps serving."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import resource
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from serving import (
    ServerProcess,
    ServerThread,
    document,
    fill_collection,
    model_args,
    settings_for,
    upsert,
)

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
WORDS = [
    "amber",
    "basalt",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "glacier",
    "harbor",
    "indigo",
    "juniper",
    "kelp",
    "lagoon",
    "meadow",
    "nebula",
    "obsidian",
    "prairie",
    "quartz",
    "reef",
    "savanna",
    "tundra",
    "umber",
    "valley",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
    "anchor",
    "beacon",
    "canyon",
    "dune",
    "estuary",
    "forest",
    "geyser",
    "heath",
    "island",
    "jungle",
    "knoll",
    "lake",
    "mesa",
    "oasis",
]


def unique_texts(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < count:
        seen.add(" ".join(rng.sample(WORDS, 7)))
    return sorted(seen)


def test_kill_9_during_upsert_loses_nothing_acknowledged(tmp_path, bi_int8, ce_int8):
    folder = tmp_path / "collection"
    texts = unique_texts(10_000)
    sent = {f"doc-{i}": text for i, text in enumerate(texts)}
    server = ServerProcess("--collection", str(folder), *model_args(bi_int8, ce_int8))
    stub = server.stub()
    acknowledged: list[str] = []
    deleted: list[str] = []  # acknowledged deletes: every tenth document of a call
    unsure: list[str] = []  # a delete the kill interrupted: applied or not, either is right
    stop = threading.Event()

    def stream() -> None:
        items = list(sent.items())
        for start in range(0, len(items), 100):  # 100 calls of 4 messages of 25
            if stop.is_set():
                return
            call = items[start : start + 100]
            messages = [
                pb.UpsertRequest(documents=[document(i, t, n=int(i[4:])) for i, t in part])
                for part in (call[k : k + 25] for k in range(0, 100, 25))
            ]
            try:
                stub.Upsert(iter(messages), timeout=60)
            except grpc.RpcError:
                return  # the server died under this call: not acknowledged
            acknowledged.extend(i for i, _ in call)
            gone = [i for i, _ in call[::10]]
            try:
                stub.Delete(pb.DeleteRequest(ids=gone), timeout=60)
            except grpc.RpcError:
                unsure.extend(gone)
                return
            deleted.extend(gone)

    writer = threading.Thread(target=stream)
    writer.start()
    deadline = time.monotonic() + 300
    while len(acknowledged) < 3000 and time.monotonic() < deadline and writer.is_alive():
        time.sleep(0.05)
    server.process.kill()  # SIGKILL, mid-stream
    stop.set()
    writer.join(timeout=60)
    server.finish()
    assert 3000 <= len(acknowledged) < 10_000, "the kill must land mid-stream"

    restarted = ServerProcess("--collection", str(folder), *model_args(bi_int8, ce_int8))
    try:
        stub = restarted.stub()
        found: dict[str, pb.Document] = {}
        ids = list(sent)
        for start in range(0, len(ids), 1000):
            reply = stub.Get(pb.GetRequest(ids=ids[start : start + 1000]), timeout=60)
            found.update({d.id: d for d in reply.documents})
        kept = set(acknowledged) - set(deleted) - set(unsure)
        assert kept <= set(found)  # every acknowledged document survived
        assert not set(deleted) & set(found)  # and every acknowledged delete
        for identifier, stored in found.items():  # nothing half-written
            assert stored.text == sent[identifier]
            assert stored.metadata["n"] == int(identifier[4:])
        info = stub.Info(pb.InfoRequest(), timeout=30)
        # Both indexes agree with the store.
        assert info.index_size == len(found) == info.lexical_index_size
        rng = random.Random(1)
        # Texts are word orders: two holding the same words tie under BM25, so skip those.
        word_sets = Counter(frozenset(text.split()) for text in sent.values())
        distinct = sorted(i for i in kept if word_sets[frozenset(sent[i].split())] == 1)
        for identifier in rng.sample(distinct, 100):
            for stage in (pb.FIRST_STAGE_DENSE, pb.FIRST_STAGE_LEXICAL):
                reply = stub.Search(
                    pb.SearchRequest(query=sent[identifier], top_n=1, first_stage=stage,
                                     mode=pb.SEARCH_MODE_RETRIEVE_ONLY), timeout=30,
                )  # fmt: skip
                assert reply.hits[0].id == identifier
        for identifier in rng.sample(deleted, 50):  # a deleted text finds only others
            reply = stub.Search(
                pb.SearchRequest(query=sent[identifier], top_n=5, recall_k=5,
                                 first_stage=pb.FIRST_STAGE_HYBRID,
                                 mode=pb.SEARCH_MODE_RETRIEVE_ONLY), timeout=30,
            )  # fmt: skip
            assert identifier not in [hit.id for hit in reply.hits]
    finally:
        restarted.finish()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_index_is_rebuilt_from_the_store_at_start_up(
    tmp_path, bi_int8, ce_int8, data, damage, caplog
):
    folder = tmp_path / "collection"
    fill_collection(folder, bi_int8[0], ce_int8[0], data.segments[:40])  # saves the index
    index = folder / "vectors.usearch"
    if damage == "flip":
        raw = bytearray(index.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        index.write_bytes(bytes(raw))
    elif damage == "truncate":
        index.write_bytes(index.read_bytes()[:100])
    else:
        index.unlink()
    with caplog.at_level(logging.WARNING, logger="tandem.server.engine.index"):
        running = ServerThread(settings_for(folder, bi_int8[0], ce_int8[0]))
    try:
        assert "rebuilding from the store" in caplog.text
        stub = running.stub()
        assert stub.Info(pb.InfoRequest()).index_size == 40
        reply = stub.Search(pb.SearchRequest(query=data.segments[3].text, top_n=1,
                                             mode=pb.SEARCH_MODE_RETRIEVE_ONLY))  # fmt: skip
        assert reply.hits[0].id == data.segments[3].id
    finally:
        running.stop()


def test_altered_or_missing_model_refuses_to_start(tmp_path, bi_int8, ce_int8):
    altered = tmp_path / "bi-encoder"
    shutil.copytree(bi_int8[0], altered)
    weights = bi_int8[1].graph_files[-1]  # model.onnx, or OpenVINO's .bin
    model = altered / weights
    raw = bytearray(model.read_bytes())
    raw[-10] ^= 0xFF
    model.write_bytes(bytes(raw))
    for bi_encoder, reason in ((altered, weights), (tmp_path / "absent", "manifest")):
        server = ServerProcess(
            "--collection", str(tmp_path / "c"), "--bi-encoder", str(bi_encoder),
            "--reranker", str(ce_int8[0]),
        )  # fmt: skip
        code = server.finish()
        assert code == 1
        assert "refusing to start" in server.log
        assert reason in server.log
        assert server.port is None


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int):
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as handle:
        block = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):
            while True:
                handle.write(block)
                handle.flush()
    return filler


def test_full_disk_fails_writes_and_keeps_reads(tmp_path, bi_int8, ce_int8, data):
    with small_disk(tmp_path / "disk", 24) as disk:
        running = ServerThread(settings_for(disk / "c", bi_int8[0], ce_int8[0]))
        try:
            stub = running.stub()
            upsert(stub, [document(s.id, s.text) for s in data.segments[:20]])
            query = pb.SearchRequest(query=data.topics[0].query, top_n=3)
            filler = fill(disk)
            batch = [document(f"more-{i}", s.text * 20) for i, s in enumerate(data.segments[:50])]
            with pytest.raises(grpc.RpcError) as caught:
                upsert(stub, batch)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "out of disk space" in caught.value.details()
            assert len(stub.Search(query).hits) == 3  # reads keep working
            assert len(stub.Get(pb.GetRequest(ids=[data.segments[0].id])).documents) == 1
            assert stub.Info(pb.InfoRequest()).index_size == 20  # nothing half-written
            filler.unlink()
            assert upsert(stub, [document("late", "the disk has room again")]).inserted == 1
            assert stub.Info(pb.InfoRequest()).index_size == 21
        finally:
            running.stop()


@contextlib.contextmanager
def read_only_view(source: Path, path: Path):
    """``source`` bind-mounted read-only at ``path``: writes fail with EROFS, even for root."""
    path.mkdir()
    steps = (
        ["mount", "--bind", str(source), str(path)],
        ["mount", "-o", "remount,bind,ro", str(path)],
    )
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)
            pytest.skip(f"cannot bind-mount read-only here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def check_read_only_serving(stub: tandem_pb2_grpc.RetrievalStub, data, count: int) -> None:
    """Reads answer as before; every write is FAILED_PRECONDITION and says why."""
    # No deadline: whether the reranker reads is the point, not how fast this CPU is.
    request = pb.SearchRequest(query=data.topics[0].query, top_n=3, rerank_budget_ms=0)
    reply = stub.Search(request, timeout=60)
    assert len(reply.hits) == 3
    assert reply.reranked_count > 0
    assert len(stub.Get(pb.GetRequest(ids=[data.segments[0].id])).documents) == 1
    assert stub.Info(pb.InfoRequest()).index_size == count
    for write in (
        lambda: upsert(stub, [document("new", "a write to a read-only collection")]),
        lambda: stub.Delete(pb.DeleteRequest(ids=[data.segments[0].id])),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            write()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "read-only" in caught.value.details()
    assert stub.Info(pb.InfoRequest()).index_size == count  # nothing lost, nothing added
    assert len(stub.Get(pb.GetRequest(ids=[data.segments[0].id])).documents) == 1


def digests(folder: Path) -> dict[str, str]:
    """The collection's data files (SQLite may add its -shm beside them to read)."""
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in ("documents.sqlite", "vectors.usearch", "vectors.usearch.json")
    }


def test_read_only_data_directory_serves_reads_and_refuses_writes(tmp_path, bi_int8, ce_int8, data):
    fill_collection(tmp_path / "c", bi_int8[0], ce_int8[0], data.segments[:12])
    before = digests(tmp_path / "c")
    with read_only_view(tmp_path / "c", tmp_path / "ro") as folder:
        server = ServerProcess("--collection", str(folder), *model_args(bi_int8, ce_int8))
        try:
            check_read_only_serving(server.stub(), data, 12)
        finally:
            code = server.finish()
        assert code == 0, server.log
        assert "serving it read-only" in server.log
    assert digests(tmp_path / "c") == before


def test_read_only_flag_serves_reads_and_refuses_writes(tmp_path, bi_int8, ce_int8, data):
    fill_collection(tmp_path / "c", bi_int8[0], ce_int8[0], data.segments[:12])
    before = digests(tmp_path / "c")
    running = ServerThread(settings_for(tmp_path / "c", bi_int8[0], ce_int8[0], read_only=True))
    try:
        check_read_only_serving(running.stub(), data, 12)
    finally:
        running.stop()
    assert digests(tmp_path / "c") == before


def test_garbage_truncated_frames_and_idle_connections_leave_others_served(
    tmp_path, bi_int8, ce_int8, data
):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2500:
        pytest.skip(f"the file descriptor limit ({hard}) is below 2,500")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    running = ServerThread(settings_for(tmp_path / "c", bi_int8[0], ce_int8[0]))
    idle: list[socket.socket] = []
    try:
        stub = running.stub()
        upsert(stub, [document(s.id, s.text) for s in data.segments[:10]])
        address = ("127.0.0.1", running.running.port)
        rng = random.Random(3)
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        for payload in (
            bytes(rng.getrandbits(8) for _ in range(4096)),  # garbage
            preface + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03",  # truncated SETTINGS
            preface + b"\x00\x40\x00\x01\x05\x00\x00\x00\x01" + b"\x82" * 10,  # short HEADERS
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # the wrong protocol
        ):
            with socket.create_connection(address, timeout=5) as raw:
                raw.sendall(payload)
                with contextlib.suppress(OSError):
                    raw.recv(1024)
        for _ in range(1000):
            idle.append(socket.create_connection(address, timeout=5))
        reply = stub.Search(pb.SearchRequest(query=data.topics[0].query, top_n=2), timeout=30)
        assert len(reply.hits) == 2
        fresh = tandem_pb2_grpc.RetrievalStub(grpc.insecure_channel(running.address))
        assert fresh.Info(pb.InfoRequest(), timeout=30).index_size == 10
    finally:
        for connection in idle:
            connection.close()
        running.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
