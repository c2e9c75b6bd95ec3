"""Long documents at index time, on real weights: stored once, embedded as passages, found by
the best one; replaced, deleted, repaired, published and killed mid-upsert as a whole.

A "20-page document" is some 9,000 words of RAG24 passages judged for other topics, with one
passage judged perfectly relevant to a topic placed two thirds of the way in. Its first
window (what a single vector reads) holds none of it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving import ServerProcess, document, model_args
from tokenizers import Tokenizer

from tandem.encoders import BiEncoder
from tandem.server.engine.collection import Collection, CollectionError
from tandem.server.engine.fusion import FirstStage
from tandem.server.engine.index import IndexSettings
from tandem.server.engine.search import Mode, Searcher
from tandem.server.engine.store import DocumentStore, NewDocument, document_keys
from tandem.server.replication.publish import current_version, publish, version_folder
from tandem.v1 import tandem_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PAGE_WORDS = 450
PAGES = 20
OTHERS = 200  # short documents beside the long ones


@dataclass(frozen=True)
class LongDocument:
    query: str
    text: str


@pytest.fixture(scope="module")
def embedder(bi_int8) -> BiEncoder:
    return BiEncoder(bi_int8[0])


@pytest.fixture(scope="module")
def corpus(data) -> tuple[list[LongDocument], list[str]]:
    """Six 20-page documents, each with its own topic's needle and its own hay, and
    ``OTHERS`` short passages judged for none of those topics."""
    texts = {segment.id: segment.text for segment in data.segments}
    needles = []
    for topic in data.topics:
        best = [sid for sid, grade in data.umbrela.get(topic.id, {}).items() if grade == 3]
        if best and best[0] in texts:
            needles.append((topic, texts[best[0]]))
    needles = needles[:6]
    assert len(needles) == 6, "RAG24 holds six topics with a perfectly relevant passage"
    near = {sid for topic, _ in needles for sid in data.umbrela.get(topic.id, {})}
    judged = {sid for grades in data.umbrela.values() for sid in grades}
    hay = iter(s.text for s in data.segments if s.id in judged and s.id not in near)
    documents = []
    for topic, needle in needles:
        before = _words(hay, PAGES * PAGE_WORDS * 2 // 3)
        after = _words(hay, PAGES * PAGE_WORDS // 3)
        documents.append(LongDocument(topic.query, f"{before}\n\n{needle}\n\n{after}"))
    others = [next(hay) for _ in range(OTHERS)]
    return documents, others


def _words(segments, count: int) -> str:
    parts: list[str] = []
    while sum(len(part.split()) for part in parts) < count:
        parts.append(next(segments))
    return "\n\n".join(parts)


def expected_passages(bi_int8, text: str, settings: IndexSettings) -> int:
    """Counted apart from the server: full-width windows (the model's length less its
    special tokens), each starting ``passage_overlap`` tokens before the previous one ends
    and the last ending at the text's end, capped."""
    tokenizer = Tokenizer.from_file(str(bi_int8[0] / "tokenizer.json"))
    tokenizer.no_truncation()
    length = len(tokenizer.encode(text, add_special_tokens=False).ids)
    width = bi_int8[1].max_length - 2  # [CLS] and [SEP]
    if length <= width:
        return 1
    return min(1 + math.ceil((length - width) / (width - settings.passage_overlap)),
               settings.max_passages)  # fmt: skip


def open_collection(folder: Path, embedder: BiEncoder, **settings: int) -> Collection:
    return Collection(folder, embedder=embedder, pairs=None, settings=settings)


def nearest_ids(collection: Collection, embedder: BiEncoder, query: str, count: int) -> list[str]:
    hits = collection.index.search_documents(embedder.embed([query])[0], count)
    found = collection.store.by_keys(hits.keys.tolist())
    return [found[int(key)].id for key in hits.keys]


