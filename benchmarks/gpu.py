"""`tandem bench gpu`: the reranker on a GPU, bare and served, beside the seeds' pipeline.

Written to run once on a lent GPU machine (H100), in under 8 minutes, from what travels with
the working tree (64 MiB): the FP16 reranker's kept checkpoint and tokenizer, RAG24 cases
(queries with 100 BM25 candidates each) and wheels of what that machine lacks. `make
gpu-carry` prepares all of it in ``.gpu/``; DEVELOPERS.md gives the device command.

It measures, on one GPU in one run:
1. bare model time for 100 RAG24 pairs (pre-tokenized, as the server holds them), per dtype,
   and the parity of fp16/bf16 scores against fp32 on the same GPU;
2. a served ``Rerank`` of 100 passages at concurrency 1 with no budget (all 100 scored):
   p50/p99 end to end, tokenizing included; and ``Search`` with recall_k 100 over the cases'
   passages, upserted first;
3. how deep a call reads within the default 100 ms budget: a ``Rerank`` of every carried
   passage (up to 1,000, tokenized inside the call) and a ``Search`` with recall_k 1,000
   over the stored ones (ids kept at index time), one call at a time and at 4 callers;
4. served pairs/s under closed-loop load, and sentence-transformers' ``CrossEncoder.predict``
   in fp16 on the same GPU and cases.

The bi-encoder the server needs for ``Search`` is built there from the reranker's own MiniLM
body (no second checkpoint fits the carry): its compute is all-MiniLM-L6-v2's, so Search
timings hold, but its retrieval quality means nothing, and it runs unverified.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import lzma
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tandem.artifact import Pooling, hash_folder, read_manifest, write_manifest
from tandem.benchmarks.serving import Process, git_commit
from tandem.devices import TorchDtype
from tandem.export.parity import ranking_metrics

CASES_NAME = "cases.json.gz"
# The fp16 weights travel xz-compressed (45 -> 41 MB): with the wheels, they must fit 64 MiB.
PACKED = ".xz"
RERANKER_NAME = "reranker"
TARGET_P50_MS = 10.0
BUDGET_MS = 100
DEEP = 1000
SHED = {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}
REFUSED_BACKOFF_S = 0.1  # where a refusal names no delay (UNAVAILABLE)


def prepare(args: argparse.Namespace) -> int:
    """Here: copies the FP16 reranker without its ONNX graph, and writes the RAG24 cases."""
    from tandem import rag24
    from tandem.export.texts import rerank_cases

    manifest = read_manifest(args.reranker)
    if manifest.checkpoint is None:
        raise SystemExit(f"{args.reranker} keeps no checkpoint: export it with --precision fp16")
    target = args.carry / RERANKER_NAME
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(args.reranker, target, ignore=shutil.ignore_patterns(*manifest.graph_files))
    for weights in (target / manifest.checkpoint).glob("*.safetensors"):
        packed = weights.with_name(weights.name + PACKED)
        packed.write_bytes(lzma.compress(weights.read_bytes(), preset=6))
        weights.unlink()
    cases = rerank_cases(rag24.load(), queries=args.queries, candidates=100, part="verify")
    payload = [{"query": case.query, "documents": list(case.documents)} for case in cases]
    (args.carry / CASES_NAME).write_bytes(gzip.compress(json.dumps(payload).encode()))
    print(f"wrote {target} and {len(payload)} cases to {args.carry}")
    return 0


def unpack(reranker: Path) -> None:
    for packed in reranker.rglob("*" + PACKED):
        packed.with_name(packed.name.removesuffix(PACKED)).write_bytes(
            lzma.decompress(packed.read_bytes())
        )
        packed.unlink()


def bi_encoder_from(reranker: Path, folder: Path) -> Path:
    """A bi-encoder artifact over the reranker's MiniLM body (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in reranker.iterdir():
        if path.name != "manifest.json":
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, folder / path.name)
    manifest = read_manifest(reranker)
    manifest = replace(
        manifest,
        kind="bi-encoder",
        architecture="BertModel",
        max_length=256,
        pooling=Pooling(mode="mean", normalize=True),
        parity=None,
        source=f"{manifest.source} (MiniLM body, timing only)",
    )
    write_manifest(folder, replace(manifest, files=hash_folder(folder)))
    return folder


