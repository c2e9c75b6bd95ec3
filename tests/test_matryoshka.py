"""Matryoshka sizes: exported from config.json or the flag, served as sentence-transformers'
``truncate_dim`` serves them on every door, and refused for a model not trained for them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cohere
import grpc
import httpx
import numpy as np
import openai
import pytest
from serving import ServerThread, settings_for

from tandem.artifact import ArtifactError, Manifest, read_manifest
from tandem.cli import main as tandem_main
from tandem.export.errors import InvalidSource, UsageError
from tandem.export.source import matryoshka_sizes, resolve
from tandem.matryoshka import (
    Matryoshka,
    UnsupportedDimensions,
    parse_sizes,
    served_dimension,
    truncated,
)
from tandem.v1 import tandem_pb2 as pb

TEXTS = ["what causes the northern lights", "Aurora borealis: charged solar particles."]


def _checkpoint_with_config(source: Path, target: Path, **fields: object) -> Path:
    """A copy of a real checkpoint whose config.json carries these fields."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(fields)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def exported(tmp_path_factory, minilm_path) -> Path:
    """all-MiniLM-L6-v2 exported at FP32 through the command line, declared Matryoshka at 256
    and 128 by the flag (it was not trained so: these tests check the cut, not its quality)."""
    out = tmp_path_factory.mktemp("matryoshka") / "artifact"
    code = tandem_main(
        ["export", "bi-encoder", "--model", str(minilm_path), "--out", str(out),
         "--precision", "fp32", "--runtime", "onnxruntime", "--texts", "200",
         "--matryoshka-dimensions", "128,256"]
    )  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, exported):
    running = ServerThread(settings_for(tmp_path_factory.mktemp("collection"), exported, None))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(minilm_path):
    """sentence-transformers' own cut: SentenceTransformer(truncate_dim=n), then normalized."""
    from sentence_transformers import SentenceTransformer

    def encode(size: int) -> np.ndarray:
        model = SentenceTransformer(str(minilm_path), device="cpu", truncate_dim=size)
        return np.asarray(model.encode(TEXTS, normalize_embeddings=True))

    return encode


def test_the_flag_is_recorded_largest_first_and_the_export_verifies(exported) -> None:
    manifest = read_manifest(exported)
    assert manifest.matryoshka == Matryoshka((256, 128))
    assert manifest.verified
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_manifests_written_before_matryoshka_read_as_none(exported) -> None:
    raw = json.loads(read_manifest(exported).to_json())
    del raw["matryoshka"]
    assert Manifest.from_json(json.dumps(raw)).matryoshka is None
    raw["matryoshka"] = {"sizes": None}
    assert Manifest.from_json(json.dumps(raw)).matryoshka == Matryoshka()
    raw["matryoshka"] = {"sizes": "256"}
    with pytest.raises(ArtifactError, match=r"matryoshka\.sizes"):
        Manifest.from_json(json.dumps(raw))


def test_sizes_are_read_from_config_json_as_vllm_reads_them(tmp_path, minilm_path) -> None:
    listed = _checkpoint_with_config(minilm_path, tmp_path / "l", matryoshka_dimensions=[64, 256])
    assert matryoshka_sizes(resolve(str(listed)), None) == Matryoshka((256, 64))
    flagged = _checkpoint_with_config(minilm_path, tmp_path / "f", is_matryoshka=True)
    assert matryoshka_sizes(resolve(str(flagged)), None) == Matryoshka()
    assert matryoshka_sizes(resolve(str(minilm_path)), None) is None
    # The flag wins over the config.
    assert matryoshka_sizes(resolve(str(listed)), Matryoshka((128,))) == Matryoshka((128,))
    wrong = _checkpoint_with_config(minilm_path, tmp_path / "w", matryoshka_dimensions=[512])
    with pytest.raises(InvalidSource, match=r"outside 1\.\.384"):
        matryoshka_sizes(resolve(str(wrong)), None)
    with pytest.raises(UsageError, match="--matryoshka-dimensions"):
        matryoshka_sizes(resolve(str(minilm_path)), Matryoshka((1024,)))


def test_the_flag_parses_sizes_or_any_and_refuses_the_rest(capsys) -> None:
    assert parse_sizes("128, 256,128") == Matryoshka((256, 128))
    assert parse_sizes("any") == Matryoshka()
    for bad in ("", "big", "256;128"):
        with pytest.raises(ValueError, match="512,256,128"):
            parse_sizes(bad)
    with pytest.raises(SystemExit):
        tandem_main(["export", "bi-encoder", "--model", "m", "--out", "o",
                     "--matryoshka-dimensions", "half"])  # fmt: skip
    assert "--matryoshka-dimensions 'half'" in capsys.readouterr().err


