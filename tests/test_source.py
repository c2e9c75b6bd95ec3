"""Reading a checkpoint: what kind it is, its pooling and limits, and which ones are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tandem.artifact import Pooling
from tandem.export.errors import InvalidSource, UnsupportedModel
from tandem.export.source import (
    check_kind,
    default_max_length,
    looks_like_path,
    resolve,
    sentence_transformers_pooling,
)


def test_packaged_minilm_reads_as_sentence_transformers(minilm_path: Path) -> None:
    source = resolve(str(minilm_path))
    check_kind(source, "bi-encoder")
    assert sentence_transformers_pooling(source) == Pooling(mode="mean", normalize=True)
    assert default_max_length(source, "bi-encoder") == 256


def test_stand_in_reranker_is_a_single_logit_classifier(reranker_path: Path) -> None:
    source = resolve(str(reranker_path))
    check_kind(source, "cross-encoder")
    assert source.num_labels == 1
    assert default_max_length(source, "cross-encoder") == 512


def test_bi_encoder_is_refused_as_cross_encoder(minilm_path: Path) -> None:
    with pytest.raises(InvalidSource, match="no sequence-classification head"):
        check_kind(resolve(str(minilm_path)), "cross-encoder")


def test_reranker_is_refused_as_bi_encoder(reranker_path: Path) -> None:
    with pytest.raises(InvalidSource, match="is a classifier"):
        check_kind(resolve(str(reranker_path)), "bi-encoder")


def _config_only_copy(src: Path, dst: Path, **changes: object) -> Path:
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_multi_label_head_is_refused(tmp_path: Path, reranker_path: Path) -> None:
    folder = _config_only_copy(
        reranker_path, tmp_path / "m", id2label={"0": "a", "1": "b", "2": "c"}
    )
    with pytest.raises(InvalidSource, match="num_labels=3"):
        check_kind(resolve(str(folder)), "cross-encoder")


def test_unsupported_family_is_refused(tmp_path: Path, minilm_path: Path) -> None:
    folder = _config_only_copy(
        minilm_path, tmp_path / "g", model_type="gpt2", architectures=["GPT2Model"]
    )
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2' is not supported"):
        check_kind(resolve(str(folder)), "bi-encoder")


def test_cls_pooling_without_normalize(tmp_path: Path, minilm_path: Path) -> None:
    folder = tmp_path / "cls"
    shutil.copytree(minilm_path, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "modules.json").write_text(
        json.dumps([{"path": "", "type": "sentence_transformers.models.Transformer"},
                    {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )  # fmt: skip
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    assert sentence_transformers_pooling(resolve(str(folder))) == Pooling("cls", False)


@pytest.mark.parametrize(
    ("spec", "is_path"),
    [("/tmp/x", True), ("./model", True), ("~/m", True), ("a b", True),
     ("cross-encoder/ms-marco-MiniLM-L-6-v2", False), ("bert-base-uncased", False)],
)  # fmt: skip
def test_hub_ids_and_paths_are_told_apart(spec: str, is_path: bool) -> None:
    assert looks_like_path(spec) is is_path


def test_unreachable_hub_id_says_to_pass_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InvalidSource, match="could not be fetched from the Hugging Face hub"):
        resolve("tandem-test/does-not-exist")
