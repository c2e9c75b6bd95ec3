"""The manifest: round-trip, validation, and detection of altered files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.artifact import (
    MANIFEST_NAME,
    ArtifactError,
    Manifest,
    Parity,
    Pooling,
    check_files,
    hash_folder,
    open_checked,
    read_manifest,
    write_manifest,
)
from tandem.encoders import pad_token_id


def make_manifest(files: dict[str, str]) -> Manifest:
    return Manifest(
        kind="bi-encoder",
        source="/models/minilm",
        architecture="BertModel",
        model_type="bert",
        precision="int8",
        preset="avx2",
        max_length=256,
        inputs=("input_ids", "attention_mask", "token_type_ids"),
        opset=18,
        pooling=Pooling(mode="mean", normalize=True),
        quantization={"method": "dynamic", "fp32_nodes": ["a", "b"]},
        versions={"onnxruntime": "1.32.0"},
        files=files,
        created_at="2026-11-22T00:00:00+00:00",
    )


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    parity = Parity(
        passed=True,
        metrics={"mean_cosine": 0.995},
        thresholds={"min_mean_cosine": 0.99},
        reference="st",
        texts="rag24",
        n_texts=256,
        n_queries=0,
        measured_at="2026-11-22T00:00:00+00:00",
    )
    manifest = make_manifest({"model.onnx": "ab" * 32}).with_parity(parity)
    write_manifest(tmp_path, manifest)
    loaded = read_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.verified
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]


def test_unverified_until_parity_passes() -> None:
    manifest = make_manifest({})
    assert not manifest.verified
    failed = Parity(False, {}, {}, "st", "rag24", 1, 0, "now")
    assert not manifest.with_parity(failed).verified


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw.update(format_version=99), "format_version 99"),
        (lambda raw: raw.update(kind="tokenizer"), "kind 'tokenizer'"),
        (lambda raw: raw.update(precision="int4"), "precision 'int4'"),
        (lambda raw: raw.pop("files"), "missing or has a malformed field"),
        (lambda raw: raw["pooling"].update(mode="weighted"), "pooling mode 'weighted'"),
    ],
)
def test_malformed_manifests_are_refused(mutate, message: str) -> None:
    raw = json.loads(make_manifest({}).to_json())
    mutate(raw)
    with pytest.raises(ArtifactError, match=message):
        Manifest.from_json(json.dumps(raw))


def test_not_json_is_refused() -> None:
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Manifest.from_json("{")


def test_missing_manifest_says_not_an_export(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a Tandem export"):
        read_manifest(tmp_path)


def test_altered_and_missing_files_are_detected(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"weights")
    (tmp_path / "tokenizer.json").write_text("{}")
    manifest = make_manifest(hash_folder(tmp_path))
    assert set(manifest.files) == {"model.onnx", "tokenizer.json"}
    check_files(tmp_path, manifest)

    (tmp_path / "model.onnx").write_bytes(b"weightz")
    with pytest.raises(ArtifactError, match="does not match its manifest hash"):
        check_files(tmp_path, manifest)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        check_files(tmp_path, manifest)


@pytest.mark.parametrize(
    ("config", "expected"),
    [({"pad_token_id": 1}, 1), ({"pad_token_id": 0}, 0), ({"pad_token_id": None}, 0), ({}, 0)],
)
def test_pad_id_comes_from_the_model_config(tmp_path: Path, config: dict, expected: int) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert pad_token_id(tmp_path) == expected


def test_open_checked_refuses_the_wrong_kind(tmp_path: Path) -> None:
    write_manifest(tmp_path, make_manifest({}))
    with pytest.raises(ArtifactError, match="holds a bi-encoder, not a cross-encoder"):
        open_checked(tmp_path, "cross-encoder")
