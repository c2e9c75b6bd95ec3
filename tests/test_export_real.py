"""Exports of the real packaged bi-encoder and the stand-in reranker: manifest, parity, ranking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tandem.artifact import hash_folder, read_manifest
from tandem.cli import main
from tandem.encoders import BiEncoder, CrossEncoder
from tandem.export import reference
from tandem.export.parity import spearman, topk_overlap
from tandem.export.pipeline import default_runtime
from tandem.export.quantize import PRESETS, detect_preset
from tandem.export.texts import passages, rerank_cases

pytestmark = pytest.mark.slow
QUANTIZATION = {"openvino": "static", "onnxruntime": "dynamic"}


def test_bi_encoder_manifest_describes_the_artifact(bi_int8, minilm_path: Path) -> None:
    folder, manifest = bi_int8
    assert read_manifest(folder) == manifest
    assert manifest.verified
    assert manifest.kind == "bi-encoder"
    assert manifest.source == str(minilm_path)
    assert manifest.precision == "int8"
    # Presets lay out dynamic INT8; static INT8's scales come from calibration instead.
    presets = {"onnxruntime": ("avx2", "avx512", "avx512_vnni", "arm64"), "openvino": (None,)}
    assert manifest.preset in presets[manifest.runtime]
    assert manifest.max_length == 256
    assert manifest.pooling is not None
    assert (manifest.pooling.mode, manifest.pooling.normalize) == ("mean", True)
    assert manifest.files == hash_folder(folder)
    # OpenVINO's static INT8 by default on x86-64 with VNNI or AMX, else onnxruntime's.
    assert manifest.runtime == default_runtime("int8")
    assert {*manifest.graph_files, "tokenizer.json", "config.json"} <= set(manifest.files)
    assert {"torch", "onnxruntime", "transformers", "optimum"} <= set(manifest.versions)
    assert manifest.quantization["method"] == QUANTIZATION[manifest.runtime]
    assert manifest.quantization["quantized_nodes"] > 0
    assert manifest.parity is not None
    assert manifest.parity.n_texts >= 200
    assert manifest.parity.metrics["mean_cosine"] >= 0.99
    assert manifest.parity.metrics["min_cosine"] >= 0.97


def test_bi_encoder_vectors_match_sentence_transformers(bi_int8, minilm_path, data) -> None:
    texts = [
        *passages(data, count=12, part="verify"),
        "",
        "a",
        "\U0001f642 e\u0301moji, RTL \u200f\u05e9\u05dc\u05d5\u05dd",
    ]
    got = BiEncoder(bi_int8[0]).embed(texts)
    want = reference.embed(minilm_path, texts, max_length=256)
    assert got.shape == want.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    cosines = (got * want).sum(axis=1) / np.linalg.norm(want, axis=1)
    empty = texts.index("")
    assert np.delete(cosines, empty).min() >= 0.97
    # Static INT8 fixes its activation scales on real passages and queries; an empty text
    # ([CLS] [SEP] alone) falls outside them (0.956 on OpenVINO), and the server refuses
    # empty texts everywhere, so it only has to stay recognisably the same vector.
    assert cosines[empty] >= 0.95


def test_cross_encoder_keeps_token_type_ids(ce_int8, reranker_path: Path) -> None:
    folder, manifest = ce_int8
    assert manifest.verified
    assert "token_type_ids" in manifest.inputs
    graph_inputs = set(CrossEncoder(folder).input_names)
    assert graph_inputs == {"input_ids", "attention_mask", "token_type_ids"}
    # The runtime must produce the same ids and segment ids as the transformers tokenizer.
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(str(reranker_path))(
        ["what is a cat?"] * 2, ["A cat is a small mammal.", "Dogs bark."],
        padding=True, truncation=True, return_tensors="np",
    )  # fmt: skip
    batch = CrossEncoder(folder).tokenize_pairs(
        "what is a cat?", ["A cat is a small mammal.", "Dogs bark."]
    )
    assert batch.input_ids.tolist() == expected["input_ids"].tolist()
    assert batch.token_type_ids.tolist() == expected["token_type_ids"].tolist()
    assert batch.token_type_ids.max() == 1


@pytest.mark.parametrize(
    ("artifact", "is_default"),
    [("ce_int8", True), ("ce_other", False)],
)
def test_cross_encoder_parity_and_ranking_order(
    request, artifact: str, is_default: bool, reranker_path: Path, data
) -> None:
    folder, manifest = request.getfixturevalue(artifact)
    assert (manifest.runtime == default_runtime("int8")) is is_default
    assert manifest.quantization["method"] == QUANTIZATION[manifest.runtime]
    assert manifest.parity is not None
    assert manifest.parity.n_queries >= 20
    assert manifest.parity.n_texts >= 20 * 50
    assert manifest.parity.metrics["mean_spearman"] >= 0.98
    assert manifest.parity.metrics["mean_top10_overlap"] >= 0.9
    # Ranking order survives on queries the export did not calibrate on. The stand-in's top
    # scores crowd against a ceiling (near-ties), so single queries are held to looser bars
    # than the 20-query mean in the manifest. Looser still where the CPU's u8*s8 multiply-add
    # saturates (AVX2, AVX-512 without VNNI): on an AVX2 EPYC the first of these queries
    # ranked at Spearman 0.84 (OpenVINO static) and 0.89 (onnxruntime dynamic, 7-bit
    # weights), means 0.953 and 0.969, top-10 overlaps 0.825 and 0.875.
    min_rho, mean_rho, mean_overlap = (0.9, 0.97, 0.85) if vnni() else (0.8, 0.95, 0.8)
    cases = rerank_cases(data, queries=4, candidates=30, part="verify")
    scorer = CrossEncoder(folder)
    want = reference.score(
        reranker_path, [(case.query, case.documents) for case in cases], max_length=512
    )
    got = [scorer.score(case.query, case.documents) for case in cases]
    rhos = [spearman(mine, theirs) for mine, theirs in zip(got, want, strict=True)]
    overlaps = [topk_overlap(mine, theirs, 10) for mine, theirs in zip(got, want, strict=True)]
    assert min(rhos) >= min_rho, rhos
    assert float(np.mean(rhos)) >= mean_rho, rhos
    assert float(np.mean(overlaps)) >= mean_overlap, overlaps


def vnni() -> bool:
    """Whether this CPU's INT8 multiply-add accumulates without saturating (VNNI, Arm)."""
    return not PRESETS[detect_preset()].reduce_range


