"""The error table is complete: every exception Tandem defines has a status or a reason."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil

import grpc
import pytest

import server
import tandem
from server import status
from server.batcher import Overloaded, RunnerFailed
from server.search import InvalidRequest, NoReranker, UnknownDocuments
from server.store import InvalidDocuments, StoreFull, StoreReadOnly


def defined_exceptions() -> set[type[BaseException]]:
    found = set()
    for package in (tandem, server):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if module.name.startswith("tandem.v1"):
                continue  # protoc's output defines no exceptions
            loaded = importlib.import_module(module.name)
            for _, value in inspect.getmembers(loaded, inspect.isclass):
                if issubclass(value, BaseException) and value.__module__ == module.name:
                    found.add(value)
    return found


def test_every_exception_is_mapped_or_explained():
    mapped = {kind for kind, _ in status.TABLE}
    explained = set(status.NOT_ON_REQUEST_PATH)
    for kind in defined_exceptions():
        name = f"{kind.__module__}.{kind.__qualname__}"
        assert kind in mapped or name in explained, f"{name} has no status code and no reason"
    for name in explained:  # no stale entries
        module, _, qualname = name.rpartition(".")
        assert hasattr(importlib.import_module(module), qualname), name


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (status.BadArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidDocuments("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (UnknownDocuments("x"), grpc.StatusCode.NOT_FOUND),
        (NoReranker("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (StoreReadOnly("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (StoreFull("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (status.Busy("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (status.Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_expected_errors_keep_their_message(error, code):
    assert status.describe(error) == (code, "x")


@pytest.mark.parametrize("error", [RunnerFailed("session exploded"), ValueError("a bug")])
def test_internal_errors_hide_details_and_log_them(error, caplog):
    with caplog.at_level(logging.ERROR, logger="server.status"):
        code, message = status.describe(error)
    assert code is grpc.StatusCode.INTERNAL
    assert message == status.GENERIC_INTERNAL
    assert str(error) in caplog.text
