"""This checkout's server and, with ``--against DIR``, another checkout's beside it: the
before and after of a change measured in one run, so a slow spell of the shared machine
falls on both (docs/DEVELOPERS.md)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tandem.benchmarks.serving import Process, git_commit, start_tandem


def add_server_arguments(
    parser: argparse.ArgumentParser, *, collection: Path | None, collection_help: str
) -> None:
    """What ``servers`` reads: the models, the collection each server copies, the threads,
    and the other checkout."""
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    parser.add_argument("--reranker", type=Path, default=Path("artifacts/cross-encoder"))
    parser.add_argument("--collection", type=Path, default=collection, help=collection_help)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--against", type=Path, default=None,
        help="another checkout to serve beside this one, e.g. `git worktree add DIR COMMIT`, "
        "with its tandem/v1 generated (copy this checkout's where protos/ is unchanged)",
    )  # fmt: skip


def start(
    args: argparse.Namespace,
    folder: Path,
    name: str,
    tree: Path | None,
    *,
    extra: Sequence[str] = (),
) -> Process:
    """A server of this checkout, or of ``tree``: run from there, since ``python -m`` puts
    the working directory ahead of ``PYTHONPATH``. Each serves a copy of ``--collection``
    (or an empty one)."""
    collection = folder / f"collection-{name}"
    if args.collection is not None:
        shutil.copytree(args.collection, collection, ignore=shutil.ignore_patterns("*.lock"))
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return start_tandem(
        args, folder / f"{name}.log", collection=collection, extra=extra, env=env, cwd=tree
    )


@contextlib.contextmanager
def servers(args: argparse.Namespace, *, extra: Sequence[str] = ()) -> Iterator[dict[str, Process]]:
    """Starts this checkout's server, named "this", and with ``--against`` the other's,
    "against", each on its own copy of the collection; stops them on the way out."""
    if args.against is not None and not (args.against / "tandem" / "v1").is_dir():
        raise SystemExit(
            f"{args.against}/tandem/v1 is missing: copy this checkout's tandem/v1 there if "
            "protos/ is the same in both, else install that checkout once to generate it"
        )
    trees = {"this": None} | ({} if args.against is None else {"against": args.against})
    started: dict[str, Process] = {}
    with tempfile.TemporaryDirectory() as folder:
        try:
            for name, tree in trees.items():
                started[name] = start(args, Path(folder), name, tree, extra=extra)
            yield started
        finally:
            for server in started.values():
                server.stop()


def commits(args: argparse.Namespace) -> dict[str, str]:
    out = {"this": git_commit()}
    if args.against is not None:
        out["against"] = git_commit(args.against)
    return out
