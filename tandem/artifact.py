"""The exported model folder as a self-describing artifact: its manifest and the checks on it.

An artifact folder holds the model graph (``model.onnx`` for onnxruntime, or
``openvino_model.xml`` and ``.bin`` for OpenVINO), the tokenizer and config files, optionally
the checkpoint itself (``checkpoint/``, for the PyTorch backend on a GPU), and
``manifest.json``. The manifest names every file with its sha256, so a server can refuse a
folder whose files no longer match what was exported and verified.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from tandem.durable import sha256_file, write_text_atomically
from tandem.matryoshka import Matryoshka

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
OPENVINO_XML = "openvino_model.xml"
OPENVINO_BIN = "openvino_model.bin"
# The unquantized graph an OpenVINO INT8 export keeps beside the INT8 one, for CPUs that run
# it in bf16 as fast as the INT8 graph (--cpu-precision).
OPENVINO_UNQUANTIZED_XML = "openvino_model_unquantized.xml"
OPENVINO_UNQUANTIZED_BIN = "openvino_model_unquantized.bin"
CHECKPOINT_DIR = "checkpoint"
FORMAT_VERSION = 1

Kind = Literal["bi-encoder", "cross-encoder"]
Precision = Literal["int8", "fp16", "fp32"]
PoolingMode = Literal["mean", "cls", "max", "lasttoken"]
# What a bi-encoder's input is for: sentence-transformers' encode_query and encode_document.
Role = Literal["query", "document"]
# Which runtime the artifact's graph is for; the checkpoint, when kept, serves PyTorch.
GraphRuntime = Literal["onnxruntime", "openvino"]

KINDS: tuple[Kind, ...] = ("bi-encoder", "cross-encoder")
PRECISIONS: tuple[Precision, ...] = ("int8", "fp16", "fp32")
POOLING_MODES: tuple[PoolingMode, ...] = ("mean", "cls", "max", "lasttoken")
GRAPH_RUNTIMES: tuple[GraphRuntime, ...] = ("onnxruntime", "openvino")
# The prompt names encode_query and encode_document look for, in their order of preference.
ROLE_PROMPT_NAMES: dict[Role, tuple[str, ...]] = {
    "query": ("query",),
    "document": ("document", "passage", "corpus"),
}
GRAPH_FILES: dict[GraphRuntime, tuple[str, ...]] = {
    "onnxruntime": (MODEL_NAME,),
    "openvino": (OPENVINO_XML, OPENVINO_BIN),
}


class ArtifactError(Exception):
    """The folder is not a usable Tandem artifact (missing, malformed or altered files)."""


class UnknownPrompt(ValueError):
    """A caller named a prompt the bi-encoder's artifact does not carry."""


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence vector; ``applied_in`` says who does it."""

    mode: PoolingMode
    normalize: bool
    applied_in: Literal["runtime"] = "runtime"
    # sentence-transformers' Pooling(include_prompt=False): the prompt's tokens (and the
    # leading special token) are left out of the pool, though the model still reads them.
    include_prompt: bool = True


@dataclass(frozen=True)
class Prompts:
    """Text sentence-transformers puts before an input, by name, as the checkpoint's
    ``config_sentence_transformers.json`` (or the export's ``--prompt``) sets it.

    Models such as e5, bge, nomic-embed and arctic-embed were trained with a query prompt
    (and some with a document one); embedding without it costs them recall."""

    texts: dict[str, str] = field(default_factory=dict)
    default_name: str | None = None

    def resolve(self, name: str | None = None, *, role: Role | None = None) -> str | None:
        """The name of the prompt that applies, picked as sentence-transformers does: the one
        named; else the role's (encode_query's ``query``; encode_document's first of
        ``document``, ``passage``, ``corpus``); else the default; else None.

        sentence-transformers 5.7 loads an empty ``document`` placeholder into every model,
        so its encode_document never reaches ``passage``; Tandem keeps the order its
        docstring gives, which configs shaped like e5's (``query``, ``passage``) need."""
        if name is not None:
            if name not in self.texts:
                raise UnknownPrompt(self.unknown(name))
            return name
        for candidate in ROLE_PROMPT_NAMES[role] if role is not None else ():
            if candidate in self.texts:
                return candidate
        return self.default_name if self.default_name in self.texts else None

    def text(self, name: str | None = None, *, role: Role | None = None) -> str:
        """The text of the prompt that applies; empty where none does."""
        chosen = self.resolve(name, role=role)
        return "" if chosen is None else self.texts[chosen]

    def chosen_names(self) -> dict[str, str]:
        """The names Info reports: the default, and the ones Search (a query) and Upsert (a
        document) use; "" where none applies."""
        return {
            "default_prompt_name": self.default_name or "",
            "query_prompt_name": self.resolve(role="query") or "",
            "document_prompt_name": self.resolve(role="document") or "",
        }

    def unknown(self, name: str) -> str:
        if not self.texts:
            return (
                f"prompt {name!r}: this bi-encoder's artifact carries no prompts; leave the "
                "prompt name out (or export the model with --prompt NAME=TEXT)"
            )
        return (
            f"prompt {name!r} is not one of this bi-encoder's prompts "
            f"({', '.join(sorted(self.texts))}); send one of those, or leave it out"
        )


