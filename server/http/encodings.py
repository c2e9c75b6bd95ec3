"""Embeddings in the encodings the ecosystem's clients ask for: float32 as base64 (OpenAI,
Cohere), and Cohere's ``embedding_types``.

Cohere's int8 comes from scales it calibrated per model, which no client can see; here it is
a unit vector's components times 127, rounded: the scale the usearch index gives this
server's own vectors (it truncates where this rounds), so only unit vectors are given it.
Binary is the sign of each component packed eight to a byte, most significant first, as
sentence-transformers' ``quantize_embeddings`` packs it (``binary`` is ``ubinary`` minus
128, as a signed byte).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from numpy.typing import NDArray

INT8_SCALE = 127
BINARY_OFFSET = 128
UNIT_TYPES = frozenset({"int8", "uint8"})


def base64_floats(vector: NDArray[np.float32]) -> str:
    """The vector's float32 bytes, little-endian, base64-encoded."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def encoded(vectors: NDArray[np.float32], kind: str) -> list[Any]:
    """``vectors`` (one row each) as Cohere's ``kind``: a list per vector, or a string."""
    if kind == "float":
        return [[float(value) for value in row] for row in vectors]
    if kind == "base64":
        return [base64_floats(row) for row in vectors]
    if kind in UNIT_TYPES:
        scaled = np.clip(np.rint(vectors * INT8_SCALE), -INT8_SCALE - 1, INT8_SCALE)
        if kind == "uint8":
            scaled = scaled + BINARY_OFFSET
        return scaled.astype(np.int64).tolist()  # type: ignore[no-any-return]
    if kind in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1).astype(np.int64)
        if kind == "binary":
            packed = packed - BINARY_OFFSET
        return packed.tolist()  # type: ignore[no-any-return]
    raise ValueError(f"unknown embedding type {kind!r}")
