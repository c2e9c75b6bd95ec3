"""The FP32 PyTorch reference for parity: sentence-transformers, as the seeds ran it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from tandem.artifact import Role


def _torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def embed(
    model_path: Path,
    texts: Sequence[str],
    *,
    max_length: int,
    threads: int = 2,
    prompt: str | None = None,
    role: Role | None = None,
) -> NDArray[np.float32]:
    """Sentence embeddings from SentenceTransformer in FP32 on the CPU. ``prompt``: the text
    put before each ("" for none); else ``role`` picks ``encode_query`` or
    ``encode_document`` (each with the checkpoint's prompt for it); else ``encode``."""
    import torch
    from sentence_transformers import SentenceTransformer

    _torch_threads(threads)
    model = SentenceTransformer(
        str(model_path), device="cpu", model_kwargs={"torch_dtype": torch.float32}
    )
    model.max_seq_length = max_length
    encode = model.encode
    if prompt is None and role is not None:
        encode = model.encode_query if role == "query" else model.encode_document
    vectors = encode(
        list(texts), batch_size=32, convert_to_numpy=True, show_progress_bar=False, prompt=prompt
    )
    return np.asarray(vectors, dtype=np.float32)


def score(
    model_path: Path,
    cases: Sequence[tuple[str, Sequence[str]]],
    *,
    max_length: int,
    threads: int = 2,
) -> list[NDArray[np.float32]]:
    """Raw relevance logits from CrossEncoder.predict in FP32 on the CPU, one array per query."""
    import torch
    from sentence_transformers import CrossEncoder

    _torch_threads(threads)
    model = CrossEncoder(
        str(model_path),
        device="cpu",
        max_length=max_length,
        model_kwargs={"torch_dtype": torch.float32},
        activation_fn=torch.nn.Identity(),
    )
    return [
        np.asarray(
            model.predict([(query, doc) for doc in docs], batch_size=32, show_progress_bar=False),
            dtype=np.float32,
        )
        for query, docs in cases
    ]