@dataclass(frozen=True)
class Parity:
    """Agreement of the artifact with the FP32 PyTorch reference, as measured at export."""

    passed: bool
    metrics: dict[str, float]
    thresholds: dict[str, float]
    reference: str
    texts: str
    n_texts: int
    n_queries: int
    measured_at: str


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to run, trust and reproduce one exported encoder."""

    kind: Kind
    source: str
    architecture: str
    model_type: str
    precision: Precision
    preset: str | None
    max_length: int
    inputs: tuple[str, ...]
    opset: int
    pooling: Pooling | None
    quantization: dict[str, Any]
    versions: dict[str, str]
    files: dict[str, str]
    created_at: str
    parity: Parity | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    runtime: GraphRuntime = "onnxruntime"
    # The checkpoint's folder inside the artifact (fp16 safetensors), or None when not kept.
    checkpoint: str | None = None
    prompts: Prompts = field(default_factory=Prompts)
    # The prefix sizes a bi-encoder was trained to be cut to; None: not a Matryoshka model.
    matryoshka: Matryoshka | None = None

    @property
    def verified(self) -> bool:
        return self.parity is not None and self.parity.passed

    @property
    def graph_files(self) -> tuple[str, ...]:
        """The graph's files, the weights last; an OpenVINO INT8 graph's unquantized one first."""
        if self.has_unquantized_graph:
            return (OPENVINO_UNQUANTIZED_XML, OPENVINO_UNQUANTIZED_BIN, *GRAPH_FILES[self.runtime])
        return GRAPH_FILES[self.runtime]

    @property
    def has_unquantized_graph(self) -> bool:
        # Exports before it was kept have none: they serve their INT8 graph only.
        return OPENVINO_UNQUANTIZED_XML in self.files

    @property
    def weights_sha256(self) -> str:
        """The hash of the file holding the graph's weights: what a collection records as
        the bi-encoder its vectors came from (``model.onnx``, or OpenVINO's ``.bin``)."""
        return self.files.get(self.graph_files[-1], "")

    def with_parity(self, parity: Parity) -> Manifest:
        return replace(self, parity=parity)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"manifest.json is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ArtifactError("manifest.json must hold a JSON object")
        return _manifest_from_dict(raw)


def _manifest_from_dict(raw: dict[str, Any]) -> Manifest:
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"manifest format_version {version!r} is not supported (this Tandem reads "
            f"{FORMAT_VERSION}); re-export the model with this version"
        )
    try:
        kind = raw["kind"]
        precision = raw["precision"]
        if kind not in KINDS:
            raise ArtifactError(f"manifest kind {kind!r} is not one of {', '.join(KINDS)}")
        if precision not in PRECISIONS:
            raise ArtifactError(f"manifest precision {precision!r} is not one of {PRECISIONS}")
        pooling_raw = raw.get("pooling")
        pooling = None
        if pooling_raw is not None:
            if pooling_raw["mode"] not in POOLING_MODES:
                raise ArtifactError(f"manifest pooling mode {pooling_raw['mode']!r} is unknown")
            pooling = Pooling(
                mode=pooling_raw["mode"],
                normalize=bool(pooling_raw["normalize"]),
                include_prompt=bool(pooling_raw.get("include_prompt", True)),
            )
        runtime = raw.get("runtime", "onnxruntime")
        if runtime not in GRAPH_RUNTIMES:
            raise ArtifactError(f"manifest runtime {runtime!r} is not one of {GRAPH_RUNTIMES}")
        checkpoint = raw.get("checkpoint")
        parity_raw = raw.get("parity")
        parity = Parity(**parity_raw) if parity_raw is not None else None
        return Manifest(
            kind=cast(Kind, kind),
            source=str(raw["source"]),
            architecture=str(raw["architecture"]),
            model_type=str(raw["model_type"]),
            precision=cast(Precision, precision),
            preset=raw["preset"],
            max_length=int(raw["max_length"]),
            inputs=tuple(raw["inputs"]),
            opset=int(raw["opset"]),
            pooling=pooling,
            quantization=dict(raw["quantization"]),
            versions=dict(raw["versions"]),
            files=dict(raw["files"]),
            created_at=str(raw["created_at"]),
            parity=parity,
            extra=dict(raw.get("extra", {})),
            runtime=cast(GraphRuntime, runtime),
            checkpoint=None if checkpoint is None else str(checkpoint),
            prompts=_prompts_from_dict(raw.get("prompts")),
            matryoshka=_matryoshka_from_dict(raw.get("matryoshka")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest.json is missing or has a malformed field: {exc}") from exc


def _prompts_from_dict(raw: Any) -> Prompts:
    """Manifests written before prompts existed have none."""
    if raw is None:
        return Prompts()
    texts = raw.get("texts", {})
    default = raw.get("default_name")
    if not isinstance(texts, dict) or not all(
        isinstance(name, str) and isinstance(text, str) for name, text in texts.items()
    ):
        raise ArtifactError("manifest prompts.texts must map each prompt name to its text")
    if default is not None and default not in texts:
        raise ArtifactError(f"manifest prompts.default_name {default!r} names no prompt")
    return Prompts(texts=dict(texts), default_name=default)


def _matryoshka_from_dict(raw: Any) -> Matryoshka | None:
    """Manifests written before Matryoshka sizes existed have none."""
    if raw is None:
        return None
    sizes = raw.get("sizes")
    if sizes is None:
        return Matryoshka()
    if not isinstance(sizes, list) or not all(isinstance(size, int) for size in sizes):
        raise ArtifactError("manifest matryoshka.sizes must be a list of integers, or null")
    return Matryoshka(tuple(sizes))


def hash_folder(folder: Path) -> dict[str, str]:
    """Hashes every file in ``folder`` except the manifest itself, by relative name."""
    return {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Replaces the manifest atomically, so a reader never sees half of one."""
    write_text_atomically(folder / MANIFEST_NAME, manifest.to_json())


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}: it is not a Tandem export")
    return Manifest.from_json(path.read_text(encoding="utf-8"))


def open_checked(
    folder: Path, kind: Kind, *, check_hashes: bool = True, unread: Sequence[str] = ()
) -> Manifest:
    """Reads the manifest of a ``kind`` artifact, refusing another kind or altered files.

    ``unread`` names files (or folders, ending in ``/``) the caller will not open: they may be
    absent, as when only the checkpoint travels to a GPU machine, and are not hashed.
    """
    manifest = read_manifest(folder)
    if manifest.kind != kind:
        raise ArtifactError(
            f"{folder} holds a {manifest.kind}, not a {kind}; pass the {kind} export instead"
        )
    if check_hashes:
        check_files(folder, manifest, unread=unread)
    return manifest


def check_files(folder: Path, manifest: Manifest, *, unread: Sequence[str] = ()) -> None:
    """Raises if any file the manifest names is missing or differs from what was exported."""
    for name, expected in sorted(manifest.files.items()):
        if any(name == skipped or name.startswith(skipped.rstrip("/") + "/") for skipped in unread):
            continue
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{path} does not match its manifest hash (sha256 {actual[:12]}… != "
                f"{expected[:12]}…): the file was altered after export; re-export it"
            )
