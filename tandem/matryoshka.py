"""Matryoshka embeddings: a vector's first ``n`` components served as a smaller vector.

A model trained with Matryoshka representation learning (nomic-embed v1.5, arctic-embed
v1.5 and v2, mxbai-embed-large, OpenAI's text-embedding-3) front-loads what it knows, so a
prefix of its vector still ranks nearly as well at a fraction of the storage. A model trained
without it spreads meaning over every component, and a prefix ranks worse: all-MiniLM-L6-v2
cut to 128 of its 384 components drops from 0.976 to 0.953 Recall@100 on RAG24 (``tandem
bench dimensions``, benchmarks/RESULTS.md). So, as vLLM does, a bi-encoder serves a prefix
only where its export says it was trained for one (``config.json``'s
``matryoshka_dimensions`` or ``is_matryoshka``, or ``--matryoshka-dimensions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


class UnsupportedDimensions(ValueError):
    """A requested vector size this bi-encoder does not serve; the message says which it does."""


@dataclass(frozen=True)
class Matryoshka:
    """The prefix sizes a bi-encoder was trained to be cut to; ``sizes`` None: any size up
    to its dimension (``is_matryoshka`` with no list)."""

    sizes: tuple[int, ...] | None = None

    def describe(self) -> str:
        return "any size" if self.sizes is None else ", ".join(map(str, self.sizes))


def advertised(matryoshka: Matryoshka | None) -> tuple[list[int], bool]:
    """What Info says: the sizes listed, and whether any size is served."""
    if matryoshka is None:
        return [], False
    return list(matryoshka.sizes or ()), matryoshka.sizes is None


def parse_sizes(text: str) -> Matryoshka:
    """``--matryoshka-dimensions``: ``any``, or sizes separated by commas (``512,256,128``)."""
    if text.strip().lower() == "any":
        return Matryoshka()
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"--matryoshka-dimensions {text!r}: give sizes separated by commas (512,256,128) "
            "or 'any'"
        ) from None
    if not sizes:
        raise ValueError("--matryoshka-dimensions is empty: give sizes (512,256,128) or 'any'")
    return Matryoshka(tuple(sorted(set(sizes), reverse=True)))


def check_sizes(matryoshka: Matryoshka, dimension: int) -> None:
    """Refuses sizes a vector of ``dimension`` components cannot be cut to."""
    wrong = [size for size in matryoshka.sizes or () if not 1 <= size <= dimension]
    if wrong:
        raise ValueError(
            f"Matryoshka sizes {wrong} are outside 1..{dimension}, this model's dimension"
        )


def served_dimension(
    requested: int | None, dimension: int, matryoshka: Matryoshka | None, *,
    field: str = "dimensions",
) -> int:  # fmt: skip
    """The size an Embed answers with: the model's unless a smaller one is asked for and the
    model was trained to be cut there. ``field``: what the caller's API names the size."""
    if requested is None or requested == dimension:
        return dimension
    if not 1 <= requested < dimension:
        raise UnsupportedDimensions(
            f"{field}={requested}: this model's embeddings have {dimension} components; "
            f"ask for 1 to {dimension}, or leave {field} out"
        )
    if matryoshka is None:
        raise UnsupportedDimensions(
            f"{field}={requested}: this bi-encoder was not exported as a Matryoshka model, "
            f"and a prefix of a vector it was not trained to cut ranks worse; leave {field} "
            f"out for its {dimension}, or re-export a model trained for it with "
            "--matryoshka-dimensions"
        )
    if matryoshka.sizes is not None and requested not in matryoshka.sizes:
        raise UnsupportedDimensions(
            f"{field}={requested}: this bi-encoder was trained to be cut to "
            f"{matryoshka.describe()} (or its full {dimension}); ask for one of those"
        )
    return requested


def truncated(vectors: NDArray[np.float32], size: int, *, normalize: bool) -> NDArray[np.float32]:
    """Each row's first ``size`` components, scaled back to unit length where the model's
    vectors are unit length (as TEI and OpenAI serve a shortened vector, so cosine and dot
    product still agree)."""
    if size >= vectors.shape[-1]:
        return vectors
    prefix = np.ascontiguousarray(vectors[..., :size], dtype=np.float32)
    return unit_length(prefix) if normalize else prefix


def unit_length(vectors: NDArray[np.float32]) -> NDArray[np.float32]:
    """Each row scaled to unit length; a zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    unit = np.zeros_like(vectors, dtype=np.float32)
    np.divide(vectors, norms, out=unit, where=norms > 0)
    return unit
