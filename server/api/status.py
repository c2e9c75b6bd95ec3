"""The one table from engine errors to gRPC status codes, and what a client is told.

Every exception a call can end with is a branch of ``tandem.server.engine.errors``;
``tests/test_status.py`` checks that every exception class Tandem defines is either under one
of those branches or named in ``NOT_ON_REQUEST_PATH`` with the reason it never reaches a
call. Anything else is a bug: the client gets INTERNAL with a generic message, and the
traceback goes to the log.

RESOURCE_EXHAUSTED covers two kinds of refusal. A retryable one (overload, a busy store)
carries ``google.rpc.RetryInfo`` in the status details, with the delay to wait; one that
waiting does not cure (a full disk, a message over the size limit) carries none.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tandem.server.engine.errors import (
    Exhausted,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    RequestError,
    Retryable,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

# Most specific class first: the first row the error is an instance of wins.
TABLE: tuple[tuple[type[RequestError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Retryable, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    # A model run failed: not the caller's fault, and its text is not for clients.
    (Internal, grpc.StatusCode.INTERNAL),
)

# Exceptions that stop start-up or a command-line tool, never a call in flight.
NOT_ON_REQUEST_PATH: dict[str, str] = {
    "tandem.artifact.ArtifactError": "models are opened at start-up; the server refuses to start",
    "tandem.artifact.UnknownPrompt": "Engine.embed turns it into InvalidArgument",
    "tandem.matryoshka.UnsupportedDimensions": "Engine.embed turns it into InvalidArgument",
    "tandem.runtimes.RuntimeUnavailable": "the runtime is chosen at start-up, which it stops",
    "tandem.rag24.DataUnavailable": "test data for export and benchmarks only",
    "tandem.server.engine.collection.CollectionError": "checked at start-up",
    "tandem.server.engine.index.IndexCorrupt": "caught at start-up; the index is rebuilt",
    "tandem.server.engine.lexical.LexicalCorrupt": "caught at start-up; the index is rebuilt",
    "tandem.server.engine.lexical.LexicalWriteFailed": (
        "caught by the collection: the store holds the write, the index catches up from it"
    ),
    "tandem.tune.TuneError": "`tandem tune` input only",
    "tandem.server.engine.indexer.CorpusError": "`tandem index build` input files only",
    "tandem.server.settings.SettingsError": "configuration is read once in main()",
    "tandem.server.engine.store.StoreUnavailable": "the store is opened at start-up",
    "tandem.server.replication.publish.PublishError": (
        "`tandem index publish` and `tandem models publish` only"
    ),
    "tandem.server.app.Unverified": "artifacts are checked at start-up; the server refuses",
    "tandem.server.engine.errors.RequestError": "the abstract root; its branches are in TABLE",
    "tandem.relevance.InputError": "queries and qrels files of `tandem tune` and `train` only",
    "tandem.training.labels.LabelError": "`tandem train` input only",
    "tandem.server.replication.models.Refused": (
        "a published reranker the follower refuses: logged, the old one keeps serving"
    ),
    "tandem.server.engine.store.StoreError": "abstract; each subclass is also under a branch",
}

GENERIC_INTERNAL = "internal error; the server log has the details"


def describe(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and the client-facing message for ``error``."""
    if isinstance(error, RequestError):
        for kind, code in TABLE:
            if isinstance(error, kind):
                if code is grpc.StatusCode.INTERNAL:
                    log.error("request failed: %s", error, exc_info=error)
                    return code, GENERIC_INTERNAL
                return code, str(error)
    log.error("unexpected error", exc_info=error)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL


def rich_status(error: BaseException) -> grpc.Status:
    """``describe`` as a status with details: ``RetryInfo`` for a retryable refusal."""
    code, message = describe(error)
    status = status_pb2.Status(code=code.value[0], message=message)
    if isinstance(error, Retryable):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(int(error.retry_after_s * 1e9), 1_000_000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


def retry_delay_of(error: grpc.RpcError) -> float | None:
    """``retry_delay`` of a failed call as a client holds it (grpc's or grpc.aio's error)."""
    trailing = getattr(error, "trailing_metadata", None)
    details = dict(trailing() or ()).get("grpc-status-details-bin") if trailing else None
    return retry_delay(details if isinstance(details, bytes) else None)


def retry_delay(details: bytes | None) -> float | None:
    """The RetryInfo delay (seconds) in a status's ``grpc-status-details-bin``, if any: what
    a client reads to tell a retryable RESOURCE_EXHAUSTED from one that waiting won't cure."""
    if not details:
        return None
    status = status_pb2.Status.FromString(details)
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None