def test_cross_encoder_truncates_and_flags_overlong_pairs(ce_int8) -> None:
    scorer = CrossEncoder(ce_int8[0])
    batch = scorer.tokenize_pairs("query", ["word " * 2000, "short"])
    assert batch.input_ids.shape[1] == 512
    assert batch.truncated.tolist() == [True, False]
    assert np.isfinite(scorer.forward(batch)).all()


def test_standalone_verify_remeasures(capsys, bi_copy: Path) -> None:
    before = read_manifest(bi_copy).parity
    assert main(["export", "verify", str(bi_copy)]) == 0
    after = read_manifest(bi_copy).parity
    assert after is not None
    assert before is not None
    assert after.passed
    assert after.metrics == before.metrics
    assert "verified bi-encoder" in capsys.readouterr().out


def test_missed_threshold_exits_non_zero_and_unverifies(capsys, bi_copy: Path) -> None:
    assert main(["export", "verify", str(bi_copy), "--min-mean-cosine", "1.01"]) == 1
    assert "parity below thresholds" in capsys.readouterr().err
    manifest = read_manifest(bi_copy)
    assert manifest.parity is not None
    assert not manifest.parity.passed
    assert not manifest.verified


def test_verify_refuses_altered_files(capsys, bi_copy: Path) -> None:
    tokenizer = bi_copy / "tokenizer.json"
    content = json.loads(tokenizer.read_text())
    content["truncation"] = None
    tokenizer.write_text(json.dumps(content))
    assert main(["export", "verify", str(bi_copy)]) == 2
    assert "does not match its manifest hash" in capsys.readouterr().err


def test_fp16_export_replaces_with_force(tmp_path: Path, minilm_path: Path, capsys) -> None:
    out = tmp_path / "fp16"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    code = main(
        ["export", "bi-encoder", "--model", str(minilm_path), "--out", str(out),
         "--precision", "fp16", "--force"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    assert manifest.verified
    assert manifest.precision == "fp16"
    assert manifest.runtime == "onnxruntime"  # FP16 is for GPUs, whatever this CPU is
    assert manifest.checkpoint == "checkpoint"
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert not (out / "stale.txt").exists()
    model = onnx.load(str(out / "model.onnx"))
    weights = [
        init for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT16
    ]
    assert len(weights) > 50
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [path.name for path in tmp_path.iterdir()] == ["fp16"]
