"""The one tree of errors a call can end with. Every transport maps its branches to a status.

Each class names what the caller should do, not where the error arose::

    RequestError
    ├── InvalidArgument      the request itself is wrong: fix it and send it again
    ├── NotFound             it names a stored document that does not exist
    ├── FailedPrecondition   this server cannot do it as configured (no reranker, read-only)
    ├── Retryable            overloaded or busy for now: back off ``retry_after_s``, then retry
    ├── Exhausted            out of a resource that waiting does not bring back (a full disk)
    ├── Unavailable          a part of the server has failed; it is restarting or needs care
    ├── Unauthenticated      the call lacks the bearer token
    └── Internal             a model run failed; the details are in the server log

Modules raise subclasses that say more (``StoreFull``, ``NoReranker``); the transports map only
these branches, so a new subclass needs no new row in any status table.
"""

from __future__ import annotations


class RequestError(Exception):
    """A call that ends without an answer, for a reason the caller is told."""


class InvalidArgument(RequestError):
    pass


class NotFound(RequestError):
    pass


class FailedPrecondition(RequestError):
    pass


class Retryable(RequestError):
    """Refused for now. ``retry_after_s``: how long a client should wait before it retries."""

    def __init__(self, message: str, *, retry_after_s: float = 0.1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Exhausted(RequestError):
    pass


class Unavailable(RequestError):
    pass


class Internal(RequestError):
    pass


class Unauthenticated(RequestError):
    """The call lacks the bearer token, or sends a wrong one (checked by each transport)."""
