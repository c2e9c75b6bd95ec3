"""`tandem search`: a command-line client for a running server (and an example of the API)."""

from __future__ import annotations

import argparse
import sys

import grpc

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc

MODES = {"two-stage": pb.SEARCH_MODE_TWO_STAGE, "retrieve-only": pb.SEARCH_MODE_RETRIEVE_ONLY}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="+", help="the question")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--recall-k", type=int, default=100)
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--mode", choices=sorted(MODES), help="default: the server's")
    parser.add_argument("--budget-ms", type=int, help="rerank budget; 0 for none")
    parser.add_argument("--token", help="bearer token, if the server wants one")
    parser.add_argument("--tls-ca", help="PEM file to trust (turns TLS on)")


def run(args: argparse.Namespace) -> int:
    if args.tls_ca:
        with open(args.tls_ca, "rb") as handle:
            credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
        channel = grpc.secure_channel(args.address, credentials)
    else:
        channel = grpc.insecure_channel(args.address)
    request = pb.SearchRequest(
        query=" ".join(args.query),
        recall_k=args.recall_k,
        top_n=args.top_n,
        include_text=True,
        mode=MODES.get(args.mode, pb.SEARCH_MODE_UNSPECIFIED),
    )
    if args.budget_ms is not None:
        request.rerank_budget_ms = args.budget_ms
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    with channel:
        try:
            stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]
            reply = stub.Search(request, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            print(f"tandem search: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    timings = reply.timings
    print(
        f"{len(reply.hits)} hits; {reply.reranked_count}/{reply.candidates} candidates reranked; "
        f"{timings.total_ms:.1f} ms (embed {timings.embed_ms:.1f}, search {timings.search_ms:.1f}, "
        f"queue {timings.queue_ms:.1f}, rerank {timings.rerank_ms:.1f})"
    )
    for hit in reply.hits:
        kind = "rerank" if hit.reranked else "cosine"
        print(f"{hit.score:8.3f} {kind}  #{hit.stage1_rank:<3} {hit.id}")
        print(f"         {hit.text[:200]}")
    return 0
