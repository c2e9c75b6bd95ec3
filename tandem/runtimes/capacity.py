"""Learns how large a reranker batch a device wants, by timing it at start-up.

A GPU's throughput rises with batch size until its cores are full, then flattens; past that a
larger batch only makes each run (and every caller's wait) longer. So the cap is the smallest
batch within ``TOLERANCE`` of the best tokens/s seen, probed at doubling sizes up to a ceiling
or the first out-of-memory error. On a CPU the fixed default (1,024 tokens) was measured
instead, and nothing is probed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tandem.runtimes import Runtime
from tandem.runtimes.pytorch import bucket_shapes
from tandem.tokens import TokenBatch

log = logging.getLogger(__name__)

TOLERANCE = 0.9
ROW_TOKENS = 256  # a RAG24 pair is ~250 tokens
FIRST_ROWS = 4
CEILING_TOKENS = 131_072
REPEATS = 3


def probe_batch(rows: int, width: int, *, vocabulary: int = 1000) -> TokenBatch:
    """Full rows of ordinary token ids: the cost of a batch depends on its shape alone."""
    generator = np.random.default_rng(rows)
    ids = generator.integers(1000, 1000 + vocabulary, size=(rows, width), dtype=np.int64)
    ones = np.ones((rows, width), dtype=np.int64)
    return TokenBatch(ids, ones, np.zeros_like(ones), np.zeros(rows, dtype=np.bool_))


# Shapes run once at start-up: small, typical and long. The first run of a runtime pays for
# lazy initialisation (OpenVINO prepares kernels per new shape, CUDA loads its modules); left
# to the first calls, that cost would teach the batcher's cost model that nothing fits a
# 100 ms budget.
WARM_UP_SHAPES = ((1, 16), (4, 128), (8, 256))


def warm_up(runtime: Runtime) -> None:
    for rows, width in WARM_UP_SHAPES:
        runtime.run(probe_batch(rows, width))


def warm_gpu_shapes(runtime: Runtime, *, max_rows: int, max_width: int, max_tokens: int) -> None:
    """Runs every shape a batch within these caps is padded to, where the runtime pads to
    bucketed shapes (PyTorch on a GPU: see ``tandem.runtimes.pytorch``), so no call pays for
    a shape's first run. Other runtimes run each batch as it comes: nothing to warm."""
    if runtime.backend != "torch" or not runtime.device.is_gpu:
        return
    started = time.perf_counter()
    shapes = bucket_shapes(max_rows, max_width, max_tokens)
    for rows, width in shapes:
        batch = probe_batch(rows, width)
        runtime.run(batch)
        # Served batches are padded: a mask takes another attention kernel than none does.
        batch.attention_mask[-1, max(width // 2, 1) :] = 0
        runtime.run(batch)
    log.info(
        "GPU shapes warmed: %d in %.1f s (%s)",
        len(shapes), time.perf_counter() - started, runtime.device,
    )  # fmt: skip


@dataclass(frozen=True)
class BatchProfile:
    """What the probe learned: the batch cap, and each probed batch's seconds per run (by its
    padded tokens), from which a batcher's cost model starts instead of a CPU's guess."""

    max_batch_tokens: int
    seconds: dict[int, float]


def learn_batch_profile(
    runtime: Runtime,
    *,
    row_tokens: int = ROW_TOKENS,
    ceiling: int = CEILING_TOKENS,
    clock: Callable[[], float] = time.perf_counter,
) -> BatchProfile:
    """Padded tokens per batch for ``runtime`` (see the module's docstring), and the runs'
    times."""
    seconds: dict[int, float] = {}
    rows = FIRST_ROWS
    while rows * row_tokens <= ceiling:
        batch = probe_batch(rows, row_tokens)
        try:
            runtime.run(batch)  # the first run of a shape pays for kernel selection
            started = clock()
            for _ in range(REPEATS):
                runtime.run(batch)
            elapsed = max(clock() - started, 1e-9)
        except (MemoryError, RuntimeError) as exc:  # torch's OutOfMemoryError is a RuntimeError
            log.info("batch probe stopped at %d tokens: %s", rows * row_tokens, exc)
            break
        seconds[rows * row_tokens] = elapsed / REPEATS
        rows *= 2
    rates = {tokens: tokens / run for tokens, run in seconds.items()}
    return BatchProfile(choose_cap(rates, fallback=FIRST_ROWS * row_tokens), seconds)


def choose_cap(rates: dict[int, float], *, fallback: int) -> int:
    """The smallest batch (tokens) whose tokens/s is within ``TOLERANCE`` of the best."""
    if not rates:
        return fallback
    best = max(rates.values())
    return min(tokens for tokens, rate in rates.items() if rate >= TOLERANCE * best)
