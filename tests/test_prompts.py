"""Bi-encoder prompts: exported from the checkpoint, applied as sentence-transformers applies
them (encode_query, encode_document, Pooling's include_prompt), and chosen per call."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import cohere
import grpc
import httpx
import numpy as np
import openai
import pytest
from serving import ServerThread, document, settings_for, upsert

from tandem.artifact import (
    ArtifactError,
    Manifest,
    Prompts,
    UnknownPrompt,
    read_manifest,
    write_manifest,
)
from tandem.encoders import BiEncoder
from tandem.export.errors import InvalidSource, UnsupportedModel
from tandem.export.pipeline import ExportRequest, export_model
from tandem.export.source import resolve, sentence_transformers_pooling
from tandem.export.verify import Sample
from tandem.server.engine.collection import Collection, CollectionError
from tandem.server.engine.index import IndexSettings
from tandem.server.engine.search import Searcher
from tandem.server.engine.store import NewDocument
from tandem.v1 import tandem_pb2 as pb

# Shaped like nomic-embed's: a query prompt, a document prompt, and a task prompt only a
# caller names. (A document prompt named "passage" is resolved in a unit test below:
# sentence-transformers 5.7 puts an empty "document" placeholder into every model, so its
# encode_document never reaches that name.)
PROMPTS = {"query": "query: ", "document": "passage: ", "clustering": "cluster these texts: "}
QUERIES = ["what causes the northern lights", "how do vaccines train the immune system"]


def _checkpoint_with(
    source: Path, target: Path, *, prompts: dict[str, str], include_prompt: bool = True
) -> Path:
    """A copy of a real checkpoint whose sentence-transformers files set these prompts."""
    shutil.copytree(source, target)
    config_path = target / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["prompts"] = prompts
    config_path.write_text(json.dumps(config))
    pooling_path = target / "1_Pooling" / "config.json"
    pooling = json.loads(pooling_path.read_text())
    pooling["include_prompt"] = include_prompt
    pooling_path.write_text(json.dumps(pooling))
    return target


@pytest.fixture(scope="module")
def prompted(tmp_path_factory, minilm_path, data) -> tuple[Path, Path]:
    """(checkpoint, FP32 artifact) of all-MiniLM-L6-v2 with PROMPTS: FP32, so that any gap to
    sentence-transformers is the prompts' handling, not quantization."""
    root = tmp_path_factory.mktemp("prompted")
    checkpoint = _checkpoint_with(minilm_path, root / "checkpoint", prompts=PROMPTS)
    out = root / "artifact"
    export_model(
        ExportRequest(
            kind="bi-encoder", model=str(checkpoint), out=out, precision="fp32",
            runtime="onnxruntime", sample=Sample(texts=32, queries=2, candidates=10),
        ),
        data,
    )  # fmt: skip
    return checkpoint, out


@pytest.fixture(scope="module")
def sentence_transformer(prompted):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(prompted[0]), device="cpu")


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    return np.asarray((got * want).sum(axis=1))


def test_export_records_the_checkpoints_prompts_and_verifies_with_them(prompted) -> None:
    manifest = read_manifest(prompted[1])
    assert manifest.prompts == Prompts(texts=PROMPTS, default_name=None)
    assert manifest.verified
    assert manifest.prompts.chosen_names() == {
        "default_prompt_name": "",
        "query_prompt_name": "query",
        "document_prompt_name": "document",
    }


def test_vectors_match_encode_query_and_encode_document(prompted, sentence_transformer, data):
    encoder = BiEncoder(prompted[1])
    documents = [segment.text for segment in data.segments[:8]]
    for texts, role, reference in (
        (QUERIES, "query", sentence_transformer.encode_query),
        (documents, "document", sentence_transformer.encode_document),
    ):
        got = encoder.embed(texts, prompt=encoder.prompt(role=role))
        assert cosines(got, reference(texts)).min() > 0.9999
        # The prompt changes the vector, so a door that dropped it would fail the line above.
        bare = encoder.embed(texts, prompt="")
        assert cosines(bare, reference(texts)).min() < 0.99
    clustered = encoder.embed(QUERIES, prompt=encoder.prompt("clustering"))
    want = sentence_transformer.encode(QUERIES, prompt_name="clustering")
    assert cosines(clustered, want).min() > 0.9999


