"""Runs exported encoders: tokenize, run the model on its runtime, pool. No torch here.

Each encoder splits its work into ``tokenize -> forward`` so a batcher can tokenize ahead of
the model and cap batches by padded tokens (the seam Infinity's backends use). Which runtime
runs the model (onnxruntime, OpenVINO or PyTorch) is chosen in ``tandem.runtimes``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer

from tandem.artifact import ArtifactError, Kind, Manifest, Role, check_files, open_checked
from tandem.devices import BackendChoice, CpuPrecision, DeviceSpec, TorchDtype
from tandem.matryoshka import Matryoshka
from tandem.runtimes import Runtime, choose_backend, open_runtime, unread_files
from tandem.tokens import (
    TokenBatch,
    crowding_prompt,
    load_tokenizer,
    pad_encodings,
    pad_rows,
    pad_token_id,
    window_starts,
)

__all__ = [
    "BiEncoder",
    "CrossEncoder",
    "TokenBatch",
    "load_tokenizer",
    "pad_encodings",
    "pad_rows",
    "pad_token_id",
]

# Pairs per model run when a caller hands over more: batches whose activations fit in L3
# (10-20 pairs of ~110 tokens) run 10-20% faster than one batch of 100 on these cores.
DEFAULT_BATCH_SIZE = 16


class Encoder:
    """An artifact folder opened for inference: manifest checked, tokenizer and model loaded.

    Only the files the chosen runtime reads are hashed, so an artifact may travel without the
    graph another runtime would use (a GPU machine needs only the checkpoint).
    """

    kind: Kind

    def __init__(
        self,
        folder: Path,
        *,
        threads: int = 2,
        spinning: bool = True,
        device: str | DeviceSpec = "cpu",
        backend: BackendChoice = "auto",
        torch_dtype: TorchDtype = "auto",
        check_hashes: bool = True,
        cpu_precision: CpuPrecision = "f32",
    ) -> None:
        self.folder = folder
        spec = device if isinstance(device, DeviceSpec) else DeviceSpec.parse(device)
        self.manifest: Manifest = open_checked(folder, self.kind, check_hashes=False)
        chosen = choose_backend(self.manifest, backend, spec)
        if check_hashes:
            check_files(folder, self.manifest, unread=unread_files(self.manifest, chosen))
        self.tokenizer = load_tokenizer(folder, max_length=self.manifest.max_length)
        self.pad_id = pad_token_id(folder)
        self.runtime: Runtime = open_runtime(
            folder,
            self.manifest,
            chosen,
            device=spec,
            threads=threads,
            spinning=spinning,
            torch_dtype=torch_dtype,
            cpu_precision=cpu_precision,
        )
        self.input_names = self.runtime.input_names


@dataclass(frozen=True)
class PassageVectors:
    """Each text's passage vectors (``passages[i]`` is ``(n_i, dimension)``, ``n_i >= 1``), and
    which texts went on past the last passage embedded."""

    passages: list[NDArray[np.float32]]
    truncated: NDArray[np.bool_]


class BiEncoder(Encoder):
    """Embeds texts into unit (or raw, per the manifest) sentence vectors."""

    kind: Kind = "bi-encoder"

    def __init__(self, folder: Path, **options: Any) -> None:
        super().__init__(folder, **options)
        # Whole texts, for the token offsets that cut a long one into passages.
        self.whole = Tokenizer.from_str(self.tokenizer.to_str())
        self.whole.no_truncation()
        self.width = self.manifest.max_length - len(self.tokenizer.encode("").ids)
        self.prompts = self.manifest.prompts
        crowded = crowding_prompt(
            self.whole, self.prompts.texts, max_length=self.manifest.max_length
        )
        if crowded is not None:
            name, tokens = crowded
            raise ArtifactError(
                f"prompt {name!r} takes {tokens} of the {self.manifest.max_length} tokens "
                "this bi-encoder reads, leaving none for the text; export it with a larger "
                "--max-length or a shorter prompt"
            )

    def prompt(self, name: str | None = None, *, role: Role | None = None) -> str:
        """The text put before each input: the prompt named, else the role's, else the
        default (sentence-transformers' choice; ``Prompts.resolve``); empty where none
        applies. Raises ``UnknownPrompt`` for a name the artifact does not carry."""
        return self.prompts.text(name, role=role)

    @property
    def fingerprint(self) -> str:
        """What a collection records as the source of its vectors: the weights' hash, and the
        document prompt where one applies (the same weights with another prompt place
        documents elsewhere)."""
        prompt = self.prompt(role="document")
        weights = self.manifest.weights_sha256
        if not prompt:
            return weights
        pooling = self.manifest.pooling
        pooled = pooling is None or pooling.include_prompt
        spec = f"{prompt}|include_prompt={pooled}".encode()
        return f"{weights}+prompt:{hashlib.sha256(spec).hexdigest()[:16]}"

    def _prompt_tokens(self, prompt: str) -> int:
        return len(self.whole.encode(prompt, add_special_tokens=False).ids) if prompt else 0

    def _pooled_from(self, prompt: str) -> int:
        """Where pooling starts: 0, or where sentence-transformers' Pooling with
        include_prompt=False starts it, just past the prompt's tokens and the special token
        before them (its ``prompt_length``: the prompt tokenized alone, less a trailing
        special token)."""
        pooling = self.manifest.pooling
        if not prompt or pooling is None or pooling.include_prompt:
            return 0
        alone = self.tokenizer.encode(prompt)
        trailing_special = bool(alone.special_tokens_mask and alone.special_tokens_mask[-1])
        return len(alone.ids) - int(trailing_special)

    def encode_passages(
        self,
        texts: Sequence[str],
        *,
        max_passages: int,
        overlap: int,
        batch_size: int = DEFAULT_BATCH_SIZE,
        prompt: str | None = None,
    ) -> PassageVectors:
        """Each text as up to ``max_passages`` overlapping windows of the model's length
        less the prompt's (``tokens.window_starts``: each shares ``overlap`` tokens with the
        one before, and the last ends at the text's end), embedded one by one with the
        prompt before each. The first is ``encode``'s input, so a text that fits one window
        gets ``encode``'s vector. ``prompt``: as ``tokenize`` takes it.

        Full-width windows ranked RAG24 better than the tokenizer's own overflow (Hugging
        Face's ``return_overflowing_tokens``), whose last window is a short tail: nDCG@10
        +0.008 over 143 held-out topics (benchmarks/RESULTS.md)."""
        prompt = self.prompt() if prompt is None else prompt
        width = self.width - self._prompt_tokens(prompt)
        groups: list[list[str]] = []
        truncated = np.zeros(len(texts), dtype=np.bool_)
        encodings = self.whole.encode_batch(list(texts), add_special_tokens=False)
        for position, (text, encoding) in enumerate(zip(texts, encodings, strict=True)):
            offsets = encoding.offsets
            starts, truncated[position] = window_starts(
                len(offsets), width, overlap=overlap, cap=max_passages
            )
            later = [
                text[offsets[start][0] : offsets[start + width - 1][1]] for start in starts[1:]
            ]
            groups.append([text, *later])
        flat = [window for windows in groups for window in windows]
        # Batched by length, so that a short document's one window is not padded to the
        # width of a long document's windows.
        order = sorted(range(len(flat)), key=lambda index: len(flat[index]))
        every = np.zeros((len(flat), self.dimension), dtype=np.float32)
        for start in range(0, len(flat), batch_size):
            chosen = order[start : start + batch_size]
            batch = self.tokenize([flat[index] for index in chosen], prompt=prompt)
            every[chosen] = self.forward(batch)
        bounds = np.cumsum([0, *(len(windows) for windows in groups)])
        passages = [every[bounds[i] : bounds[i + 1]] for i in range(len(groups))]
        return PassageVectors(passages, truncated)

    def tokenize(self, texts: Sequence[str], *, prompt: str | None = None) -> TokenBatch:
        """``prompt``: the text put before each input ("" for none); None: the artifact's
        default prompt, as sentence-transformers' ``encode`` applies it. The prompt counts
        against ``max_length``, as there."""
        prompt = self.prompt() if prompt is None else prompt
        inputs = [prompt + text for text in texts] if prompt else list(texts)
        batch = pad_encodings(self.tokenizer.encode_batch(inputs), pad_id=self.pad_id)
        return replace(batch, pooled_from=self._pooled_from(prompt))

    def forward(self, batch: TokenBatch) -> NDArray[np.float32]:
        pooling = self.manifest.pooling
        if pooling is None:
            raise ArtifactError("bi-encoder manifest has no pooling section")
        hidden = self.runtime.run(batch)
        mask = batch.attention_mask
        if batch.pooled_from:
            mask = mask.copy()
            mask[:, : batch.pooled_from] = 0
        return pool(hidden, mask, mode=pooling.mode, normalize=pooling.normalize)

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        prompt: str | None = None,
    ) -> NDArray[np.float32]:
        return self.encode(texts, batch_size=batch_size, prompt=prompt)[0]

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        prompt: str | None = None,
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """Vectors, and which texts were cut to ``max_length`` before embedding."""
        return self.encode_counted(texts, batch_size=batch_size, prompt=prompt)[:2]

    def encode_counted(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        prompt: str | None = None,
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_], int]:
        """``encode``, and the tokens the model read (special tokens and prompt included),
        which the OpenAI, Cohere and Jina shapes report as usage."""
        vectors = [np.zeros((0, self.dimension), dtype=np.float32)]
        truncated = [np.zeros(0, dtype=np.bool_)]
        tokens = 0
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start : start + batch_size], prompt=prompt)
            vectors.append(self.forward(batch))
            truncated.append(batch.truncated)
            tokens += int(batch.attention_mask.sum())
        return np.concatenate(vectors), np.concatenate(truncated), tokens

    @property
    def dimension(self) -> int:
        return self.runtime.output_width

    @property
    def matryoshka(self) -> Matryoshka | None:
        """The prefix sizes this model was trained to be cut to; None: it was not."""
        return self.manifest.matryoshka

    @property
    def normalizes(self) -> bool:
        """Its vectors are unit length (sentence-transformers' Normalize)."""
        pooling = self.manifest.pooling
        return pooling is not None and pooling.normalize


class CrossEncoder(Encoder):
    """Scores (query, document) pairs; higher means more relevant. Scores are raw logits."""

    kind: Kind = "cross-encoder"

    def tokenize_pairs(self, query: str, documents: Sequence[str]) -> TokenBatch:
        encodings = self.tokenizer.encode_batch([(query, document) for document in documents])
        return pad_encodings(encodings, pad_id=self.pad_id)

    def forward(self, batch: TokenBatch) -> NDArray[np.float32]:
        return self.runtime.run(batch).reshape(len(batch), -1)[:, 0]

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
    """Pools token states (n, length, dim) the way sentence-transformers' Pooling module does.

    ``cls`` takes the first token the mask keeps and ``lasttoken`` the last, so a mask that
    leaves out a prompt moves ``cls`` past it, as there."""
    weights = mask[:, :, None].astype(np.float32)
    rows = np.arange(hidden.shape[0])
    if mode == "mean":
        counts = np.maximum(weights.sum(axis=1), np.float32(1e-9))
        vectors = (hidden * weights).sum(axis=1) / counts
    elif mode == "cls":
        vectors = hidden[rows, mask.argmax(axis=1)]
    elif mode == "max":
        vectors = np.where(weights > 0, hidden, np.float32(-1e9)).max(axis=1)
    elif mode == "lasttoken":
        vectors = hidden[rows, mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)]
    else:
        raise ArtifactError(f"unknown pooling mode {mode!r}")
    vectors = vectors.astype(np.float32, copy=False)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.float32(1e-12))
    return np.asarray(vectors, dtype=np.float32)
