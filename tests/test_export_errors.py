"""Bad export input: exit code 2, one line that says what to fix, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tandem.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["export", *args])
    return code, capsys.readouterr().err


def assert_usage_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tandem export: error:")
    assert fragment in lines[0]


def assert_nothing_written(parent: Path, keep: set[str] | None = None) -> None:
    assert {path.name for path in parent.iterdir()} == (keep or set())


def test_missing_path(capsys, tmp_path: Path) -> None:
    code, err = run_cli(
        capsys, "bi-encoder", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")
    )
    assert_usage_error(code, err, "no such folder")
    assert_nothing_written(tmp_path)


def test_folder_that_is_not_a_model(capsys, tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    code, err = run_cli(
        capsys, "bi-encoder", "--model", str(tmp_path / "notes"), "--out", str(tmp_path / "out")
    )
    assert_usage_error(code, err, "not a Hugging Face model folder (no config.json)")
    assert_nothing_written(tmp_path, {"notes"})


def test_bi_encoder_exported_as_cross_encoder(capsys, tmp_path: Path, minilm_path: Path) -> None:
    code, err = run_cli(
        capsys, "cross-encoder", "--model", str(minilm_path), "--out", str(tmp_path / "out")
    )
    assert_usage_error(code, err, "num_labels=1")
    assert_nothing_written(tmp_path)


def test_out_equal_to_input(capsys, tmp_path: Path, minilm_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(minilm_path, model)
    before = sorted(path.name for path in model.rglob("*"))
    code, err = run_cli(capsys, "bi-encoder", "--model", str(model), "--out", str(model), "--force")
    assert_usage_error(code, err, "overlaps the input model folder")
    assert sorted(path.name for path in model.rglob("*")) == before
    assert_nothing_written(tmp_path, {"model"})


def test_non_empty_out_without_force(capsys, tmp_path: Path, minilm_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, "bi-encoder", "--model", str(minilm_path), "--out", str(out))
    assert_usage_error(code, err, "is not empty; pass --force")
    assert (out / "keep.txt").read_text() == "precious"
    assert_nothing_written(tmp_path, {"out"})


def test_unsupported_architecture(capsys, tmp_path: Path, minilm_path: Path) -> None:
    model = tmp_path / "gpt"
    model.mkdir()
    shutil.copy(minilm_path / "tokenizer.json", model)
    (model / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2Model"]})
    )
    code, err = run_cli(capsys, "bi-encoder", "--model", str(model), "--out", str(tmp_path / "out"))
    assert_usage_error(code, err, "model_type 'gpt2' is not supported")
    assert_nothing_written(tmp_path, {"gpt"})


def test_max_length_beyond_positions(capsys, tmp_path: Path, minilm_path: Path) -> None:
    code, err = run_cli(
        capsys, "bi-encoder", "--model", str(minilm_path), "--out", str(tmp_path / "out"),
        "--max-length", "4096",
    )  # fmt: skip
    assert_usage_error(code, err, "--max-length 4096 is outside 1..512")
    assert_nothing_written(tmp_path)


def test_verify_of_a_folder_without_manifest(capsys, tmp_path: Path) -> None:
    code, err = run_cli(capsys, "verify", str(tmp_path))
    assert_usage_error(code, err, "not a Tandem export")


def test_unknown_precision_is_an_argparse_error(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "bi-encoder", "--model", "x", "--out", "y", "--precision", "int4"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_a_default_prompt_the_model_lacks(capsys, tmp_path: Path, minilm_path: Path) -> None:
    code, err = run_cli(
        capsys, "bi-encoder", "--model", str(minilm_path), "--out", str(tmp_path / "out"),
        "--prompt", "query=query: ", "--default-prompt-name", "summary",
    )  # fmt: skip
    assert_usage_error(code, err, "the default prompt 'summary' is not one of its prompts")
    assert_nothing_written(tmp_path)


def test_a_prompt_that_leaves_no_room_for_text(capsys, tmp_path: Path, minilm_path: Path) -> None:
    code, err = run_cli(
        capsys, "bi-encoder", "--model", str(minilm_path), "--out", str(tmp_path / "out"),
        "--prompt", "query=" + "represent this question " * 8, "--max-length", "16",
    )  # fmt: skip
    assert_usage_error(code, err, "prompt 'query' takes 24 of the 16 tokens")
    assert_nothing_written(tmp_path)


def test_a_prompt_flag_without_a_name_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "bi-encoder", "--model", "x", "--out", "y", "--prompt", "query: "])
    assert exit_info.value.code == 2
    assert "write NAME=TEXT" in capsys.readouterr().err