def test_pooling_without_the_prompt_matches_include_prompt_false(
    tmp_path, prompted, minilm_path
) -> None:
    """sentence-transformers' Pooling(include_prompt=False) leaves the prompt's tokens (and
    [CLS]) out of the mean; the model still reads them."""
    from sentence_transformers import SentenceTransformer

    checkpoint = _checkpoint_with(
        minilm_path, tmp_path / "checkpoint", prompts=PROMPTS, include_prompt=False
    )
    assert not sentence_transformers_pooling(resolve(str(checkpoint))).include_prompt
    artifact = tmp_path / "artifact"
    shutil.copytree(prompted[1], artifact)
    manifest = read_manifest(artifact)
    assert manifest.pooling is not None
    pooling = replace(manifest.pooling, include_prompt=False)
    write_manifest(artifact, replace(manifest, pooling=pooling))
    encoder = BiEncoder(artifact)
    reference = SentenceTransformer(str(checkpoint), device="cpu")
    got = encoder.embed(QUERIES, prompt=encoder.prompt(role="query"))
    assert cosines(got, reference.encode_query(QUERIES)).min() > 0.9999
    pooled_with_prompt = BiEncoder(prompted[1]).embed(QUERIES, prompt="query: ")
    assert cosines(pooled_with_prompt, reference.encode_query(QUERIES)).min() < 0.999


def test_a_prompt_takes_its_tokens_from_each_passage_window(prompted) -> None:
    """A document's passages are cut to the model's length less the prompt's, so the prompt
    never pushes a window's end past what the model reads."""
    encoder = BiEncoder(prompted[1])
    prompt = encoder.prompt(role="document")
    room = encoder.width - len(encoder.whole.encode(prompt, add_special_tokens=False).ids)
    words = " ".join(f"word{index % 10}" for index in range(2000))
    ids = encoder.whole.encode(words, add_special_tokens=False)
    for tokens, windows in ((room, 1), (room + 1, 2)):
        text = words[: ids.offsets[tokens - 1][1]]
        embedded = encoder.encode_passages([text], max_passages=4, overlap=0, prompt=prompt)
        assert len(embedded.passages[0]) == windows
        assert not embedded.truncated[0]
    fits = words[: ids.offsets[room - 1][1]]
    assert not encoder.tokenize([fits], prompt=prompt).truncated[0]


def test_search_and_upsert_embed_with_the_query_and_document_prompts(tmp_path, prompted):
    encoder = BiEncoder(prompted[1])
    collection = Collection(tmp_path / "c", embedder=encoder, pairs=None, settings=IndexSettings())
    try:
        text = "Auroras happen when charged solar particles meet the upper atmosphere."
        prepared = collection.prepare([NewDocument(id="a", text=text)])
        want = encoder.embed([text], prompt="passage: ")
        np.testing.assert_allclose(prepared.vectors[0], want, atol=1e-6)
        searcher = Searcher(collection, embedder=encoder, reranker=None, pairs=None, batcher=None)
        vector, _ = searcher.embed_query(QUERIES[0])
        np.testing.assert_allclose(
            vector, encoder.embed(QUERIES[:1], prompt="query: ")[0], atol=1e-6
        )
    finally:
        collection.close()


def test_a_collection_refuses_a_bi_encoder_with_another_document_prompt(tmp_path, prompted):
    folder = tmp_path / "collection"
    Collection(folder, embedder=BiEncoder(prompted[1]), pairs=None).close()
    altered = tmp_path / "altered"
    shutil.copytree(prompted[1], altered)
    manifest = read_manifest(altered)
    texts = {**PROMPTS, "document": "document: "}
    write_manifest(altered, replace(manifest, prompts=Prompts(texts=texts)))
    with pytest.raises(CollectionError, match="another document prompt"):
        Collection(folder, embedder=BiEncoder(altered), pairs=None)
    # A query prompt is not stored in the vectors: changing it keeps the collection usable.
    texts = {**PROMPTS, "query": "question: "}
    write_manifest(altered, replace(manifest, prompts=Prompts(texts=texts)))
    Collection(folder, embedder=BiEncoder(altered), pairs=None).close()


