"""Runs exported encoders on onnxruntime: tokenize, run the session, pool. No torch here.

Each encoder splits its work into ``tokenize -> forward`` so a batcher can tokenize ahead of
the session and cap batches by padded tokens (the seam Infinity's backends use).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from tokenizers import Encoding, Tokenizer

from tandem.artifact import MODEL_NAME, ArtifactError, Kind, Manifest, open_checked

Device = Literal["cpu", "cuda"]

# Pairs per session run when a caller hands over more: batches whose activations fit in L3
# (10-20 pairs of ~110 tokens) run 10-20% faster than one batch of 100 on these cores.
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class TokenBatch:
    """Padded model inputs for one session run; ``truncated`` marks inputs that were cut."""

    input_ids: NDArray[np.int64]
    attention_mask: NDArray[np.int64]
    token_type_ids: NDArray[np.int64]
    truncated: NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> NDArray[np.int64]:
        return np.asarray(self.attention_mask.sum(axis=1), dtype=np.int64)

    def feed(self, names: Sequence[str]) -> dict[str, NDArray[np.int64]]:
        arrays = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }
        return {name: arrays[name] for name in names}


def load_tokenizer(folder: Path, *, max_length: int) -> Tokenizer:
    """Loads ``tokenizer.json`` with truncation at ``max_length`` and no built-in padding.

    Some tokenizer files fix padding and truncation (all-MiniLM-L6-v2's pad to 128), so both
    are reset here: padding is done per batch, to the longest member.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ArtifactError(f"{folder} has no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    # longest_first is what transformers' `truncation=True` does, so scores match the
    # sentence-transformers reference on overlong pairs.
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    return tokenizer


def pad_rows(
    ids: Sequence[Sequence[int] | NDArray[np.int64]],
    type_ids: Sequence[Sequence[int] | NDArray[np.int64]],
    truncated: Sequence[bool],
    *,
    pad_id: int = 0,
) -> TokenBatch:
    """Right-pads variable-length rows to the longest one."""
    width = max((len(row) for row in ids), default=0)
    count = len(ids)
    input_ids = np.full((count, width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((count, width), dtype=np.int64)
    token_type_ids = np.zeros((count, width), dtype=np.int64)
    for row, (row_ids, row_types) in enumerate(zip(ids, type_ids, strict=True)):
        input_ids[row, : len(row_ids)] = row_ids
        attention_mask[row, : len(row_ids)] = 1
        token_type_ids[row, : len(row_ids)] = row_types
    return TokenBatch(
        input_ids, attention_mask, token_type_ids, np.asarray(truncated, dtype=np.bool_)
    )


def pad_encodings(encodings: Sequence[Encoding], *, pad_id: int = 0) -> TokenBatch:
    return pad_rows(
        [encoding.ids for encoding in encodings],
        [encoding.type_ids for encoding in encodings],
        [bool(encoding.overflowing) for encoding in encodings],
        pad_id=pad_id,
    )


def pad_token_id(folder: Path) -> int:
    """The model's padding id from its config.json (0 for BERT, 1 for RoBERTa/XLM-R)."""
    path = folder / "config.json"
    if not path.is_file():
        return 0
    value = json.loads(path.read_text(encoding="utf-8")).get("pad_token_id")
    return int(value) if isinstance(value, int) else 0


def create_session(
    model_path: Path, *, threads: int, device: Device, spinning: bool = True
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One model runs at a time per session; a second inter-op pool would only contend for cores.
    options.inter_op_num_threads = 1
    if not spinning:
        # Idle worker threads spin by default, which wins when a session owns its cores and
        # steals them from the other session, the event loop and the store when it does not.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort.InferenceSession(str(model_path), options, providers=providers)


class OnnxEncoder:
    """An artifact folder opened for inference: manifest checked, tokenizer and session loaded."""

    kind: Kind

    def __init__(
        self,
        folder: Path,
        *,
        threads: int = 2,
        spinning: bool = True,
        device: Device = "cpu",
        check_hashes: bool = True,
    ) -> None:
        self.folder = folder
        self.manifest: Manifest = open_checked(folder, self.kind, check_hashes=check_hashes)
        self.tokenizer = load_tokenizer(folder, max_length=self.manifest.max_length)
        self.pad_id = pad_token_id(folder)
        self.session = create_session(
            folder / MODEL_NAME, threads=threads, device=device, spinning=spinning
        )
        self.input_names = tuple(node.name for node in self.session.get_inputs())
        self.output_name = self.session.get_outputs()[0].name

    def _run(self, batch: TokenBatch) -> NDArray[np.float32]:
        outputs = self.session.run([self.output_name], batch.feed(self.input_names))
        return np.asarray(outputs[0], dtype=np.float32)


class BiEncoder(OnnxEncoder):
    """Embeds texts into unit (or raw, per the manifest) sentence vectors."""

    kind: Kind = "bi-encoder"

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        return pad_encodings(self.tokenizer.encode_batch(list(texts)), pad_id=self.pad_id)

    def forward(self, batch: TokenBatch) -> NDArray[np.float32]:
        pooling = self.manifest.pooling
        if pooling is None:
            raise ArtifactError("bi-encoder manifest has no pooling section")
        hidden = self._run(batch)
        return pool(hidden, batch.attention_mask, mode=pooling.mode, normalize=pooling.normalize)

    def embed(
        self, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> NDArray[np.float32]:
        return self.encode(texts, batch_size=batch_size)[0]

    def encode(
        self, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """Vectors, and which texts were cut to ``max_length`` before embedding."""
        return self.encode_counted(texts, batch_size=batch_size)[:2]

    def encode_counted(
        self, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_], int]:
        """``encode``, and the tokens the model read (special tokens included), which the
        OpenAI and Jina shapes report as usage."""
        vectors = [np.zeros((0, self.dimension), dtype=np.float32)]
        truncated = [np.zeros(0, dtype=np.bool_)]
        tokens = 0
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start : start + batch_size])
            vectors.append(self.forward(batch))
            truncated.append(batch.truncated)
            tokens += int(batch.attention_mask.sum())
        return np.concatenate(vectors), np.concatenate(truncated), tokens

    @property
    def dimension(self) -> int:
        return int(self.session.get_outputs()[0].shape[-1])


class CrossEncoder(OnnxEncoder):
    """Scores (query, document) pairs; higher means more relevant. Scores are raw logits."""

    kind: Kind = "cross-encoder"

    def tokenize_pairs(self, query: str, documents: Sequence[str]) -> TokenBatch:
        encodings = self.tokenizer.encode_batch([(query, document) for document in documents])
        return pad_encodings(encodings, pad_id=self.pad_id)

    def forward(self, batch: TokenBatch) -> NDArray[np.float32]:
        return self._run(batch).reshape(len(batch), -1)[:, 0]

    def score(
        self, query: str, documents: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> NDArray[np.float32]:
        parts = [
            self.forward(self.tokenize_pairs(query, documents[start : start + batch_size]))
            for start in range(0, len(documents), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def pool(
    hidden: NDArray[np.float32],
    mask: NDArray[np.int64],
    *,
    mode: str,
    normalize: bool,
) -> NDArray[np.float32]:
    """Pools token states (n, length, dim) the way sentence-transformers' Pooling module does."""
    weights = mask[:, :, None].astype(np.float32)
    if mode == "mean":
        counts = np.maximum(weights.sum(axis=1), np.float32(1e-9))
        vectors = (hidden * weights).sum(axis=1) / counts
    elif mode == "cls":
        vectors = hidden[:, 0]
    elif mode == "max":
        vectors = np.where(weights > 0, hidden, np.float32(-1e9)).max(axis=1)
    elif mode == "lasttoken":
        last = np.maximum(mask.sum(axis=1) - 1, 0)
        vectors = hidden[np.arange(hidden.shape[0]), last]
    else:
        raise ArtifactError(f"unknown pooling mode {mode!r}")
    vectors = vectors.astype(np.float32, copy=False)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.float32(1e-12))
    return np.asarray(vectors, dtype=np.float32)
