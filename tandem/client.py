"""`tandem search`: a command-line client for a running server (and an example of the API).

It sends only what the user set, so the server's own defaults (recall_k, top_n, budget, mode)
apply to the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

MODES = {"two-stage": "SEARCH_MODE_TWO_STAGE", "retrieve-only": "SEARCH_MODE_RETRIEVE_ONLY"}
FIRST_STAGES = {
    "dense": "FIRST_STAGE_DENSE",
    "lexical": "FIRST_STAGE_LEXICAL",
    "hybrid": "FIRST_STAGE_HYBRID",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="+", help="the question")
    add_connection_arguments(parser)
    parser.add_argument("--recall-k", type=int, help="candidates from the index (server default)")
    parser.add_argument("--top-n", type=int, help="hits returned (server default)")
    parser.add_argument("--mode", choices=sorted(MODES), help="default: the server's")
    parser.add_argument(
        "--first-stage", choices=sorted(FIRST_STAGES), help="candidates from; default: the server's"
    )
    parser.add_argument("--budget-ms", type=int, help="rerank budget; 0 for none (server default)")
    parser.add_argument(
        "--filter",
        type=filter_json,
        help='metadata filter as JSON: \'{"lang": "en", "year": {"$gte": 2020}}\' (README: '
        '"Metadata filters")',
    )


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument(
        "--token", help="bearer token, if the server wants one (default: env TANDEM_TOKEN)"
    )
    parser.add_argument("--tls-ca", help="PEM file to trust (turns TLS on)")


def search_request(args: argparse.Namespace) -> Any:
    """The SearchRequest for ``args``: only the fields the user set."""
    from tandem.v1 import tandem_pb2 as pb

    request = pb.SearchRequest(query=" ".join(args.query), include_text=True)
    if args.mode is not None:
        request.mode = getattr(pb, MODES[args.mode])
    if args.first_stage is not None:
        request.first_stage = getattr(pb, FIRST_STAGES[args.first_stage])
    for field, value in (
        ("recall_k", args.recall_k), ("top_n", args.top_n), ("rerank_budget_ms", args.budget_ms),
    ):  # fmt: skip
        if value is not None:
            setattr(request, field, value)
    if args.filter:
        set_filter(request.metadata_filter, args.filter)
    return request


def set_filter(field: Any, wanted: Mapping[str, Any]) -> None:
    """Fills a request's ``metadata_filter`` map (of protobuf Values) from plain JSON."""
    from google.protobuf import json_format, struct_pb2

    for key, value in wanted.items():
        field[key].CopyFrom(json_format.ParseDict(value, struct_pb2.Value()))


def filter_json(text: str) -> dict[str, Any]:
    """``--filter``'s value: a JSON object (the server reads what it means)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of metadata keys: {text!r}")
    return value


def call_metadata(args: argparse.Namespace, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    token = args.token or environ.get("TANDEM_TOKEN")
    return [("authorization", f"Bearer {token}")] if token else []


def open_channel(args: argparse.Namespace) -> Any:
    """A gRPC channel to ``--address``, over TLS where ``--tls-ca`` names what to trust."""
    import grpc

    if args.tls_ca:
        with open(args.tls_ca, "rb") as handle:
            credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
        return grpc.secure_channel(args.address, credentials)
    return grpc.insecure_channel(args.address)


def run(args: argparse.Namespace) -> int:
    import grpc

    from tandem.v1 import tandem_pb2 as pb
    from tandem.v1 import tandem_pb2_grpc

    channel = open_channel(args)
    request = search_request(args)
    metadata = call_metadata(args, os.environ)
    with channel:
        try:
            stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]
            reply = stub.Search(request, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            print(f"tandem search: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    timings = reply.timings
    stage = pb.FirstStage.Name(reply.first_stage).removeprefix("FIRST_STAGE_").lower()
    print(
        f"{len(reply.hits)} hits; {reply.reranked_count}/{reply.candidates} candidates reranked "
        f"({stage}: {reply.dense_candidates} dense, {reply.lexical_candidates} lexical); "
        f"{timings.total_ms:.1f} ms (embed {timings.embed_ms:.1f}, search {timings.search_ms:.1f}, "
        f"queue {timings.queue_ms:.1f}, rerank {timings.rerank_ms:.1f})"
    )
    for hit in reply.hits:
        kind = "rerank" if hit.reranked else "stage1"
        sides = " ".join(
            f"{side} #{getattr(hit, f'{side}_rank')}"
            for side in ("dense", "lexical")
            if hit.HasField(f"{side}_rank")
        )
        print(f"{hit.score:8.3f} {kind}  #{hit.stage1_rank:<3} {hit.id}  ({sides})")
        print(f"         {hit.text[:200]}")
    return 0