def test_passages_are_the_tokenizers_windows_and_the_first_is_the_plain_vector(
    embedder, bi_int8, corpus
) -> None:
    (long, *_), others = corpus
    settings = IndexSettings()
    short = min(others, key=len)
    embedded = embedder.encode_passages(
        [short], max_passages=settings.max_passages, overlap=settings.passage_overlap
    )
    assert embedded.passages[0].shape == (1, embedder.dimension)
    assert np.array_equal(embedded.passages[0][0], embedder.embed([short])[0])
    embedded = embedder.encode_passages(
        [long.text], max_passages=settings.max_passages, overlap=settings.passage_overlap
    )
    count = expected_passages(bi_int8, long.text, settings)
    assert 40 <= count < settings.max_passages  # 20 pages fit the default cap
    assert embedded.passages[0].shape == (count, embedder.dimension)
    assert not embedded.truncated[0]
    norms = np.linalg.norm(embedded.passages[0], axis=1)
    assert np.allclose(norms, 1.0, atol=1e-3)
    capped = embedder.encode_passages([long.text], max_passages=5, overlap=32)
    assert capped.passages[0].shape == (5, embedder.dimension)
    assert capped.truncated[0]
    assert np.allclose(capped.passages[0], embedded.passages[0][:5], atol=0.05)


def test_a_long_document_is_found_by_its_best_passage_and_missed_by_its_first(
    tmp_path, embedder, corpus
) -> None:
    (long, *_), others = corpus
    ranks = {}
    for max_passages in (64, 1):
        collection = open_collection(tmp_path / str(max_passages), embedder,
                                     max_passages=max_passages)  # fmt: skip
        try:
            collection.upsert([NewDocument("long", long.text)])
            collection.upsert([NewDocument(f"o{i}", text) for i, text in enumerate(others)])
            ids = nearest_ids(collection, embedder, long.query, 100)
            assert len(ids) == len(set(ids)) == 100  # each document once
            ranks[max_passages] = ids.index("long") if "long" in ids else None
            assert collection.index.documents == len(collection.store) == OTHERS + 1
        finally:
            collection.close()
    assert ranks[64] == 0
    assert ranks[1] is None or ranks[1] >= 10, ranks


def test_replace_and_delete_take_every_passage(tmp_path, embedder, bi_int8, corpus) -> None:
    (first, second, *_), others = corpus
    settings = IndexSettings()
    collection = open_collection(tmp_path / "c", embedder)
    try:
        collection.upsert([NewDocument(f"o{i}", text) for i, text in enumerate(others[:50])])
        base = len(collection.index)
        collection.upsert([NewDocument("long", first.text)])
        assert len(collection.index) == base + expected_passages(bi_int8, first.text, settings)
        collection.upsert([NewDocument("long", second.text)])  # replaced: new passages only
        assert len(collection.index) == base + expected_passages(bi_int8, second.text, settings)
        assert nearest_ids(collection, embedder, second.query, 1) == ["long"]
        assert "long" not in nearest_ids(collection, embedder, first.query, 5)
        collection.delete(["long"])
        assert len(collection.index) == base
        assert collection.index.documents == 50
        assert "long" not in nearest_ids(collection, embedder, second.query, 50)
    finally:
        collection.close()


def test_every_passage_is_repaired_from_the_store(tmp_path, embedder, corpus) -> None:
    documents, others = corpus
    folder = tmp_path / "c"
    collection = open_collection(folder, embedder)
    collection.upsert([NewDocument(f"o{i}", text) for i, text in enumerate(others[:50])])
    collection.checkpoint()
    collection.upsert([NewDocument("long0", documents[0].text)])
    collection.close()  # died before saving the index: the store has passages it does not
    collection = open_collection(folder, embedder)
    try:
        count = collection.store.vector_count(embedder.dimension)
        assert len(collection.index) == count > 51
        assert nearest_ids(collection, embedder, documents[0].query, 1) == ["long0"]
    finally:
        collection.close()
    (folder / "vectors.usearch").write_bytes(b"damaged")
    collection = open_collection(folder, embedder)
    try:
        assert len(collection.index) == count  # rebuilt, every passage
        keys = collection.index.keys()
        assert set(document_keys(keys).tolist()) == set(collection.store.keys().tolist())
        assert nearest_ids(collection, embedder, documents[0].query, 1) == ["long0"]
    finally:
        collection.close()


def test_a_replica_serves_every_passage_of_a_published_version(tmp_path, embedder, corpus):
    documents, others = corpus
    writer, root = tmp_path / "writer", tmp_path / "root"
    collection = open_collection(writer, embedder)
    try:
        collection.upsert([NewDocument(f"o{i}", text) for i, text in enumerate(others[:50])])
        collection.upsert([NewDocument("long1", documents[1].text)])
        collection.checkpoint()
        vectors = len(collection.index)
    finally:
        collection.close()
    publish(writer, root)
    version = current_version(root)
    replica = Collection(
        version_folder(root, version), embedder=embedder, pairs=None, read_only=True,
        version=version,
    )  # fmt: skip
    try:
        assert len(replica.index) == vectors > 51
        assert nearest_ids(replica, embedder, documents[1].query, 1) == ["long1"]
    finally:
        replica.close()