def bare_model(reranker: Path, cases: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """Model time for 100 pre-tokenized pairs, per dtype, and parity against fp32."""
    import torch

    from tandem.encoders import CrossEncoder
    from tandem.server.engine.pairs import PairTokenizer, pad_pairs

    out: dict[str, Any] = {}
    scores: dict[str, list[np.ndarray]] = {}
    dtypes: tuple[TorchDtype, ...] = ("float32", "float16", "bfloat16")
    for dtype in dtypes:
        encoder = CrossEncoder(reranker, device=device, backend="torch", torch_dtype=dtype)
        pairs = PairTokenizer.for_reranker(encoder)
        batches = []
        for case in cases:
            query = pairs.tokenize([case["query"]])[0]
            joined = pairs.join(query, pairs.tokenize(case["documents"]))
            batches.append(pad_pairs(joined, pad_id=encoder.pad_id))
        scores[dtype] = [encoder.forward(batch) for batch in batches]
        timings = []
        for batch in batches * 3:
            torch.cuda.synchronize()
            started = time.perf_counter()
            encoder.forward(batch)  # returns on the host, so the GPU work is done
            timings.append(time.perf_counter() - started)
        started = time.perf_counter()
        for case in cases:
            pairs.join(pairs.tokenize([case["query"]])[0], pairs.tokenize(case["documents"]))
        tokenize_ms = (time.perf_counter() - started) / len(cases) * 1000
        out[dtype] = {
            "model_ms_per_100_pairs": _quantiles(timings),
            "padded_tokens_mean": float(np.mean([b.input_ids.size for b in batches])),
            "host_tokenize_ms_per_100_passages": round(tokenize_ms, 2),
        }
        del encoder
        torch.cuda.empty_cache()
    for dtype in ("float16", "bfloat16"):
        out[dtype]["parity_vs_fp32"] = ranking_metrics(scores[dtype], scores["float32"], k=10)
    out["new_shape_cost"] = new_shape_cost(reranker, device)
    return out


def new_shape_cost(reranker: Path, device: str) -> dict[str, Any]:
    """Model time of shapes never run before, then of the same shapes again (fp16, unpadded
    to the runtime's buckets): what a server pays for each new shape it meets."""
    import torch

    from tandem.encoders import CrossEncoder

    encoder = CrossEncoder(reranker, device=device, backend="torch", torch_dtype="float16")
    model = encoder.runtime.model  # type: ignore[attr-defined]
    generator = np.random.default_rng(7)
    drawn = zip(generator.integers(3, 90, 12) | 1, generator.integers(40, 500, 12) | 1, strict=True)
    shapes = [(int(r), int(w)) for r, w in drawn]
    timings: dict[str, list[float]] = {"first": [], "again": []}
    for name in timings:
        for rows, width in shapes:
            ids = torch.randint(1000, 2000, (rows, width), device=device)
            torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
            torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - started)
    del encoder
    torch.cuda.empty_cache()
    return {name: _quantiles(values) for name, values in timings.items()} | {"shapes": shapes}


