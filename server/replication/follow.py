"""A replica follows a published root: it swaps in each new version without a restart.

The new version is opened (store checks, index checksum, memory map) on the ingest lane,
which a read-only replica never otherwise uses, so searches go on meanwhile. The swap itself
runs on the store lane: every store and index access runs there, one at a time, so each
runs wholly against the old version or wholly against the new one, and the old one can be
closed right after. A version that fails to open is logged and skipped; the replica keeps
serving the one it has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from tandem.server.engine.collection import Collection, CollectionError
from tandem.server.engine.index import IndexCorrupt
from tandem.server.engine.search import Searcher
from tandem.server.replication.publish import current_version, version_folder

log = logging.getLogger(__name__)

Opener = Callable[[Path, str], Collection]


class Follower:
    def __init__(
        self, root: Path, searcher: Searcher, open_version: Opener, *, every: float
    ) -> None:
        self.root = root
        self.searcher = searcher
        self.open_version = open_version
        self.every = every
        self.failed: str | None = None  # a version that would not open: not retried

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self.check()

    async def check(self) -> None:
        try:
            version = current_version(self.root)
        except OSError as error:
            log.warning("cannot read the version pointer", extra={"error": str(error)})
            return
        if not version or version in (self.searcher.collection.version, self.failed):
            return  # empty: written by hand and read between its truncation and its text
        lanes = self.searcher.lanes
        try:
            fresh = await lanes.run(
                "ingest", self.open_version, version_folder(self.root, version), version
            )
        except (CollectionError, IndexCorrupt, OSError) as error:
            self.failed = version
            log.error(
                "new version will not open: still serving the old one",
                extra={"version": version, "error": str(error)},
            )
            return
        old = await lanes.run("store", self._swap, fresh)
        log.info(
            "switched version",
            extra={"from": old, "to": version, "documents": len(fresh.index)},
        )

    def _swap(self, fresh: Collection) -> str | None:
        old = self.searcher.collection
        self.searcher.collection = fresh
        old.close()
        return old.version
