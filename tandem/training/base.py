"""Where training starts: a reranker's checkpoint, or an encoder given a new one-logit head.

``--base`` may name
- a Tandem artifact (its manifest's source checkpoint, or the checkpoint an FP16 export keeps):
  the serving reranker, fine-tuned further;
- a Hugging Face cross-encoder (``*ForSequenceClassification`` with one label), a folder or a
  hub id;
- any other encoder, a bi-encoder included (all-MiniLM-L6-v2): its transformer, with a new
  one-logit head. This is how a reranker is trained where no pretrained one can be fetched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tandem.artifact import CHECKPOINT_DIR, MANIFEST_NAME, ArtifactError, read_manifest
from tandem.training.labels import LabelError

BaseKind = Literal["reranker", "new-head"]


@dataclass(frozen=True)
class Base:
    source: str  # what the user named
    checkpoint: str  # a folder or hub id transformers can load
    kind: BaseKind
    artifact: Path | None  # the Tandem artifact named, to evaluate as the starting reranker


def resolve_base(source: str) -> Base:
    path = Path(source)
    if (path / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(path)
        except ArtifactError as error:
            raise LabelError(f"--base {source}: {error}") from error
        if manifest.kind != "cross-encoder":
            raise LabelError(f"--base {source} is a {manifest.kind} artifact, not a reranker's")
        kept = path / (manifest.checkpoint or CHECKPOINT_DIR)
        checkpoint = str(kept) if (kept / "config.json").is_file() else manifest.source
        if not Path(checkpoint).exists() and "/" not in checkpoint:
            raise LabelError(
                f"--base {source}: its checkpoint {checkpoint!r} is gone; name the checkpoint "
                "itself with --base"
            )
        return Base(source, checkpoint, "reranker", path)
    if path.exists():
        config = path / "config.json"
        if not config.is_file():
            raise LabelError(f"--base {source} holds no config.json: not a model folder")
        return Base(source, source, _kind(json.loads(config.read_text(encoding="utf-8"))), None)
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return Base(source, source, _hub_kind(source), None)
    raise LabelError(f"--base {source}: no such folder, and not a hub id (owner/name)")


def _kind(config: dict[str, object]) -> BaseKind:
    architectures = config.get("architectures")
    classifier = isinstance(architectures, list) and any(
        isinstance(name, str) and name.endswith("ForSequenceClassification")
        for name in architectures
    )
    return "reranker" if classifier and config.get("num_labels", 1) in (1, None) else "new-head"


def _hub_kind(source: str) -> BaseKind:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as error:
        # transformers' message runs over several lines; its first says what went wrong.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LabelError(
            f"--base {source}: no such folder, and it cannot be fetched from the hub ({reason})"
        ) from error
    return _kind(config.to_dict())


def with_new_head(base: Base, folder: Path, *, seed: int) -> str:
    """Saves ``base``'s transformer with a freshly initialised one-logit head in ``folder``
    (seeded, so a rerun starts from the same weights) and returns it."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base.checkpoint, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(base.checkpoint)  # type: ignore[no-untyped-call]
    # all-MiniLM's tokenizer.json fixes truncation and padding at 128: the trainer pads and
    # cuts to its own --max-length instead.
    tokenizer.model_max_length = model.config.max_position_embeddings
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