def _quantiles(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {"p50": 0.0, "p99": 0.0, "n": 0}
    values = np.asarray(seconds) * 1000
    return {
        "p50": round(float(np.percentile(values, 50)), 3),
        "p99": round(float(np.percentile(values, 99)), 3),
        "n": len(values),
    }


async def served(
    port: int, cases: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    import grpc

    from tandem.v1 import tandem_pb2 as pb
    from tandem.v1 import tandem_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]
        requests = [
            pb.RerankRequest(
                query=case["query"],
                documents=[pb.RerankDocument(text=text) for text in case["documents"]],
                top_n=5,
                rerank_budget_ms=0,
                truncate=True,
            )
            for case in cases
        ]
        seen: set[str] = set()
        documents: list[pb.Document] = []
        for case in cases:
            for text in case["documents"]:
                if text not in seen:
                    seen.add(text)
                    documents.append(pb.Document(id=f"d{len(documents)}", text=text))
        await stub.Upsert(
            iter(
                [
                    pb.UpsertRequest(documents=documents[s : s + 100])
                    for s in range(0, len(documents), 100)
                ]
            )
        )
        out: dict[str, Any] = {"indexed_passages": len(documents)}
        searches = [
            # Dense, named: the GPU machine has no tantivy, so its default would be dense too.
            pb.SearchRequest(
                query=case["query"],
                recall_k=100,
                top_n=10,
                rerank_budget_ms=0,
                first_stage=pb.FIRST_STAGE_DENSE,
            )
            for case in cases
        ]
        out["rerank_100_concurrency_1_ms"], scored = await _one_at_a_time(stub.Rerank, requests)
        out["rerank_100_all_scored"] = min(scored) == 100
        out["search_recall_100_concurrency_1_ms"], scored = await _one_at_a_time(
            stub.Search, searches
        )
        out["search_all_scored"] = min(scored) == 100
        out["closed_loop"] = {}
        for callers in args.callers:
            out["closed_loop"][str(callers)] = await closed_loop(
                stub, requests, callers, args.seconds
            )
        out["depth_within_budget"] = await depth_within_budget(
            stub, cases, documents, args.seconds / 2
        )
    return out


async def depth_within_budget(
    stub: Any, cases: list[dict[str, Any]], documents: list[Any], seconds: float
) -> dict[str, Any]:
    """Candidates scored within the default budget when a call offers far more than fit: the
    depth a user gets for 100 ms on this GPU, one call at a time and with 4 callers."""
    from tandem.v1 import tandem_pb2 as pb

    texts = [document.text for document in documents[:DEEP]]
    reranks = [
        pb.RerankRequest(
            query=case["query"],
            documents=[pb.RerankDocument(text=text) for text in texts],
            top_n=10,
            rerank_budget_ms=BUDGET_MS,
            truncate=True,
        )
        for case in cases
    ]
    searches = [
        pb.SearchRequest(
            query=case["query"],
            recall_k=DEEP,
            top_n=10,
            rerank_budget_ms=BUDGET_MS,
            first_stage=pb.FIRST_STAGE_DENSE,
        )
        for case in cases
    ]
    out: dict[str, Any] = {"budget_ms": BUDGET_MS, "offered": len(texts)}
    for name, call, requests in (
        ("rerank", stub.Rerank, reranks),
        ("search", stub.Search, searches),
    ):
        latency, scored = await _one_at_a_time(call, requests)
        loaded = await closed_loop(stub, requests, 4, seconds, method=name.capitalize())
        out[name] = {
            "concurrency_1": {"latency_ms": latency, "reranked": _spread(scored)},
            "callers_4": loaded,
        }
    return out


def _spread(counts: Sequence[int]) -> dict[str, float]:
    if not counts:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": round(float(np.mean(counts)), 1), "min": min(counts), "max": max(counts)}


async def _one_at_a_time(
    call: Callable[[Any], Awaitable[Any]], requests: Sequence[Any]
) -> tuple[dict[str, Any], list[int]]:
    """Three passes over ``requests``, one call at a time: latency quantiles and the server's
    mean milliseconds per stage (the first half pass dropped as warm-up), and each reply's
    candidates reranked."""
    seconds, scored, stages = [], [], []
    for request in list(requests) * 3:
        reply, took = await _answered(call, request)
        seconds.append(took)
        scored.append(reply.reranked_count)
        stages.append({field.name: value for field, value in reply.timings.ListFields()})
    warm = len(requests) // 2
    latency: dict[str, Any] = _quantiles(seconds[warm:])
    latency["server_stages_mean"] = {
        name: round(float(np.mean([stage.get(name, 0.0) for stage in stages[warm:]])), 2)
        for name in sorted({name for stage in stages for name in stage})
    }
    return latency, scored


async def _answered(call: Callable[[Any], Awaitable[Any]], request: Any) -> tuple[Any, float]:
    """The reply and the seconds its answered attempt took. A call shed for load waits as
    the refusal asks and goes again, as a client does: even one call at a time can meet a
    server still busy with the work before it, and a lent GPU's minutes are few."""
    import grpc

    while True:
        started = time.perf_counter()
        try:
            return await call(request), time.perf_counter() - started
        except grpc.aio.AioRpcError as error:
            await _wait_out(error)


async def _wait_out(error: Any) -> None:
    """Raises ``error`` unless the server shed the call for load; then waits as its
    RetryInfo asks, as its clients do (retrying at once would count one refusal many times
    over)."""
    from tandem.server.api.status import retry_delay_of

    if error.code().name not in SHED:
        raise error
    await asyncio.sleep(retry_delay_of(error) or REFUSED_BACKOFF_S)


async def closed_loop(
    stub: Any, requests: list[Any], callers: int, seconds: float, *, method: str = "Rerank"
) -> dict[str, Any]:
    import grpc

    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    scored: list[int] = []
    refused = 0

    async def caller(offset: int) -> None:
        nonlocal refused
        position = offset
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                reply = await getattr(stub, method)(requests[position % len(requests)])
            except grpc.aio.AioRpcError as error:
                # Shed load is a figure of this run, not the end of the lent GPU's minutes.
                await _wait_out(error)
                refused += 1
                continue
            latencies.append(time.perf_counter() - started)
            scored.append(reply.reranked_count)
            position += callers

    started = time.perf_counter()
    await asyncio.gather(*(caller(offset) for offset in range(callers)))
    elapsed = time.perf_counter() - started
    return {
        "pairs_per_s": round(sum(scored) / elapsed, 1),
        "latency_ms": _quantiles(latencies),
        "reranked": _spread(scored),
        "refused": refused,
    }


def seeds_pipeline(
    reranker: Path, cases: list[dict[str, Any]], seconds: float, device: str
) -> dict[str, Any]:
    """sentence-transformers' CrossEncoder.predict in fp16, as the seeds' scripts call it."""
    import torch
    from sentence_transformers import CrossEncoder

    # A Hugging Face folder: the kept checkpoint beside the artifact's tokenizer files.
    folder = Path(tempfile.mkdtemp(prefix="tandem-seeds-"))
    for path in [*reranker.iterdir(), *(reranker / "checkpoint").iterdir()]:
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    model = CrossEncoder(str(folder), device=device, model_kwargs={"dtype": torch.float16})
    model.predict([(cases[0]["query"], text) for text in cases[0]["documents"]])
    pairs, position = 0, 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        case = cases[position % len(cases)]
        model.predict([(case["query"], text) for text in case["documents"]], batch_size=100)
        pairs += len(case["documents"])
        position += 1
    elapsed = time.perf_counter() - started
    return {"pairs_per_s": round(pairs / elapsed, 1), "batch_size": 100, "dtype": "float16"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no GPU here: tandem bench gpu measures a CUDA device")
    cases = json.loads(gzip.decompress((args.carry / CASES_NAME).read_bytes()))
    reranker = args.carry / RERANKER_NAME
    unpack(reranker)
    out: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "cases": len(cases),
    }
    out["bare"] = bare_model(reranker, cases, args.device)
    print(json.dumps(out["bare"], indent=1), flush=True)
    work = Path(tempfile.mkdtemp(prefix="tandem-gpu-"))
    bi_encoder = bi_encoder_from(reranker, work / "bi-encoder")
    command = [
        sys.executable, "-m", "tandem.cli", "serve", "--port", "0", "--metrics-port", "-1",
        "--http-port", "-1", "--collection", str(work / "collection"),
        "--bi-encoder", str(bi_encoder), "--reranker", str(reranker), "--device", args.device,
        "--allow-unverified", "--reranker-nice", "0", "--log-format", "json",
        # The carry holds no ONNX graph, so the PyTorch backend even where CUDA's provider is.
        "--backend", "torch",
    ]  # fmt: skip
    server = Process(command, work / "server.log", '"msg": "serving"')
    try:
        out["served"] = asyncio.run(served(server.port, cases, args))
    finally:
        server.stop()
        log_text = (work / "server.log").read_text()
        out["server_batches_log"] = [
            line for line in log_text.splitlines() if "batches" in line or "GPU shapes" in line
        ]
        out["server_log_tail"] = log_text[-4000:]
    out["seeds_pipeline"] = seeds_pipeline(reranker, cases, args.seconds, args.device)
    p50 = out["served"]["rerank_100_concurrency_1_ms"]["p50"]
    out["target_rerank_p50_le_10ms"] = bool(
        p50 <= TARGET_P50_MS and out["served"]["rerank_100_all_scored"]
    )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--carry", type=Path, default=Path(".gpu"), help="what `make gpu-carry` wrote"
    )
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=20.0, help="per closed-loop level")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--prepare", action="store_true", help="write --carry here (needs --reranker)"
    )
    parser.add_argument(
        "--reranker", type=Path, help="an FP16 reranker export (with its checkpoint)"
    )
    parser.add_argument("--queries", type=int, default=10, help="RAG24 cases to carry")


def main(args: argparse.Namespace) -> int:
    if args.prepare:
        return prepare(args)
    out = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2), encoding="utf-8")
    summary = {key: out[key] for key in ("gpu", "target_rerank_p50_le_10ms")}
    print(json.dumps(summary), flush=True)
    return 0
