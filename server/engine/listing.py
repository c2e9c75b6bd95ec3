"""Listing stored documents a page at a time: the request's checks, its page tokens, and
the connection pages are read through.

A page token carries the id to go on after and a fingerprint of the filter and prefix it was
issued for. Ids, not offsets: a write between two pages moves no document from one page to
the next, so none is listed twice and none that stayed is skipped. The token is opaque to
clients (base64 of JSON) but not secret: it holds an id the caller could list anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.server.engine.errors import InvalidArgument
from tandem.server.engine.filters import MetadataFilter
from tandem.server.engine.requests import bounded, check_id, checked_filter
from tandem.server.engine.store import DocumentStore, StoredDocument
from tandem.server.settings import Settings

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Ids one page reads at most (about 20 ms with a filter on a 2-core EPYC): a filter that few
# documents match answers short pages instead of one call that scans a million documents.
SCAN_PER_PAGE = 20_000
TOKEN_VERSION = 1


@dataclass(frozen=True)
class ListRequest:
    """Get's listing fields as the client set them (None or "" where it set nothing)."""

    metadata_filter: Mapping[str, Any] | None = None
    id_prefix: str = ""
    limit: int | None = None  # None: DEFAULT_LIMIT
    page_token: str = ""

    @property
    def asked(self) -> bool:
        return bool(self.metadata_filter or self.id_prefix or self.page_token) or (
            self.limit is not None
        )


@dataclass(frozen=True)
class Listing:
    """A checked ListRequest: where the page starts, and what it keeps."""

    after: str | None
    prefix: str
    matching: MetadataFilter | None
    limit: int
    fingerprint: str

    def token_after(self, last_id: str | None) -> str:
        """The next page's token ("" where nothing is left)."""
        if last_id is None:
            return ""
        payload = {"v": TOKEN_VERSION, "after": last_id, "query": self.fingerprint}
        raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class PageReader:
    """Reads pages through a read-only connection of its own (SQLite's WAL lets it read
    beside the writer, and see each commit), opened on first use on the listing lane's
    thread, and opened again when the collection moves (a replica's next version)."""

    def __init__(self) -> None:
        self.store: DocumentStore | None = None

    def page(self, path: Path, listing: Listing) -> tuple[list[StoredDocument], str | None]:
        if self.store is None or self.store.path != path:
            self.close()
            self.store = DocumentStore(path, read_only=True)
        return self.store.listed(
            after=listing.after,
            prefix=listing.prefix,
            matching=listing.matching,
            limit=listing.limit,
            scan=SCAN_PER_PAGE,
        )

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def check_listing(request: ListRequest, settings: Settings) -> Listing:
    raw_filter = dict(request.metadata_filter) if request.metadata_filter else None
    matching = checked_filter(raw_filter)
    if request.id_prefix:
        check_id(request.id_prefix, settings.max_id_bytes, where="id_prefix")
    limit = bounded("limit", request.limit, default=DEFAULT_LIMIT, limit=MAX_LIMIT)
    fingerprint = _fingerprint(raw_filter, request.id_prefix)
    return Listing(
        after=_after(request.page_token, fingerprint),
        prefix=request.id_prefix,
        matching=matching,
        limit=limit,
        fingerprint=fingerprint,
    )


def _fingerprint(raw_filter: dict[str, Any] | None, prefix: str) -> str:
    # Key order is not meaning: {"a": 1, "b": 2} and {"b": 2, "a": 1} list the same pages.
    canonical = json.dumps([raw_filter or {}, prefix], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _after(token: str, fingerprint: str) -> str | None:
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        version, after, query = payload["v"], payload["after"], payload["query"]
    except (UnicodeError, binascii.Error, ValueError, KeyError, TypeError) as error:
        raise _not_issued(token) from error
    if version != TOKEN_VERSION or not isinstance(after, str):
        raise _not_issued(token)
    if query != fingerprint:
        raise InvalidArgument(
            "page_token was issued for another metadata_filter or id_prefix: send the same "
            "filter and prefix as the first page, or start again without a page_token"
        )
    return after


def _not_issued(token: str) -> InvalidArgument:
    return InvalidArgument(
        f"page_token {token[:40]!r} is not one this server issued: send the last reply's "
        "next_page_token, or none for the first page"
    )
