"""`tandem documents`: a running server's documents as JSON lines, a page at a time.

Each line is ``{"id", "text", "metadata"}``, the corpus format ``tandem index build`` reads,
so a collection can be backed up, audited or re-embedded with another bi-encoder without
keeping a list of its ids elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TextIO

from tandem.client import (
    add_connection_arguments,
    call_metadata,
    filter_json,
    open_channel,
    set_filter,
)

MAX_PAGE_SIZE = 1000  # the server's cap on GetRequest.limit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument(
        "--filter",
        type=filter_json,
        help='only documents whose metadata matches, as JSON: \'{"tenant": "acme"}\' (README: '
        '"Metadata filters")',
    )
    parser.add_argument("--prefix", default="", help="only documents whose id starts with this")
    parser.add_argument(
        "--page-size", type=page_size, default=500, help="documents per Get call (1 to 1000)"
    )


def page_size(text: str) -> int:
    # A proto3 limit of 0 reads as unset (the server's 100), so refuse it here instead.
    size = int(text)
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_PAGE_SIZE} (got {size})")
    return size


def pages(
    stub: Any,
    *,
    page_size: int,
    prefix: str = "",
    wanted: Mapping[str, Any] | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> Iterator[Any]:
    """Yields each page's GetResponse until the server says nothing is left."""
    from tandem.v1 import tandem_pb2 as pb

    request = pb.GetRequest(id_prefix=prefix, limit=page_size)
    if wanted:
        set_filter(request.metadata_filter, wanted)
    while True:
        reply = stub.Get(request, metadata=metadata, timeout=30)
        yield reply
        if not reply.next_page_token:
            return
        request.page_token = reply.next_page_token


def write(reply: Any, out: TextIO) -> int:
    from google.protobuf import json_format

    for document in reply.documents:
        line = {
            "id": document.id,
            "text": document.text,
            "metadata": json_format.MessageToDict(document.metadata),
        }
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(reply.documents)


def run(args: argparse.Namespace) -> int:
    import grpc

    from tandem.v1 import tandem_pb2_grpc

    metadata = call_metadata(args, os.environ)
    listed = 0
    with open_channel(args) as channel:
        stub = tandem_pb2_grpc.RetrievalStub(channel)  # type: ignore[no-untyped-call]
        try:
            walk = pages(
                stub,
                page_size=args.page_size,
                prefix=args.prefix,
                wanted=args.filter,
                metadata=metadata,
            )
            for reply in walk:
                listed += write(reply, sys.stdout)
        except grpc.RpcError as error:
            print(
                f"tandem documents: {error.code().name}: {error.details()} "
                f"(after {listed} documents)",
                file=sys.stderr,
            )
            return 1
    print(f"tandem documents: {listed} documents", file=sys.stderr)
    return 0
