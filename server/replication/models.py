"""Reranker versions under a models root, which running servers follow without a restart.

    root/rerankers/000003/   a verified reranker artifact, copied whole (immutable)
    root/RERANKER            "000003": written last

``tandem models publish ARTIFACT --root ROOT`` checks the artifact (a cross-encoder whose
files match their hashes and whose parity passed), copies it under a temporary name, fsyncs
it, renames it into ``rerankers/`` and only then replaces the pointer, as ``tandem index
publish`` does for collections. Every server started with ``--reranker ROOT`` (the writer
and its replicas alike) looks at the pointer every ``--follow-seconds`` and on SIGHUP, loads
and warms the new version beside the serving one, and swaps it in between calls
(``Engine.swap_reranker``). A version that fails to load, fails its parity, or tokenizes
differently is logged and skipped: the old reranker keeps serving.

A reranker ``tandem train`` measured below stage 1 alone on its held-out queries (nDCG@10,
p < 0.05) is refused unless the publisher allows it: serving it would rank every Search
worse than not reranking at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.artifact import ArtifactError, Manifest, open_checked
from tandem.relevance import behind_beyond_chance
from tandem.server.engine.errors import RequestError
from tandem.server.replication.publish import PublishError, check_keep, publish_version

log = logging.getLogger(__name__)

POINTER = "RERANKER"
VERSIONS = "rerankers"

Loader = Callable[[Path, str], Awaitable[None]]


@dataclass(frozen=True)
class HeldOutLead:
    """A trained reranker against its first stage alone on the held-out queries, as the
    ``tandem train`` that made it measured them (nDCG@10, the first stage's candidates)."""

    first_stage: str
    queries: int
    trained: float
    stage1: float
    difference: float  # trained - stage 1, the paired test's mean over queries
    p_value: float

    @property
    def worse(self) -> bool:
        return behind_beyond_chance(self.difference, self.p_value)

    def sentence(self) -> str:
        return (
            f"on its {self.queries} held-out queries it scored nDCG@10 {self.trained:.3f} "
            f"against {self.stage1:.3f} for {self.first_stage} alone "
            f"({self.difference:+.3f}, p = {self.p_value:.4f})"
        )


def held_out_lead(manifest: Manifest) -> HeldOutLead | None:
    """The lead ``tandem train`` recorded in the manifest; None for a reranker it did not
    make (an exported one), whose quality this project never measured against stage 1."""
    held: Mapping[str, Any] = manifest.extra.get("training", {}).get("held_out") or {}
    stage1_name = f"{held.get('first_stage')} (stage 1 alone)"
    rows = {row.get("system"): row for row in held.get("rows", [])}
    test = held.get("paired_tests", {}).get(stage1_name, {}).get("ndcg@10")
    if test is None or stage1_name not in rows or "ndcg_at_10" not in held:
        return None
    return HeldOutLead(
        first_stage=str(held["first_stage"]),
        queries=int(test["n"]),
        trained=float(held["ndcg_at_10"]),
        stage1=float(rows[stage1_name]["ndcg_at_10"]),
        difference=float(test["mean_difference"]),
        p_value=float(test["p_value"]),
    )


def is_models_root(folder: Path) -> bool:
    return (folder / POINTER).is_file()


def current_version(root: Path) -> str:
    return (root / POINTER).read_text(encoding="utf-8").strip()


def version_folder(root: Path, version: str) -> Path:
    return root / VERSIONS / version


def measured_worse(manifest: Manifest) -> HeldOutLead | None:
    """The lead of a reranker ``tandem train`` measured below stage 1 alone; else None."""
    lead = held_out_lead(manifest)
    return lead if lead is not None and lead.worse else None


def worse_than_stage1(manifest: Manifest) -> str:
    """The figures that put a trained reranker below stage 1 alone, as a sentence; ""."""
    lead = measured_worse(manifest)
    return "" if lead is None else lead.sentence()


def publish_reranker(
    artifact: Path, root: Path, *, keep: int = 3, allow_worse: bool = False
) -> str:
    """Publishes ``artifact`` as the next reranker version under ``root``; returns it.
    ``allow_worse`` publishes one its training measured below stage 1 (an A/B test of it)."""
    check_keep(keep)
    try:
        manifest = open_checked(artifact, "cross-encoder")
    except ArtifactError as error:
        raise PublishError(str(error)) from error
    if not manifest.verified:
        raise PublishError(
            f"{artifact} is not verified (its parity check "
            f"{'never ran' if manifest.parity is None else 'failed'}): servers would refuse "
            "it; re-export it"
        )
    lead = measured_worse(manifest)
    if lead is not None and not allow_worse:
        raise PublishError(
            f"{artifact} would make Search worse than no reranker: {lead.sentence()}. Train "
            "it on more, and more varied, queries (tandem train --pseudo-queries), keep the "
            "serving reranker, or pass --allow-worse to publish it anyway"
        )
    if root.resolve() == artifact.resolve() or root.resolve() in artifact.resolve().parents:
        raise PublishError(f"--root {root} must not hold the artifact it publishes")

    def write(staging: Path) -> None:
        shutil.copytree(artifact, staging, dirs_exist_ok=True)

    version = publish_version(root / VERSIONS, root / POINTER, write, keep=keep)
    log.info("reranker published", extra={"version": version, "source": manifest.source})
    return version


class ModelFollower:
    """Swaps in each new reranker version the pointer names; ``load`` does the swap."""

    def __init__(self, root: Path, load: Loader, *, serving: str, every: float) -> None:
        self.root = root
        self.load = load
        self.serving = serving
        self.every = every
        self.failed: str | None = None  # a version that was refused: not retried
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            # A timeout is the poll; SIGHUP (``wake``) asks for a look now.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.every)
            self.wake.clear()
            await self.check()

    async def check(self) -> None:
        try:
            version = current_version(self.root)
        except OSError as error:
            log.warning("cannot read the reranker pointer", extra={"error": str(error)})
            return
        if not version or version in (self.serving, self.failed):
            return  # empty: written by hand and read between its truncation and its text
        try:
            await self.load(version_folder(self.root, version), version)
        except (ArtifactError, RequestError, OSError, Refused) as error:
            self.failed = version
            log.error(
                "new reranker refused (the old one keeps serving): %s",
                error,
                extra={"version": version, "error": str(error)},
            )
            return
        self.serving = version


class Refused(Exception):
    """A reranker version the server will not serve (unverified, or not loadable)."""