def test_a_prompt_that_leaves_no_room_for_text_is_refused(tmp_path, prompted) -> None:
    altered = tmp_path / "altered"
    shutil.copytree(prompted[1], altered)
    manifest = read_manifest(altered)
    long_prompt = "instruction " * manifest.max_length
    prompts = Prompts(texts={"query": long_prompt})
    write_manifest(altered, replace(manifest, prompts=prompts))
    with pytest.raises(ArtifactError, match="leaving none for the text"):
        BiEncoder(altered)


@pytest.fixture(scope="module")
def server(tmp_path_factory, prompted, data):
    settings = settings_for(tmp_path_factory.mktemp("collection"), prompted[1], None)
    running = ServerThread(settings)
    upsert(running.stub(), [document(s.id, s.text) for s in data.segments[:20]])
    yield running
    running.stop()


def test_every_door_picks_the_prompt_its_caller_means(server, prompted, request) -> None:
    """gRPC's input_type and prompt_name, Cohere's input_type, TEI's prompt_name and
    Voyage's/NIM's input_type on the OpenAI path all reach the same prompts."""
    stub = server.stub()
    encoder = BiEncoder(prompted[1])
    want = {
        "query": encoder.embed(QUERIES, prompt="query: "),
        "document": encoder.embed(QUERIES, prompt="passage: "),
        "clustering": encoder.embed(QUERIES, prompt="cluster these texts: "),
        "none": encoder.embed(QUERIES, prompt=""),
    }

    def grpc_embed(**fields: object) -> np.ndarray:
        reply = stub.Embed(pb.EmbedRequest(texts=QUERIES, **fields))  # type: ignore[arg-type]
        return np.array([list(item.values) for item in reply.embeddings])

    got = {
        "query": grpc_embed(input_type=pb.INPUT_TYPE_QUERY),
        "document": grpc_embed(input_type=pb.INPUT_TYPE_DOCUMENT),
        "clustering": grpc_embed(input_type=pb.INPUT_TYPE_QUERY, prompt_name="clustering"),
        "none": grpc_embed(),  # no default prompt: encode's input is the bare text
    }
    base = f"http://127.0.0.1:{server.running.http_port}"
    client = cohere.ClientV2(api_key="unused", base_url=base)
    request.addfinalizer(client._client_wrapper.httpx_client.httpx_client.close)
    cohere_types = {
        "search_query": "query",
        "search_document": "document",
        "clustering": "clustering",
        "classification": "none",  # no prompt of that name, and no default
    }
    for input_type, meant in cohere_types.items():
        reply = client.embed(
            texts=QUERIES, model="m", input_type=input_type, embedding_types=["float"]
        )
        np.testing.assert_allclose(reply.embeddings.float_, want[meant], atol=1e-5)
    tei = httpx.post(f"{base}/embed", json={"inputs": QUERIES, "prompt_name": "query"}, timeout=60)
    np.testing.assert_allclose(tei.json(), want["query"], atol=1e-5)
    openai_client = openai.OpenAI(api_key="unused", base_url=f"{base}/v1")
    request.addfinalizer(openai_client.close)
    for input_type, meant in (("query", "query"), ("passage", "document")):
        reply = openai_client.embeddings.create(
            model="m", input=QUERIES, encoding_format="float", extra_body={"input_type": input_type}
        )
        np.testing.assert_allclose([item.embedding for item in reply.data], want[meant], atol=1e-5)
    # Jina's task: a prompt of the task's name first (jina-embeddings-v3 names its prompts
    # so; "clustering" stands in for one here), else retrieval.* pick a role, else default.
    for task, meant in (
        ("retrieval.query", "query"),
        ("retrieval.passage", "document"),
        ("clustering", "clustering"),
        ("text-matching", "none"),
    ):
        reply = httpx.post(
            f"{base}/v1/embeddings", json={"model": "jina-embeddings-v3", "input": QUERIES,
                                          "task": task}, timeout=60,
        )  # fmt: skip
        got_task = [item["embedding"] for item in reply.json()["data"]]
        np.testing.assert_allclose(got_task, want[meant], atol=1e-5, err_msg=task)
    for name, vectors in got.items():
        np.testing.assert_allclose(vectors, want[name], atol=1e-5)
    info = stub.Info(pb.InfoRequest()).bi_encoder
    assert dict(info.prompts) == PROMPTS
    assert (info.query_prompt_name, info.document_prompt_name) == ("query", "document")


