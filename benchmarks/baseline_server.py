"""The seeds' pipeline behind Tandem's proto, wrapped as simply as a user would: the baseline.

sentence-transformers on torch FP32 embeds the query, numpy brute-force cosine finds the
candidates, ``CrossEncoder.predict`` scores them, one call at a time per worker thread: no
batching across calls, no pre-tokenized documents, no budget. Only ``Search`` and ``Info``
are served. The corpus is read from a Tandem collection's store, so both servers search the
same documents; its vectors are recomputed with sentence-transformers (and cached), since
the seeds' pipeline embeds with torch.

    python -m tandem.benchmarks.baseline_server --collection artifacts/demo --port 50052
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

log = logging.getLogger("tandem.benchmarks.baseline_server")


def read_corpus(collection: Path) -> tuple[list[str], list[str]]:
    from tandem.server.engine.collection import STORE_NAME
    from tandem.server.engine.store import DocumentStore

    store = DocumentStore(collection / STORE_NAME, read_only=True)
    try:
        keys = store.keys().tolist()
        documents = store.by_keys(keys)
    finally:
        store.close()
    ordered = [documents[key] for key in keys]
    return [document.id for document in ordered], [document.text for document in ordered]


def corpus_vectors(model: Any, texts: list[str], cache: Path) -> NDArray[np.float32]:
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = cache / f"baseline-vectors-{digest}.npy"
    if path.is_file():
        return np.asarray(np.load(path), dtype=np.float32)
    started = time.perf_counter()
    vectors = np.asarray(model.encode(texts, batch_size=32, normalize_embeddings=True))
    log.info(
        "embedded %d documents with torch in %.0f s", len(texts), time.perf_counter() - started
    )
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors.astype(np.float32))
    return vectors.astype(np.float32)


class SeedPipeline(tandem_pb2_grpc.RetrievalServicer):
    def __init__(self, bi_encoder: str, reranker: str, collection: Path, cache: Path) -> None:
        import torch
        from sentence_transformers import CrossEncoder, SentenceTransformer

        # FP32 on purpose: checkpoints saved in fp16 (the stand-in is) run ~5x slower on a CPU
        # in fp16, and a baseline that slow would flatter Tandem.
        fp32 = {"torch_dtype": torch.float32}
        self.embedder = SentenceTransformer(bi_encoder, device="cpu", model_kwargs=fp32)
        self.reranker = CrossEncoder(reranker, device="cpu", model_kwargs=fp32)
        self.ids, self.texts = read_corpus(collection)
        self.vectors = corpus_vectors(self.embedder, self.texts, cache)

    def Search(  # noqa: N802 - gRPC method name
        self, request: pb.SearchRequest, context: grpc.ServicerContext
    ) -> pb.SearchResponse:
        started = time.perf_counter()
        recall_k = request.recall_k if request.HasField("recall_k") else 100
        top_n = request.top_n if request.HasField("top_n") else 5
        query = np.asarray(self.embedder.encode([request.query], normalize_embeddings=True))[0]
        similarities = self.vectors @ query
        candidates = np.argsort(-similarities)[:recall_k]
        searched = time.perf_counter()
        hits = []
        reranked = 0
        if request.mode == pb.SEARCH_MODE_RETRIEVE_ONLY:
            order = list(range(len(candidates)))
            scores = similarities[candidates]
        else:
            scores = np.asarray(
                self.reranker.predict([(request.query, self.texts[i]) for i in candidates])
            )
            order = sorted(range(len(candidates)), key=lambda i: -float(scores[i]))
            reranked = len(candidates)
        for rank in order[:top_n]:
            position = int(candidates[rank])
            hits.append(
                pb.Hit(
                    id=self.ids[position],
                    score=float(scores[rank]),
                    stage1_score=float(similarities[position]),
                    stage1_rank=rank,
                    reranked=bool(reranked),
                )
            )
        done = time.perf_counter()
        return pb.SearchResponse(
            hits=hits,
            reranked_count=reranked,
            candidates=len(candidates),
            timings=pb.Timings(
                search_ms=(searched - started) * 1000,
                rerank_ms=(done - searched) * 1000,
                total_ms=(done - started) * 1000,
            ),
        )

    def Info(  # noqa: N802
        self, request: pb.InfoRequest, context: grpc.ServicerContext
    ) -> pb.InfoResponse:
        return pb.InfoResponse(version="seed-baseline", index_size=len(self.ids))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collection", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--bi-encoder", help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--reranker", default="../shared/models/stand-in-reranker")
    parser.add_argument("--port", type=int, default=50052)
    parser.add_argument("--workers", type=int, default=4, help="gRPC worker threads")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache", type=Path, default=Path("artifacts/bench"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from tandem.benchmarks.encoders import packaged_minilm

    torch.set_num_threads(args.threads)
    pipeline = SeedPipeline(
        args.bi_encoder or packaged_minilm(), args.reranker, args.collection, args.cache
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    tandem_pb2_grpc.add_RetrievalServicer_to_server(pipeline, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    log.info("serving the seed pipeline on 127.0.0.1:%d (%d documents)", port, len(pipeline.ids))
    print(f"READY {port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(2))
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
