"""What start-up measured about an artifact on this CPU, kept so that a restart need not.

Choosing OpenVINO's precision measures the artifact's whole parity probe in bf16: 35 s for
the stand-in reranker and 8 s for MiniLM-L6 on a 2-core EPYC with avx512_bf16, at every
start, every replica and every reranker swapped in. The outcome depends only on the graph,
the CPU, OpenVINO's version and the thread count, so it is kept under those four and reused
while all four are the same. The CPU is its name, its family, model and stepping, and its
flags: clouds mask the name (a Zen 4 and a Zen 5 both read ``AMD EPYC``), and a cache on a
volume that replicas on several machine types share must not carry one's choice to
another. Deleting the file measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tandem.artifact import MANIFEST_NAME
from tandem.cpu import cpu_flags, cpu_identity, cpu_model_name
from tandem.durable import sha256_file, write_text_atomically
from tandem.runtimes import RuntimeFit
from tandem.runtimes.openvino import openvino_version

log = logging.getLogger(__name__)

SUBFOLDER = "cpu-precision"


class PrecisionCache:
    """The choice made for one artifact folder at ``threads`` threads, under ``root``."""

    def __init__(self, root: Path, folder: Path, *, threads: int) -> None:
        self.root = root
        self.folder = folder
        self.threads = threads

    # Read on first use: an artifact that is not OpenVINO's never asks, nor imports OpenVINO.
    @cached_property
    def key(self) -> dict[str, Any]:
        return {
            "artifact": sha256_file(self.folder / MANIFEST_NAME),
            "cpu": cpu_model_name(),
            "cpu_identity": cpu_identity(),
            "cpu_flags": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest(),
            "openvino": openvino_version(),
            "threads": self.threads,
        }

    @cached_property
    def path(self) -> Path:
        name = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:32]
        return self.root.expanduser() / SUBFOLDER / f"{name}.json"

    def recall(self) -> RuntimeFit | None:
        """The fit chosen before under this key, its reason saying when and where it is kept;
        None if none was kept (or the file cannot be read: measured again, written anew)."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if raw["key"] != self.key:
                return None
            fit = RuntimeFit(**raw["fit"])
            kept = f"measured at a start at {raw['measured_at']}, kept in {self.path}"
            return replace(fit, reason=f"{fit.reason} ({kept}: delete it to measure again)")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning(
                "cpu precision cache unreadable: measuring again",
                extra={"path": str(self.path), "error": str(error)},
            )
            return None

    def keep(self, fit: RuntimeFit) -> None:
        """Writes ``fit`` for the next start; a cache that cannot be written costs only time."""
        record = {
            "key": self.key,
            "fit": asdict(fit),
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.path, json.dumps(record, indent=2) + "\n")
        except OSError as error:
            log.warning(
                "cpu precision cache not written: the next start measures again",
                extra={"path": str(self.path), "error": str(error)},
            )
