"""The GPU artifact's two backends, run on the CPU as CI runs them.

An FP16 export keeps its checkpoint for the PyTorch backend (fp16/bf16 with SDPA on a GPU,
fp32 on a CPU); these tests run that backend against the PyTorch reference, through the
server, and from the files `make gpu-carry` sends to a GPU machine. The CUDA paths
themselves run only on a lent GPU (`tandem bench gpu`, docs/DEVELOPERS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from serving import ServerThread, document, settings_for, upsert

from tandem.artifact import ArtifactError, read_manifest
from tandem.benchmarks import gpu
from tandem.cli import main
from tandem.devices import DeviceSpec
from tandem.encoders import BiEncoder, CrossEncoder
from tandem.export import reference
from tandem.export.parity import spearman
from tandem.export.texts import passages, rerank_cases
from tandem.runtimes import RuntimeUnavailable
from tandem.runtimes.pytorch import bucket_rows, bucket_shapes, bucket_width
from tandem.v1 import tandem_pb2 as pb

pytestmark = pytest.mark.slow


def test_the_fp16_export_keeps_its_checkpoint_in_fp16(ce_fp16) -> None:
    folder, manifest = ce_fp16
    assert manifest.verified
    assert manifest.checkpoint == "checkpoint"
    assert manifest.runtime == "onnxruntime"
    weights = folder / "checkpoint" / "model.safetensors"
    assert f"checkpoint/{weights.name}" in manifest.files
    with safe_open(str(weights), framework="np") as tensors:
        dtypes = {tensors.get_slice(name).get_dtype() for name in tensors.keys()}  # noqa: SIM118
    assert dtypes == {"F16"}


def test_torch_backend_scores_like_the_reference(ce_fp16, reranker_path: Path, data) -> None:
    scorer = CrossEncoder(ce_fp16[0], backend="torch")
    assert scorer.runtime.backend == "torch"
    cases = rerank_cases(data, queries=3, candidates=20, part="verify")
    got = [scorer.score(case.query, case.documents) for case in cases]
    want = reference.score(reranker_path, [(c.query, c.documents) for c in cases], max_length=512)
    for mine, theirs in zip(got, want, strict=True):
        # fp16 weights computed in fp32: the ranking holds, scores move by weight rounding.
        assert spearman(mine, theirs) >= 0.995
        assert np.abs(mine - theirs).max() < 0.05


def test_gpu_buckets_pad_a_batch_without_changing_a_score_or_a_vector(
    ce_fp16, bi_fp16, data
) -> None:
    # On a GPU a run is padded to a bucketed shape (more rows, wider); here the runtime is
    # told it is on one while its tensors stay on the CPU, so the padding itself is checked.
    case = rerank_cases(data, queries=1, candidates=13, part="verify")[0]
    for folder in (ce_fp16[0], bi_fp16[0]):
        encoder = (CrossEncoder if folder == ce_fp16[0] else BiEncoder)(folder, backend="torch")
        if isinstance(encoder, CrossEncoder):
            batch = encoder.tokenize_pairs(case.query, list(case.documents))
        else:
            batch = encoder.tokenize(list(case.documents))
        rows, width = batch.input_ids.shape
        assert (bucket_rows(rows), bucket_width(width)) != (rows, width)
        plain = encoder.runtime.run(batch)
        encoder.runtime.device = DeviceSpec("cuda", 0)  # type: ignore[attr-defined]
        padded = encoder.runtime.run(batch)
        assert padded.shape == plain.shape
        np.testing.assert_allclose(padded, plain, atol=1e-4)


def test_bucketed_shapes_are_few_and_cover_every_batch() -> None:
    shapes = bucket_shapes(1024, 512, 65_536)
    assert len(shapes) < 140  # warmed at a GPU server's start-up
    # Exactly the shapes batches within the caps (before padding) are padded to.
    assert set(shapes) == {
        (bucket_rows(rows), bucket_width(width))
        for width in range(1, 513)
        for rows in range(1, 1025)
        if rows * width <= 65_536
    }
    for rows in range(1, 1025):
        assert rows <= bucket_rows(rows) <= rows * 1.5
    for rows, width in [(1, 1), (100, 487), (128, 512), (1024, 64), (7, 300)]:
        assert (bucket_rows(rows), bucket_width(width)) in shapes


def test_torch_backend_embeds_like_the_reference(bi_fp16, minilm_path: Path, data) -> None:
    texts = passages(data, count=16, part="verify")
    embedder = BiEncoder(bi_fp16[0], backend="torch")
    got = embedder.embed(texts)
    want = reference.embed(minilm_path, texts, max_length=256)
    assert embedder.dimension == 384
    cosines = (got * want).sum(axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.999


def test_only_the_files_a_backend_reads_must_be_there(ce_fp16, tmp_path: Path) -> None:
    copy = tmp_path / "checkpoint-only"
    shutil.copytree(ce_fp16[0], copy)
    (copy / "model.onnx").unlink()
    CrossEncoder(copy, backend="torch")
    with pytest.raises(ArtifactError, match=r"model\.onnx is listed in the manifest but missing"):
        CrossEncoder(copy)


def test_a_gpu_asked_for_where_there_is_none_is_refused(ce_fp16, ce_int8) -> None:
    with pytest.raises(RuntimeUnavailable, match="PyTorch sees no GPU"):
        CrossEncoder(ce_fp16[0], device="cuda", backend="torch")
    with pytest.raises(RuntimeUnavailable, match="export with --precision fp16"):
        CrossEncoder(ce_int8[0], device="cuda:1")


def test_verify_measures_the_checkpoint_without_rewriting_the_manifest(ce_fp16, tmp_path, capsys):
    copy = tmp_path / "fp16"
    shutil.copytree(ce_fp16[0], copy)
    before = (copy / "manifest.json").read_text()
    code = main(
        [
            "export",
            "verify",
            str(copy),
            "--backend",
            "torch",
            "--queries",
            "2",
            "--candidates",
            "10",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "verified cross-encoder (fp16)" in capsys.readouterr().out
    assert (copy / "manifest.json").read_text() == before


def test_the_server_reranks_on_the_torch_backend(tmp_path, bi_fp16, ce_fp16, data) -> None:
    settings = settings_for(tmp_path / "c", bi_fp16[0], ce_fp16[0], backend="torch")
    running = ServerThread(settings)
    try:
        stub = running.stub()
        upsert(stub, [document(s.id, s.text) for s in data.segments[:30]])
        case = rerank_cases(data, queries=1, candidates=10, part="verify")[0]
        reply = stub.Rerank(
            pb.RerankRequest(
                query=case.query,
                documents=[pb.RerankDocument(text=text) for text in case.documents],
                rerank_budget_ms=0,
            )
        )
        want = CrossEncoder(ce_fp16[0], backend="torch").score(case.query, case.documents)
        assert reply.reranked_count == 10
        got = {result.index: result.relevance_score for result in reply.results}
        assert np.allclose([got[i] for i in range(10)], want, atol=1e-3)
        found = stub.Search(
            pb.SearchRequest(query=case.query, recall_k=20, top_n=5, rerank_budget_ms=0)
        )
        assert found.reranked_count == 20
    finally:
        running.stop()


def test_what_travels_to_a_gpu_opens_there(ce_fp16, tmp_path: Path, data) -> None:
    carry = tmp_path / "carry"
    args = argparse.Namespace(reranker=ce_fp16[0], carry=carry, queries=2)
    assert gpu.prepare(args) == 0
    reranker = carry / gpu.RERANKER_NAME
    assert not (reranker / "model.onnx").exists()
    assert list((reranker / "checkpoint").glob("*.xz"))
    gpu.unpack(reranker)
    scorer = CrossEncoder(reranker, backend="torch")  # every file it reads matches its hash
    cases = json.loads(gzip.decompress((carry / gpu.CASES_NAME).read_bytes()))
    assert len(cases) == 2
    assert all(len(case["documents"]) == 100 for case in cases)
    bi_encoder = gpu.bi_encoder_from(reranker, tmp_path / "bi")
    embedder = BiEncoder(bi_encoder, backend="torch")
    assert read_manifest(bi_encoder).parity is None  # timing only: never verified
    assert embedder.embed(["a passage"]).shape == (1, 384)
    assert np.isfinite(scorer.score("q", ["d"])).all()
    # The device script's served half, on the CPU: a fault there would cost a lent GPU's
    # few minutes. Short passages keep it quick; every call still carries 100 of them.
    short = [
        {"query": case["query"], "documents": [" ".join(t.split()[:12]) for t in case["documents"]]}
        for case in cases
    ]
    settings = settings_for(tmp_path / "c", bi_encoder, reranker, backend="torch",
                            allow_unverified=True)  # fmt: skip
    running = ServerThread(settings)
    try:
        timing = argparse.Namespace(callers=[2], seconds=0.5)
        served = asyncio.run(gpu.served(running.running.port, short, timing))
    finally:
        running.stop()
    assert served["rerank_100_all_scored"]
    assert served["search_all_scored"]
    assert served["rerank_100_concurrency_1_ms"]["p50"] > 0
    assert served["closed_loop"]["2"]["pairs_per_s"] > 0
    depth = served["depth_within_budget"]
    assert depth["offered"] == len({text for case in short for text in case["documents"]})
    for call in ("rerank", "search"):
        assert 0 < depth[call]["concurrency_1"]["reranked"]["max"] <= depth["offered"]
        assert depth[call]["callers_4"]["latency_ms"]["n"] > 0


def test_a_collection_refuses_another_bi_encoders_vectors(tmp_path, bi_int8, bi_fp16) -> None:
    from tandem.server.engine.collection import Collection, CollectionError

    Collection(tmp_path / "c", embedder=BiEncoder(bi_int8[0]), pairs=None).close()
    # The same architecture exported again (FP16 here) embeds a little differently: vectors
    # from two models must not share an index, whichever runtime's graph they came from.
    with pytest.raises(CollectionError, match="embedded with another bi-encoder"):
        Collection(tmp_path / "c", embedder=BiEncoder(bi_fp16[0]), pairs=None)
