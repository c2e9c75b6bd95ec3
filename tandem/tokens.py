"""Model inputs as padded arrays: the tokenizer as an artifact ships it, and batches of ids.

Every runtime (onnxruntime, OpenVINO, PyTorch) reads the same ``TokenBatch``, so tokenizing
stays independent of which one runs the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tokenizers import Encoding, Tokenizer

from tandem.artifact import ArtifactError


@dataclass(frozen=True)
class TokenBatch:
    """Padded model inputs for one session run; ``truncated`` marks inputs that were cut.
    Pooling leaves out the positions before ``pooled_from`` (a bi-encoder's prompt, where
    its Pooling excludes it); the model reads them all."""

    input_ids: NDArray[np.int64]
    attention_mask: NDArray[np.int64]
    token_type_ids: NDArray[np.int64]
    truncated: NDArray[np.bool_]
    pooled_from: int = 0

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


def crowding_prompt(
    whole: Tokenizer, prompts: Mapping[str, str], *, max_length: int
) -> tuple[str, int] | None:
    """The first prompt (by name) whose tokens leave no room for text within ``max_length``
    once the special tokens are placed, with its token count; None when every one fits.
    ``whole`` must not truncate, or a long prompt would be counted short."""
    room = max_length - len(whole.encode("").ids)
    for name, text in sorted(prompts.items()):
        tokens = len(whole.encode(text, add_special_tokens=False).ids)
        if tokens >= room:
            return name, tokens
    return None


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


def window_starts(length: int, width: int, *, overlap: int, cap: int) -> tuple[list[int], bool]:
    """Where overlapping windows of ``width`` tokens start in a text of ``length`` tokens,
    and whether the text goes on past the last of them (more than ``cap`` were needed).

    Each window starts ``overlap`` tokens (at most half a window) before the previous one
    ends, and the last one ends at the text's end, so every window is full width: a short
    tail window would stand for a few tokens alone. The reranker's windows and the
    bi-encoder's passages are both cut this way."""
    if length <= width or cap <= 1 or width <= 0:
        return [0], length > width
    stride = max(width - overlap, (width + 1) // 2)
    needed = 1 + math.ceil((length - width) / stride)
    used = min(needed, cap)
    return [min(index * stride, length - width) for index in range(used)], used < needed