def test_filters_and_both_first_stages_see_documents_not_passages(
    tmp_path, embedder, corpus
) -> None:
    documents, others = corpus
    collection = open_collection(tmp_path / "c", embedder)
    collection.upsert(
        [
            NewDocument(f"o{i}", text, {"half": i % 2, "few": i < 10})
            for i, text in enumerate(others)
        ]
        + [
            NewDocument(f"long{i}", d.text, {"half": 1, "few": True})
            for i, d in enumerate(documents)
        ]
    )
    searcher = Searcher(collection, embedder=embedder, reranker=None, pairs=None, batcher=None)

    async def search(**fields):
        return await searcher.search(documents[2].query, mode=Mode.RETRIEVE_ONLY, **fields)

    try:
        for fields in (
            {"first_stage": FirstStage.DENSE},
            {"first_stage": FirstStage.HYBRID},
            {"first_stage": FirstStage.DENSE, "metadata_filter": {"half": 1}},  # in the graph
            {"first_stage": FirstStage.HYBRID, "metadata_filter": {"half": 1}},
            {"first_stage": FirstStage.DENSE, "metadata_filter": {"few": True}},  # exact
            {"first_stage": FirstStage.HYBRID, "metadata_filter": {"few": True}},
        ):
            result = asyncio.run(search(recall_k=50, top_n=50, **fields))
            ids = [hit.id for hit in result.hits]
            assert len(ids) == len(set(ids)), fields
            assert ids[0] == "long2", fields
            if fields.get("metadata_filter") == {"few": True}:
                assert result.filter_matched == 10 + len(documents)
                assert len(ids) == 10 + len(documents)
    finally:
        collection.close()


def test_settings_are_the_collections_own(tmp_path, embedder) -> None:
    open_collection(tmp_path / "c", embedder, max_passages=8).close()
    with pytest.raises(CollectionError, match="max_passages=16"):
        open_collection(tmp_path / "c", embedder, max_passages=16)
    with pytest.raises(CollectionError, match="max_passages must be at least 1"):
        open_collection(tmp_path / "d", embedder, max_passages=0)


def test_twenty_pages_through_upsert_search_get_and_delete(tmp_path, bi_int8, ce_int8, corpus):
    documents, others = corpus
    long = documents[3]
    server = ServerProcess("--collection", str(tmp_path / "c"), *model_args(bi_int8, ce_int8))
    try:
        stub = server.stub()
        stub.Upsert(iter([pb.UpsertRequest(documents=[
            document(f"o{i}", text) for i, text in enumerate(others)
        ])]), timeout=300)  # fmt: skip
        before = stub.Info(pb.InfoRequest(), timeout=30)
        reply = stub.Upsert(iter([pb.UpsertRequest(documents=[document("long", long.text)])]),
                            timeout=300)  # fmt: skip
        assert (reply.inserted, reply.truncated) == (1, 0)
        info = stub.Info(pb.InfoRequest(), timeout=30)
        passages = expected_passages(bi_int8, long.text, IndexSettings())
        assert info.index_size == before.index_size + 1
        assert info.index_vectors == before.index_vectors + passages
        assert info.limits.max_passages_per_doc == 64
        assert info.limits.passage_overlap_tokens == 32
        for stage in (pb.FIRST_STAGE_DENSE, pb.FIRST_STAGE_HYBRID):
            reply = stub.Search(pb.SearchRequest(query=long.query, top_n=10, recall_k=50,
                                                 first_stage=stage,
                                                 mode=pb.SEARCH_MODE_RETRIEVE_ONLY),
                                timeout=60)  # fmt: skip
            ids = [hit.id for hit in reply.hits]
            assert ids[0] == "long"
            assert ids.count("long") == 1
        reply = stub.Search(pb.SearchRequest(query=long.query, top_n=3, recall_k=3,
                                             include_text=True, rerank_budget_ms=0),
                            timeout=300)  # fmt: skip
        (hit,) = [hit for hit in reply.hits if hit.id == "long"]
        assert hit.text == long.text
        assert hit.passage.windows == 10  # the reranker reads it in windows too (default)
        (stored,) = stub.Get(pb.GetRequest(ids=["long"]), timeout=30).documents
        assert stored.text == long.text
        assert stub.Delete(pb.DeleteRequest(ids=["long"]), timeout=30).deleted == 1
        info = stub.Info(pb.InfoRequest(), timeout=30)
        assert (info.index_size, info.index_vectors) == (before.index_size, before.index_vectors)
        reply = stub.Search(
            pb.SearchRequest(
                query=long.query, top_n=50, recall_k=50, mode=pb.SEARCH_MODE_RETRIEVE_ONLY
            ),
            timeout=60,
        )
        assert "long" not in [hit.id for hit in reply.hits]
    finally:
        server.finish()