def test_the_cut_is_the_prefix_scaled_to_unit_length() -> None:
    vectors = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    cut = truncated(vectors, 2, normalize=True)
    np.testing.assert_allclose(cut, [[0.6, 0.8], [0.0, 0.0]])  # a zero prefix stays zero
    np.testing.assert_allclose(truncated(vectors, 2, normalize=False), vectors[:, :2])
    assert truncated(vectors, 3, normalize=True) is vectors


@pytest.mark.parametrize(
    ("requested", "matryoshka", "served_or_message"),
    [
        (None, None, 384),
        (384, None, 384),
        (256, None, "not exported as a Matryoshka model"),
        (256, Matryoshka((256, 128)), 256),
        (200, Matryoshka((256, 128)), "trained to be cut to 256, 128"),
        (200, Matryoshka(), 200),
        (385, Matryoshka(), "ask for 1 to 384"),
        (0, Matryoshka(), "ask for 1 to 384"),
    ],
)
def test_which_sizes_are_served(requested, matryoshka, served_or_message) -> None:
    if isinstance(served_or_message, int):
        assert served_dimension(requested, 384, matryoshka) == served_or_message
    else:
        with pytest.raises(UnsupportedDimensions, match=served_or_message):
            served_dimension(requested, 384, matryoshka)


def test_every_door_serves_sentence_transformers_truncate_dim(server, reference, request) -> None:
    """gRPC's dimensions, OpenAI's dimensions (the SDK), Cohere's output_dimension (the SDK)
    and TEI's dimensions all answer with sentence-transformers' truncate_dim vectors."""
    stub = server.stub()
    base = f"http://127.0.0.1:{server.running.http_port}"
    openai_client = openai.OpenAI(api_key="unused", base_url=f"{base}/v1")
    request.addfinalizer(openai_client.close)
    cohere_client = cohere.ClientV2(api_key="unused", base_url=base)
    request.addfinalizer(cohere_client._client_wrapper.httpx_client.httpx_client.close)
    full = stub.Embed(pb.EmbedRequest(texts=TEXTS))
    assert full.dimension == 384
    for size in (256, 128):
        want = reference(size)
        assert want.shape == (len(TEXTS), size)
        reply = stub.Embed(pb.EmbedRequest(texts=TEXTS, dimensions=size))
        assert reply.dimension == size
        got = {
            "grpc": np.array([list(item.values) for item in reply.embeddings]),
            "openai": np.array(
                [
                    item.embedding
                    for item in openai_client.embeddings.create(
                        model="m", input=TEXTS, dimensions=size, encoding_format="float"
                    ).data
                ]
            ),
            "cohere": np.array(
                cohere_client.embed(
                    texts=TEXTS,
                    model="m",
                    input_type="search_query",
                    output_dimension=size,
                    embedding_types=["float"],
                ).embeddings.float_
            ),
            "tei": np.array(
                httpx.post(f"{base}/embed", json={"inputs": TEXTS, "dimensions": size}).json()
            ),
        }
        for door, vectors in got.items():
            assert vectors.shape == want.shape, door
            np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
            assert (vectors * want).sum(axis=1).min() > 0.9999, door
        # The cut is not the full vector's first components alone: it is scaled back to unit
        # length, so a door that skipped either step would fail above.
        prefix = np.array([list(item.values)[:size] for item in full.embeddings])
        assert np.linalg.norm(prefix, axis=1).max() < 0.999


def test_info_lists_the_sizes(server) -> None:
    info = server.stub().Info(pb.InfoRequest()).bi_encoder
    assert list(info.matryoshka_dimensions) == [256, 128]
    assert not info.matryoshka_any_size
    body = httpx.get(f"http://127.0.0.1:{server.running.http_port}/info").json()
    assert body["bi_encoder"]["matryoshka_dimensions"] == [256, 128]


def test_a_size_the_model_was_not_trained_for_is_refused_on_every_door(server) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        server.stub().Embed(pb.EmbedRequest(texts=TEXTS, dimensions=200))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "trained to be cut to 256, 128" in refused.value.details()
    base = f"http://127.0.0.1:{server.running.http_port}"
    for path, body, field in (
        ("/v1/embeddings", {"model": "m", "input": TEXTS, "dimensions": 200}, "dimensions"),
        ("/v2/embed", {"texts": TEXTS, "output_dimension": 200}, "output_dimension"),
        ("/embed", {"inputs": TEXTS, "dimensions": 200}, "dimensions"),
        ("/v1/embeddings", {"model": "m", "input": TEXTS, "dimensions": 1024}, "dimensions"),
    ):
        reply = httpx.post(f"{base}{path}", json=body, timeout=60)
        assert reply.status_code == 400, (path, body)
        assert f"{field}={body.get(field)}" in reply.text, reply.text
