"""The one table from engine errors to HTTP status, and each API shape's error body.

The rows follow ``tandem.server.api.status`` branch for branch, so a call refused over gRPC
is refused for the same reason over HTTP. Bodies differ by the shape a route speaks: a Cohere
client reads ``message``, a TEI client ``error`` and ``error_type``, an OpenAI client
``error.message``. A retryable refusal carries ``Retry-After``, in whole seconds as RFC 9110
asks, rounded up.
"""

from __future__ import annotations

import enum
import logging
import math
import uuid
from typing import Any

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
TABLE: tuple[tuple[type[RequestError], int], ...] = (
    (InvalidArgument, 400),
    (NotFound, 404),
    (FailedPrecondition, 409),
    (Retryable, 429),
    # Out of something waiting does not bring back (a full disk): not the client's fault.
    (Exhausted, 507),
    (Unavailable, 503),
    (Unauthenticated, 401),
    (Internal, 500),
)
GENERIC_INTERNAL = "internal error; the server log has the details"
# Not engine errors: the HTTP layer's own refusals.
PAYLOAD_TOO_LARGE = 413


class Dialect(enum.Enum):
    """Whose error body a route answers with."""

    COHERE = "cohere"  # also Jina's /v1/rerank, which shares Cohere's path
    TEI = "tei"
    OPENAI = "openai"
    NATIVE = "native"


def describe(error: BaseException) -> tuple[int, str]:
    """The HTTP status and the client-facing message for ``error``."""
    if isinstance(error, RequestError):
        for kind, status in TABLE:
            if isinstance(error, kind):
                if status == 500:
                    log.error("request failed: %s", error, exc_info=error)
                    return status, GENERIC_INTERNAL
                return status, str(error)
    log.error("unexpected error", exc_info=error)
    return 500, GENERIC_INTERNAL


def retry_after(error: BaseException) -> dict[str, str]:
    if isinstance(error, Retryable):
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    return {}


# TEI's ErrorType names, by status.
TEI_TYPES = {
    400: "validation", 401: "unauthorized", 404: "validation", 409: "validation",
    413: "validation", 429: "overloaded", 500: "backend", 503: "unhealthy", 507: "backend",
}  # fmt: skip
OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 503: "server_error", 507: "server_error",
}  # fmt: skip
CODES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
    409: "FAILED_PRECONDITION", 413: "PAYLOAD_TOO_LARGE", 429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL", 503: "UNAVAILABLE", 507: "RESOURCE_EXHAUSTED",
}  # fmt: skip


def body(dialect: Dialect, status: int, message: str) -> dict[str, Any]:
    if dialect is Dialect.COHERE:
        # Cohere's {"id", "message"}; Jina's clients read FastAPI's "detail".
        return {"id": str(uuid.uuid4()), "message": message, "detail": message}
    if dialect is Dialect.TEI:
        return {"error": message, "error_type": TEI_TYPES.get(status, "backend")}
    if dialect is Dialect.OPENAI:
        return {
            "error": {
                "message": message,
                "type": OPENAI_TYPES.get(status, "server_error"),
                "param": None,
                "code": None,
            }
        }
    return {"error": {"status": status, "code": CODES.get(status, "INTERNAL"), "message": message}}