def test_an_unknown_prompt_name_is_a_clear_refusal(server) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        server.stub().Embed(pb.EmbedRequest(texts=QUERIES, prompt_name="summary"))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "clustering, document, query" in refused.value.details()
    base = f"http://127.0.0.1:{server.running.http_port}"
    tei = httpx.post(f"{base}/embed", json={"inputs": QUERIES, "prompt_name": "x"}, timeout=60)
    assert tei.status_code == 400
    assert "not one of this bi-encoder's prompts" in tei.text
    cohere_reply = httpx.post(
        f"{base}/v2/embed", json={"texts": QUERIES, "input_type": "image"}, timeout=60
    )
    assert cohere_reply.status_code == 400
    assert "search_query" in cohere_reply.text


@pytest.mark.parametrize(
    ("texts", "default", "name", "role", "chosen"),
    [
        ({"query": "q: ", "passage": "p: "}, None, None, "query", "query"),
        ({"query": "q: ", "passage": "p: "}, None, None, "document", "passage"),
        ({"document": "d: ", "corpus": "c: "}, None, None, "document", "document"),
        ({"corpus": "c: "}, None, None, "document", "corpus"),
        ({"query": "q: "}, None, None, "document", None),
        ({"query": "q: ", "s2s": "s: "}, "s2s", None, "document", "s2s"),
        ({"query": "q: ", "s2s": "s: "}, "s2s", None, None, "s2s"),
        ({"query": "q: ", "s2s": "s: "}, "s2s", "query", "document", "query"),
        ({}, None, None, "query", None),
    ],
)
def test_prompts_resolve_as_sentence_transformers_picks_them(
    texts, default, name, role, chosen
) -> None:
    assert Prompts(texts=texts, default_name=default).resolve(name, role=role) == chosen


def test_unknown_names_say_which_exist() -> None:
    with pytest.raises(UnknownPrompt, match="carries no prompts"):
        Prompts().resolve("query")
    with pytest.raises(UnknownPrompt, match=r"\(passage, query\)"):
        Prompts(texts={"query": "q", "passage": "p"}).resolve("doc")


def test_manifests_round_trip_prompts_and_read_old_ones_as_none(prompted) -> None:
    manifest = read_manifest(prompted[1])
    assert Manifest.from_json(manifest.to_json()) == manifest
    raw = json.loads(manifest.to_json())
    del raw["prompts"]
    del raw["pooling"]["include_prompt"]
    old = Manifest.from_json(json.dumps(raw))
    assert old.prompts == Prompts()
    assert old.pooling is not None
    assert old.pooling.include_prompt


def test_export_lays_flags_over_the_checkpoints_prompts(tmp_path, minilm_path) -> None:
    from tandem.export.source import sentence_transformers_prompts

    checkpoint = _checkpoint_with(minilm_path, tmp_path / "c", prompts={"query": "q: "})
    source = resolve(str(checkpoint))
    prompts = sentence_transformers_prompts(source, {"document": "d: "}, "document")
    assert prompts == Prompts(texts={"query": "q: ", "document": "d: "}, default_name="document")
    with pytest.raises(InvalidSource, match="--prompt summary=TEXT"):
        sentence_transformers_prompts(source, {}, "summary")


def test_modules_tandem_cannot_reproduce_are_refused(tmp_path, minilm_path) -> None:
    checkpoint = tmp_path / "dense"
    shutil.copytree(minilm_path, checkpoint)
    modules = json.loads((checkpoint / "modules.json").read_text())
    modules.append(
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (checkpoint / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModel, match="Dense"):
        sentence_transformers_pooling(resolve(str(checkpoint)))
