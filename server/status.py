"""The one table from errors to gRPC status codes, and what a client is told.

Every exception a request can raise is a subclass of one row below; ``tests/test_status.py``
checks that every exception class in ``tandem`` and ``server`` is either here or named in
``NOT_ON_REQUEST_PATH`` with the reason it never reaches a call. Anything else is a bug: the
client gets INTERNAL with a generic message, and the traceback goes to the log.
"""

from __future__ import annotations

import logging

import grpc

from server.batcher import Overloaded, RunnerFailed
from server.search import InvalidRequest, NoReranker, UnknownDocuments
from server.store import InvalidDocuments, StoreFull, StoreReadOnly

log = logging.getLogger(__name__)


class Busy(Exception):
    """More calls are in flight than ``max_in_flight``."""


class Unauthenticated(Exception):
    """The call lacks the bearer token, or sends a wrong one."""


class BadArgument(Exception):
    """A request field the service rejects before any model runs (sizes, empty ids, caps)."""


# Most specific class first: the first row the error is an instance of wins.
TABLE: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (BadArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidDocuments, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownDocuments, grpc.StatusCode.NOT_FOUND),
    (NoReranker, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreReadOnly, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    # The model run failed: not the caller's fault, and its text is not for clients.
    (RunnerFailed, grpc.StatusCode.INTERNAL),
)

# Exceptions that stop start-up or a command-line tool, never a call in flight.
NOT_ON_REQUEST_PATH: dict[str, str] = {
    "tandem.artifact.ArtifactError": "models are opened at start-up; the server refuses to start",
    "tandem.rag24.DataUnavailable": "test data for export and benchmarks only",
    "server.collection.CollectionError": "model/collection mismatch is checked at start-up",
    "server.index.IndexCorrupt": "caught at start-up, where the index is rebuilt from the store",
    "server.indexer.CorpusError": "`tandem index build` input files only",
    "server.settings.SettingsError": "configuration is read once in main()",
    "server.search.SearchError": "abstract base; its subclasses are in TABLE",
    "server.store.StoreError": "abstract base; its subclasses are in TABLE",
    "server.store.StoreUnavailable": "the store is opened at start-up (a CollectionError)",
    "server.publish.PublishError": "`tandem index publish` only",
}

GENERIC_INTERNAL = "internal error; the server log has the details"


def describe(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and the client-facing message for ``error``."""
    for kind, code in TABLE:
        if isinstance(error, kind):
            if code is grpc.StatusCode.INTERNAL:
                log.error("request failed: %s", error, exc_info=error)
                return code, GENERIC_INTERNAL
            return code, str(error)
    log.error("unexpected error", exc_info=error)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL
