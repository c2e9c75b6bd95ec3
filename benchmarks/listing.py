"""`tandem bench listing`: what listing a collection a page at a time costs, and what it
costs the searches beside it.

It copies ``make demo``'s collection (6,011 RAG24 segments) with the seeded metadata of
``tandem bench filters``, then:

- **In the store**, walks every page (``DocumentStore.listed``, what Get runs) of 100 and of
  1,000 documents: all of them, under each filter (from every document passing to 4), and
  under an id prefix. Per walk: pages, ms per page (p50 and max), the whole walk and
  documents/s. Beside the unfiltered walk, the same pages read with ``LIMIT ... OFFSET``,
  as a client of an offset API (Chroma's ``get(limit, offset)``) pages: each page re-reads
  every id before it.
- **Served**, a Tandem server on the copy: ``tandem documents``' walk over gRPC (pages of
  500) timed whole, and Search (retrieve-only, dense) p50 alone and while such walks run
  back to back from another thread, alternating in rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tandem.benchmarks.encoders import machine
from tandem.benchmarks.filters import FILTERS, compiled, copy_with_metadata, percentile

WALKS: dict[str, dict[str, Any] | None] = {
    "everything": None,
    "lang en": FILTERS["lang en"],
    "tag legal": FILTERS["tag legal"],
    "year 2024": FILTERS["year 2024"],
    "1 tenant": FILTERS["1 tenant"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collection", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker", type=Path, default=Path("artifacts/cross-encoder"))
    parser.add_argument("--work", type=Path, default=Path(".cache/bench-listing"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5, help="timed walks per case (median)")
    parser.add_argument("--searches", type=int, default=60, help="Searches per served round")
    parser.add_argument("--served-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/listing.json"))
    parser.add_argument(
        "--large", type=int, default=1_000_000, help="documents in the synthetic store"
    )
    parser.add_argument("--smoke", action="store_true", help="one round, no server")


def main(args: argparse.Namespace) -> int:
    from tandem.server.engine.listing import SCAN_PER_PAGE
    from tandem.server.engine.store import DocumentStore

    folder = args.work / "collection"
    metadata = copy_with_metadata(args.collection, folder, args.seed)
    rounds = 1 if args.smoke else args.rounds
    store = DocumentStore(folder / "documents.sqlite", read_only=True)
    try:
        walks: dict[str, Any] = {}
        for limit in (100, 1000):
            for name, raw in WALKS.items():
                walks[f"{name}, {limit}"] = timed_walks(
                    store, raw, "", limit, SCAN_PER_PAGE, rounds
                )
            prefix = min(metadata)[:6]
            walks[f"id prefix {prefix!r}, {limit}"] = timed_walks(
                store, None, prefix, limit, SCAN_PER_PAGE, rounds
            )
            walks[f"OFFSET paging, {limit}"] = timed_offset_walks(store, limit, rounds)
    finally:
        store.close()
    for name, row in walks.items():
        print(
            f"{name}: {row['documents']} documents in {row['pages']} pages; page p50 "
            f"{row['page_p50_ms']:.2f} ms, max {row['page_max_ms']:.2f}; walk "
            f"{row['walk_ms']:.1f} ms ({row['documents_per_s']:.0f} documents/s)"
        )
    large = None if args.smoke else large_walks(args)
    served = None if args.smoke else served_walks(args, folder)
    report = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "collection": str(args.collection),
        "documents": len(metadata),
        "seed": args.seed,
        "scan_per_page": SCAN_PER_PAGE,
        "filters": WALKS,
        "walks": walks,
        "large": large,
        "served": served,
    }
    target = args.out.with_name("listing_smoke.json") if args.smoke else args.out
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {target}")
    return 0


def large_walks(args: argparse.Namespace) -> dict[str, Any]:
    """On a synthetic store of ``--large`` short documents, one walk each: everything by
    pages of 1,000 (ids) and by OFFSET, and one tenant's documents (a filter 1 in 1,000
    pass, so each page reads its 20,000 ids)."""
    from tandem.server.engine.listing import SCAN_PER_PAGE
    from tandem.server.engine.store import DocumentStore

    path = args.work / f"synthetic-{args.large}.sqlite"
    started = time.perf_counter()
    synthetic_store(path, args.large)
    print(
        f"synthetic store of {args.large} documents ready in {time.perf_counter() - started:.0f} s"
    )
    store = DocumentStore(path, read_only=True)
    try:
        walks = {
            "everything, 1000": timed_walks(store, None, "", 1000, SCAN_PER_PAGE, 1),
            "OFFSET paging, 1000": timed_offset_walks(store, 1000, 1),
            "1 tenant, 100": timed_walks(store, {"tenant": "t042"}, "", 100, SCAN_PER_PAGE, 1),
        }
    finally:
        store.close()
    for name, row in walks.items():
        print(f"{args.large} documents, {name}: {json.dumps(row)[:300]}")
    return {"documents": args.large, "walks": walks}


def synthetic_store(path: Path, count: int) -> None:
    """``count`` documents of 40 words, one of 1,000 tenants each; kept for the next run."""
    from tandem.server.engine.store import DocumentStore, NewDocument

    if path.exists():
        return
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    store = DocumentStore(partial)
    try:
        text = " ".join(["word"] * 40)
        for start in range(0, count, 10_000):
            batch = range(start, min(start + 10_000, count))
            store.upsert(
                [
                    NewDocument(
                        id=f"doc-{i:07d}", text=text, metadata={"tenant": f"t{i % 1000:03d}"}
                    )
                    for i in batch
                ],
                [np.ones(4, dtype=np.float32)] * len(batch),
                [np.zeros(8, dtype=np.int32)] * len(batch),
            )
    finally:
        store.close()
    partial.rename(path)


def timed_walks(
    store: Any, raw: Mapping[str, Any] | None, prefix: str, limit: int, scan: int, rounds: int
) -> dict[str, Any]:
    matching = compiled(raw) if raw else None

    def walk() -> tuple[int, list[float]]:
        listed, pages, after = 0, [], None
        while True:
            started = time.perf_counter()
            documents, after = store.listed(
                after=after, prefix=prefix, matching=matching, limit=limit, scan=scan
            )
            pages.append((time.perf_counter() - started) * 1000)
            listed += len(documents)
            if after is None:
                return listed, pages

    return summarized([walk() for _ in range(rounds)])


def timed_offset_walks(store: Any, limit: int, rounds: int) -> dict[str, Any]:
    from tandem.server.engine.store import DOCUMENT_COLUMNS, stored_document

    def walk() -> tuple[int, list[float]]:
        listed, pages = 0, []
        while True:
            started = time.perf_counter()
            rows = store.db.execute(
                f"SELECT {DOCUMENT_COLUMNS} FROM documents ORDER BY id LIMIT ? OFFSET ?",
                (limit, listed),
            ).fetchall()
            documents = [stored_document(row) for row in rows]  # as a listed page is built
            pages.append((time.perf_counter() - started) * 1000)
            listed += len(documents)
            if len(documents) < limit:
                return listed, pages

    return summarized([walk() for _ in range(rounds)])


def summarized(walks: list[tuple[int, list[float]]]) -> dict[str, Any]:
    """The walk of median length, with its pages' times."""
    ordered = sorted(walks, key=lambda walk: sum(walk[1]))
    listed, pages = ordered[len(ordered) // 2]
    total = sum(pages)
    return {
        "documents": listed,
        "pages": len(pages),
        "page_p50_ms": round(statistics.median(pages), 3),
        "page_max_ms": round(max(pages), 3),
        "walk_ms": round(total, 2),
        "documents_per_s": round(listed / (total / 1000), 1),
        "walks_ms": [round(sum(p), 2) for _, p in walks],
    }


def served_walks(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import grpc

    from tandem import rag24
    from tandem.benchmarks.serving import start_tandem
    from tandem.v1 import tandem_pb2 as pb
    from tandem.v1 import tandem_pb2_grpc

    queries = [topic.query for topic in rag24.load().topics][: args.searches]
    server = start_tandem(args, args.work / "server.log", collection=folder)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]

        def export() -> int:
            listed, token = 0, ""
            while True:
                reply = stub.Get(pb.GetRequest(limit=500, page_token=token), timeout=60)
                listed += len(reply.documents)
                token = reply.next_page_token
                if not token:
                    return listed

        def searches() -> list[float]:
            taken = []
            for query in queries:
                reply = stub.Search(
                    pb.SearchRequest(
                        query=query,
                        mode=pb.SEARCH_MODE_RETRIEVE_ONLY,
                        first_stage=pb.FIRST_STAGE_DENSE,
                    ),
                    timeout=60,
                )
                taken.append(reply.timings.total_ms)
            return taken

        searches()  # warm: the query path, the store's pages
        exports: list[float] = []
        alone: list[float] = []
        beside: list[float] = []
        for _ in range(args.served_rounds):
            started = time.perf_counter()
            listed = export()
            exports.append(time.perf_counter() - started)
            alone.extend(searches())
            beside.extend(while_running(export, searches))
        channel.close()
    finally:
        server.stop()
    result = {
        "documents": listed,
        "export_s": [round(seconds, 3) for seconds in exports],
        "export_documents_per_s": round(listed / statistics.median(exports), 1),
        "search_p50_ms": {
            "alone": round(percentile(alone, 0.5), 3),
            "beside_exports": round(percentile(beside, 0.5), 3),
        },
        "search_p95_ms": {
            "alone": round(percentile(alone, 0.95), 3),
            "beside_exports": round(percentile(beside, 0.95), 3),
        },
    }
    print(json.dumps(result, indent=2))
    return result


def while_running(background: Callable[[], object], measured: Callable[[], list[float]]) -> Any:
    """``measured()`` while ``background`` runs back to back on another thread."""
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            background()

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        return measured()
    finally:
        done.set()
        worker.join()