def test_truncate_off_refuses_a_document_past_the_passage_cap(tmp_path, bi_int8, corpus):
    long = corpus[0][0]
    server = ServerProcess("--collection", str(tmp_path / "c"), "--bi-encoder",
                           str(bi_int8[0]), "--reranker", "none",
                           "--max-passages-per-doc", "4")  # fmt: skip
    try:
        stub = server.stub()
        message = pb.UpsertRequest(documents=[document("long", long.text)], truncate=False)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Upsert(iter([message]), timeout=120)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "4 passages of 256 tokens" in refused.value.details()
        reply = stub.Upsert(iter([pb.UpsertRequest(documents=[document("long", long.text)])]),
                            timeout=120)  # fmt: skip
        assert reply.truncated == 1
        assert stub.Info(pb.InfoRequest(), timeout=30).index_vectors == 4
    finally:
        server.finish()


def test_kill_9_during_twenty_page_upserts_keeps_every_acknowledged_passage(
    tmp_path, bi_int8, ce_int8, corpus
):
    documents, _ = corpus
    folder = tmp_path / "c"
    sent = {f"long{i}": d for i, d in enumerate(documents)}
    server = ServerProcess("--collection", str(folder), *model_args(bi_int8, ce_int8))
    acknowledged: list[str] = []

    def stream() -> None:
        stub = server.stub()
        names = list(sent)
        for start in range(0, len(names), 2):  # calls of two messages of one document
            call = names[start : start + 2]
            messages = [pb.UpsertRequest(documents=[document(n, sent[n].text)]) for n in call]
            try:
                stub.Upsert(iter(messages), timeout=300)
            except grpc.RpcError:
                return  # the server died under this call: not acknowledged
            acknowledged.extend(call)

    writer = threading.Thread(target=stream)
    writer.start()
    deadline = time.monotonic() + 600
    while len(acknowledged) < 2 and time.monotonic() < deadline and writer.is_alive():
        time.sleep(0.05)
    time.sleep(1.0)  # into the next call: its first document embedded or being embedded
    server.process.kill()  # SIGKILL
    writer.join(timeout=120)
    server.finish()
    assert 2 <= len(acknowledged) < len(sent), "the kill must land mid-stream"

    restarted = ServerProcess("--collection", str(folder), *model_args(bi_int8, ce_int8))
    try:
        stub = restarted.stub()
        found = {d.id: d for d in stub.Get(pb.GetRequest(ids=list(sent)), timeout=60).documents}
        assert set(acknowledged) <= set(found)
        info = stub.Info(pb.InfoRequest(), timeout=30)
        assert info.index_size == len(found) == info.lexical_index_size
        settings = IndexSettings()
        wanted = sum(expected_passages(bi_int8, sent[name].text, settings) for name in found)
        assert info.index_vectors == wanted  # every passage of each, and no other
        for name, stored in found.items():  # whole or absent, never half
            assert stored.text == sent[name].text
            reply = stub.Search(
                pb.SearchRequest(
                    query=sent[name].query,
                    top_n=1,
                    first_stage=pb.FIRST_STAGE_DENSE,
                    mode=pb.SEARCH_MODE_RETRIEVE_ONLY,
                ),
                timeout=60,
            )
            assert reply.hits[0].id == name
    finally:
        restarted.finish()
    store = DocumentStore(folder / "documents.sqlite", read_only=True)
    try:
        assert store.vector_count(384) == wanted
    finally:
        store.close()
