"""Test helpers: a real server on port 0 in a background event loop, and seeded collections."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import json_format, struct_pb2

from tandem.encoders import BiEncoder, CrossEncoder
from tandem.server.app import Running, create_server
from tandem.server.engine.batcher import CostModel, RerankBatcher
from tandem.server.engine.collection import Collection
from tandem.server.engine.pairs import PairTokenizer
from tandem.server.engine.search import DocumentRef, Result, Searcher, make_runner
from tandem.server.settings import Settings
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

START_TIMEOUT = 120
# The HTTP tests check what the doors answer, not how fast: a stand-in rerank of 100
# candidates took 8 s on an AVX2-only EPYC, past httpx's 5 s default.
HTTP_TIMEOUT = 120.0
post = functools.partial(httpx.post, timeout=HTTP_TIMEOUT)
get = functools.partial(httpx.get, timeout=HTTP_TIMEOUT)


class ServerThread:
    """Runs ``create_server(settings)`` on its own loop, so tests can use blocking stubs."""

    def __init__(self, settings: Settings, *, warm: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: Running = self.call(create_server(settings, warm=warm))

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = START_TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self) -> tandem_pb2_grpc.RetrievalStub:
        return tandem_pb2_grpc.RetrievalStub(self.channel())

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.call(self.running.stop(grace), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


def settings_for(
    collection: Path, bi_encoder: Path, reranker: Path | None, **overrides: Any
) -> Settings:
    base = Settings(
        port=0,
        metrics_port=0,
        http_port=0,
        collection=collection,
        bi_encoder=bi_encoder,
        reranker=reranker,
        checkpoint_seconds=0.5,
        drain_seconds=1.0,
    )
    return dataclasses.replace(base, **overrides)


def upsert(stub: tandem_pb2_grpc.RetrievalStub, documents: list[pb.Document], *,
           per_message: int = 50, **kwargs: Any) -> pb.UpsertResponse:  # fmt: skip
    messages = [
        pb.UpsertRequest(documents=documents[start : start + per_message])
        for start in range(0, len(documents), per_message)
    ]
    response: pb.UpsertResponse = stub.Upsert(iter(messages), **kwargs)
    return response


def grpc_filter(raw: dict[str, Any]) -> dict[str, struct_pb2.Value]:
    """A metadata filter as the ``map<string, Value>`` Search, Delete and Get take."""
    return {key: json_format.ParseDict(value, struct_pb2.Value()) for key, value in raw.items()}


def document(identifier: str, text: str, **metadata: Any) -> pb.Document:
    message = pb.Document(id=identifier, text=text)
    message.metadata.update(metadata)
    return message


def fill_collection(
    folder: Path, bi_encoder: Path, reranker: Path | None, segments: Sequence[Any]
) -> None:
    """Upserts ``segments`` (RAG24 segments: .id, .text) into the collection at ``folder``
    through a short-lived server, which saves the index as it stops."""
    running = ServerThread(settings_for(folder, bi_encoder, reranker))
    try:
        upsert(running.stub(), [document(s.id, s.text) for s in segments])
    finally:
        running.stop()


class ServerProcess:
    """`tandem serve` in a child process; its JSON log lines are kept."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "tandem.cli", "serve", "--port", "0",
                   "--http-port", "-1", "--metrics-port", "-1", *args]  # fmt: skip
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self.http: str | None = None  # the HTTP base address, where --http-port was given
        ready = threading.Event()
        self.reader = threading.Thread(target=self._read, args=(ready,), daemon=True)
        self.reader.start()
        ready.wait(timeout=300)

    def _read(self, ready: threading.Event) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if '"msg": "serving"' in line:
                serving = json.loads(line)
                self.port = int(serving["address"].rsplit(":", 1)[1])
                self.http = serving.get("http")
                ready.set()
        ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stub(self) -> tandem_pb2_grpc.RetrievalStub:
        assert self.port, self.log
        return tandem_pb2_grpc.RetrievalStub(grpc.insecure_channel(f"127.0.0.1:{self.port}"))

    def finish(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=120)
        self.reader.join(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code


def with_training_figures(
    artifact: Path, folder: Path, *, trained: float, hybrid: float, p_value: float
) -> Path:
    """A copy of ``artifact`` whose manifest says `tandem train` made it and measured it at
    ``trained`` nDCG@10 against ``hybrid`` for stage 1 on 137 held-out queries (written by
    the writer `tandem train` uses)."""
    from tandem.training.report import record_in_manifest

    rows = [
        {"system": "hybrid (stage 1 alone)", "ndcg_at_10": hybrid, "mrr_at_10": hybrid,
         "recall": 0.9, "ms_per_pair": None, "note": ""},
        {"system": "trained (INT8 artifact)", "ndcg_at_10": trained, "mrr_at_10": trained,
         "recall": 0.9, "ms_per_pair": 12.0, "note": ""},
    ]  # fmt: skip
    lead = {"mean_difference": trained - hybrid, "p_value": p_value, "n": 137,
            "ci_low": trained - hybrid - 0.03, "ci_high": trained - hybrid + 0.03}  # fmt: skip
    shutil.copytree(artifact, folder)
    record_in_manifest(folder, {
        "base": {"kind": "new-head"},
        "labels": {"sha256": "0" * 64},
        "split": {"train_queries": 156, "held_out_queries": 145},
        "recipe": {"loss": "lambda"},
        "training": {"seconds": 60.0},
        "first_stage": {"mode": "hybrid"},
        "created_at": "2026-12-05T00:00:00+00:00",
        "evaluation": {
            "rows": rows, "trained": "trained (INT8 artifact)", "queries": 137, "depth": 30,
            "paired_tests": {"hybrid (stage 1 alone)": {"ndcg@10": lead, "mrr@10": lead}},
        },
    })  # fmt: skip
    return folder


def model_args(bi_int8, ce_int8) -> list[str]:
    return ["--bi-encoder", str(bi_int8[0]), "--reranker", str(ce_int8[0])]


SearcherParts = tuple[Collection, BiEncoder, CrossEncoder, PairTokenizer]


def rerank_in_process(
    parts: SearcherParts,
    query: str,
    refs: Sequence[DocumentRef],
    *,
    cost: CostModel | None = None,
    **fields: Any,
) -> Result:
    """One ``Searcher.rerank`` with no server around it, on a batcher of its own (which
    starts from ``cost`` where given)."""
    collection, embedder, reranker, pairs = parts

    async def run() -> Result:
        batcher = RerankBatcher(make_runner(reranker), cost=cost)
        await batcher.start()
        try:
            searcher = Searcher(
                collection, embedder=embedder, reranker=reranker, pairs=pairs, batcher=batcher
            )
            return await searcher.rerank(query, refs, **fields)
        finally:
            await batcher.stop()

    return asyncio.run(run())
