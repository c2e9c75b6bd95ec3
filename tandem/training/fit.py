"""Fine-tunes a cross-encoder with sentence-transformers' ``CrossEncoderTrainer``.

Each training query becomes a list: its labelled documents, then hard negatives from the
collection's first stage. The listwise loss (LambdaLoss, nDCG-weighted) ranks the list as a
whole; pointwise BCE scores each pair against grade / top grade. ``distill`` adds the
bi-encoder's own ordering to the labels (its score, scaled to [0, distill] within the list),
so that the ties between equal labels, and the unjudged negatives, are ordered as the first
stage orders them rather than at random: the reranker keeps what the bi-encoder knew.

Checkpoints are saved at every epoch's end under ``out/checkpoints``; a rerun with the same
settings resumes from the last one, so Ctrl-C or a kill loses at most the epoch in progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tandem.cpu import cpu_flags, has_bf16_matmul
from tandem.training.labels import Judged, LabelError
from tandem.training.pools import Pool, hard_negatives, teacher_scores

log = logging.getLogger(__name__)
Loss = Literal["lambda", "bce"]
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Recipe:
    """What a run trains with; its hash decides whether a checkpoint may be resumed."""

    base: str
    loss: Loss
    epochs: int
    batch_size: int  # queries per step (lambda), pairs per step (bce)
    learning_rate: float
    warmup_ratio: float
    max_length: int
    negatives: int
    margin: float | None
    list_size: int
    distill: float
    seed: int
    data_sha256: str

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Listed:
    """One training query as the loss sees it."""

    query: str
    docs: list[str]  # texts
    labels: list[float]


def build_lists(
    train: Sequence[Judged],
    pools: Mapping[str, Pool],
    texts: Mapping[str, str],
    *,
    negatives: int,
    margin: float | None,
    list_size: int,
    distill: float,
    seed: int,
) -> list[Listed]:
    """Labelled documents first (every positive kept when the list must be cut, then labelled
    negatives), filled up with mined negatives, each list shuffled with ``seed``."""
    rng = random.Random(seed)
    lists = []
    for item in train:
        pool = pools[item.query_id]
        labelled = sorted(item.grades, key=lambda doc: -item.grades[doc])
        mined = hard_negatives(item, pool, count=negatives, margin=margin)
        docs = (labelled + mined)[: max(list_size, 2)]
        if not any(item.grades.get(doc, 0.0) > 0 for doc in docs):
            continue  # nothing relevant: the list has nothing to rank above the rest
        teacher = teacher_scores(pool, docs) if distill else {}
        labels = [item.grades.get(doc, 0.0) + distill * teacher.get(doc, 0.0) for doc in docs]
        order = list(range(len(docs)))
        rng.shuffle(order)
        lists.append(
            Listed(
                item.query,
                [item.texts.get(docs[i]) or texts[docs[i]] for i in order],
                [labels[i] for i in order],
            )
        )
    if not lists:
        raise LabelError("no training query has a relevant document: nothing to learn from")
    return lists


def data_hash(lists: Sequence[Listed]) -> str:
    digest = hashlib.sha256()
    for entry in lists:
        digest.update(json.dumps([entry.query, entry.docs, entry.labels]).encode())
    return digest.hexdigest()


def bf16_supported(cpuinfo: str | None = None) -> bool:
    """bf16 autocast pays on CPUs with AMX or avx512_bf16; elsewhere it is emulated, slower."""
    return has_bf16_matmul(cpu_flags(cpuinfo))


def train(
    lists: Sequence[Listed],
    recipe: Recipe,
    *,
    checkpoint: str,
    out: Path,
    device: str,
    bf16: bool,
    threads: int,
) -> tuple[Path, dict[str, Any]]:
    """Trains, resuming from ``out/checkpoints`` where a run with the same recipe stopped,
    and saves the model to ``out/model``. Returns that folder and what the run measured."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss, LambdaLoss
    from transformers import set_seed

    if device == "cpu":
        torch.set_num_threads(threads)
    checkpoints = out / "checkpoints"
    resume = _resumable(checkpoints, recipe)
    set_seed(recipe.seed)
    model = CrossEncoder(checkpoint, num_labels=1, max_length=recipe.max_length, device=device)
    if recipe.loss == "lambda":
        dataset = Dataset.from_dict(
            {
                "query": [entry.query for entry in lists],
                "docs": [entry.docs for entry in lists],
                "labels": [entry.labels for entry in lists],
            }
        )
        loss: Any = LambdaLoss(model)
        pairs_per_row = sum(len(entry.docs) for entry in lists) / len(lists)
    else:
        top = max(max(entry.labels) for entry in lists) or 1.0
        rows = [
            (entry.query, doc, label / top)
            for entry in lists
            for doc, label in zip(entry.docs, entry.labels, strict=True)
        ]
        random.Random(recipe.seed).shuffle(rows)
        dataset = Dataset.from_dict(
            {
                "query": [row[0] for row in rows],
                "doc": [row[1] for row in rows],
                "label": [row[2] for row in rows],
            }
        )
        loss = BinaryCrossEntropyLoss(model)
        pairs_per_row = 1.0
    arguments = CrossEncoderTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        warmup_ratio=recipe.warmup_ratio,
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=bf16,
        use_cpu=device == "cpu",
        save_strategy="epoch",
        save_total_limit=2,
        logging_strategy="epoch",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    progress = Progress(pairs_per_row * recipe.batch_size)
    trainer = CrossEncoderTrainer(
        model=model, args=arguments, train_dataset=dataset, loss=loss, callbacks=[progress]
    )
    started = time.perf_counter()
    last = last_complete_checkpoint(checkpoints) if resume else None
    if last:
        log.info("resuming from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - started
    folder = out / "model"
    model.save_pretrained(str(folder))
    pairs = pairs_per_row * len(dataset) * recipe.epochs
    return folder, {
        "seconds": seconds,
        "resumed_from": last,
        "steps": result.global_step,
        "training_loss": result.training_loss,
        "pairs_per_epoch": round(pairs_per_row * len(dataset)),
        # None where a resumed run found every epoch trained: it timed no step.
        "pairs_per_second": progress.rate
        if progress.rate is not None or last
        else pairs / max(seconds, 1e-9),
        "device": device,
        "bf16": bf16,
        "threads": threads,
    }


# What transformers writes into a checkpoint; the trainer state comes last, so a folder
# without it was cut off by a kill mid-save.
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "trainer_state.json")


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest ``checkpoint-N`` holding every file a resume reads. A newer one a kill cut
    off mid-save is removed: that epoch is trained again."""
    found = sorted(
        (path for path in checkpoints.glob("checkpoint-*") if path.name[11:].isdigit()),
        key=lambda path: int(path.name[11:]),
    )
    while found and not all((found[-1] / name).is_file() for name in CHECKPOINT_FILES):
        log.warning("%s was cut off mid-save: resuming from the one before", found[-1])
        shutil.rmtree(found.pop(), ignore_errors=True)
    return str(found[-1]) if found else None


def _resumable(checkpoints: Path, recipe: Recipe) -> bool:
    """True where ``checkpoints`` holds a run of this recipe; a run of another recipe is
    refused rather than silently resumed with settings it was not started with."""
    record = checkpoints / RUN_FILE
    if record.is_file():
        recorded = json.loads(record.read_text(encoding="utf-8"))
        if recorded.get("fingerprint") != recipe.fingerprint():
            raise LabelError(
                f"{checkpoints.parent} holds a training run with other settings or data; pass "
                "another --out, or --restart to discard it"
            )
        return True
    checkpoints.mkdir(parents=True, exist_ok=True)
    record.write_text(
        json.dumps({"fingerprint": recipe.fingerprint(), "recipe": asdict(recipe)}, indent=2),
        encoding="utf-8",
    )
    return False


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class Progress(_callback_base()):  # type: ignore[misc]
    """One line on stderr: steps, pairs/s and the time left (transformers' own bar is off)."""

    def __init__(self, pairs_per_step: float) -> None:
        self.pairs_per_step = pairs_per_step
        self.started = 0.0
        self.first_step = 0
        self.rate: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        self.first_step = state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        done = state.global_step - self.first_step
        elapsed = time.perf_counter() - self.started
        self.rate = done * self.pairs_per_step / max(elapsed, 1e-9)
        left = (state.max_steps - state.global_step) * elapsed / max(done, 1)
        print(
            f"\rtraining: step {state.global_step}/{state.max_steps}, epoch "
            f"{state.epoch:.2f}, {self.rate:.1f} pairs/s, {left / 60:.1f} min left   ",
            end="", file=sys.stderr, flush=True,
        )  # fmt: skip

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        print(file=sys.stderr)
