"""The error table is complete: every exception Tandem defines has a status or a reason."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil

import grpc
import pytest

import tandem
from tandem.server.admission import Refused
from tandem.server.api import status
from tandem.server.engine import errors
from tandem.server.engine.batcher import Overloaded, RunnerFailed
from tandem.server.engine.errors import (
    InvalidArgument,
    RequestError,
    Retryable,
    Unauthenticated,
    Unavailable,
)
from tandem.server.engine.search import NoReranker, UnknownDocuments
from tandem.server.engine.store import InvalidDocuments, StoreBusy, StoreFull, StoreReadOnly
from tandem.server.http import errors as http_errors


def defined_exceptions() -> set[type[BaseException]]:
    found = set()
    for module in pkgutil.walk_packages(tandem.__path__, "tandem."):
        if module.name.startswith(("tandem.v1", "tandem.export", "tandem.benchmarks")):
            continue  # protoc's output; command-line tools that never serve a call
        loaded = importlib.import_module(module.name)
        for _, value in inspect.getmembers(loaded, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == module.name:
                found.add(value)
    return found


def test_every_exception_is_mapped_or_explained():
    explained = set(status.NOT_ON_REQUEST_PATH)
    for kind in defined_exceptions():
        name = f"{kind.__module__}.{kind.__qualname__}"
        mapped = any(issubclass(kind, row) for row, _ in status.TABLE)
        assert mapped or name in explained, f"{name} has no status code and no reason"
    for name in explained:  # no stale entries
        module, _, qualname = name.rpartition(".")
        assert hasattr(importlib.import_module(module), qualname), name


def test_every_branch_of_the_error_tree_has_a_row():
    branches = {
        kind for kind in RequestError.__subclasses__() if kind.__module__ == errors.__name__
    }
    assert branches == {row for row, _ in status.TABLE}
    assert branches == {row for row, _ in http_errors.TABLE}  # the HTTP door's table too


@pytest.mark.parametrize(
    ("error", "http_status"),
    [
        (InvalidDocuments("x"), 400), (UnknownDocuments("x"), 404), (NoReranker("x"), 409),
        (StoreReadOnly("x"), 409), (StoreBusy("x"), 429), (StoreFull("x"), 507),
        (Refused("x", reason="in_flight", retry_after_s=0.1), 429), (Unavailable("x"), 503),
        (Unauthenticated("x"), 401),
    ],
)  # fmt: skip
def test_http_statuses_follow_the_grpc_codes(error, http_status):
    assert http_errors.describe(error) == (http_status, "x")


def test_http_retry_after_is_whole_seconds_rounded_up_and_only_for_retryable_errors():
    assert http_errors.retry_after(Overloaded("x", retry_after_s=0.1)) == {"Retry-After": "1"}
    assert http_errors.retry_after(StoreBusy("x", retry_after_s=1.5)) == {"Retry-After": "2"}
    assert http_errors.retry_after(StoreFull("x")) == {}
    assert http_errors.describe(RunnerFailed("boom")) == (500, http_errors.GENERIC_INTERNAL)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidDocuments("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (UnknownDocuments("x"), grpc.StatusCode.NOT_FOUND),
        (NoReranker("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (StoreReadOnly("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (StoreFull("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (StoreBusy("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Refused("x", reason="in_flight", retry_after_s=0.1), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_expected_errors_keep_their_message(error, code):
    assert status.describe(error) == (code, "x")


@pytest.mark.parametrize("error", [RunnerFailed("session exploded"), ValueError("a bug")])
def test_internal_errors_hide_details_and_log_them(error, caplog):
    with caplog.at_level(logging.ERROR, logger="tandem.server.api.status"):
        code, message = status.describe(error)
    assert code is grpc.StatusCode.INTERNAL
    assert message == status.GENERIC_INTERNAL
    assert str(error) in caplog.text


def test_only_retryable_refusals_carry_a_retry_delay():
    retryable = status.rich_status(Overloaded("queue full", retry_after_s=0.25))
    final = status.rich_status(StoreFull("disk full"))
    assert retryable.code is final.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.retry_delay(dict(retryable.trailing_metadata)["grpc-status-details-bin"]) == 0.25
    assert (
        not final.trailing_metadata
        or status.retry_delay(dict(final.trailing_metadata).get("grpc-status-details-bin")) is None
    )
    assert issubclass(StoreBusy, Retryable)
    assert not issubclass(StoreFull, Retryable)
