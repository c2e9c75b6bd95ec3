"""Finds the checkpoint to export (local folder or hub id) and reads what kind of model it is."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.artifact import Kind, Pooling, PoolingMode, Prompts
from tandem.export.errors import InvalidSource, UnsupportedModel, UsageError
from tandem.matryoshka import Matryoshka, check_sizes

# Families whose ONNX export, tokenizer and transformer fusion we know. Each entry is the
# `model_type` in config.json.
SUPPORTED_MODEL_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "deberta",
    "deberta-v2",
    "distilbert",
    "mpnet",
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_IGNORED = ["*.h5", "*.msgpack", "*.ot", "*.tflite", "onnx/*", "openvino/*", "coreml/*"]
# The sentence-transformers modules Tandem reproduces: the transformer in the graph, pooling
# and normalisation in the runtime. Any other (Dense, Router, ...) changes the vectors.
SERVED_MODULES = (".Transformer", ".Pooling", ".Normalize")
# Cross-encoders rarely set a sentence-transformers max length; 512 is BERT's position limit
# and what CrossEncoder itself uses when the config is silent.
DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint on local disk, with the name the user gave it."""

    spec: str
    path: Path
    from_hub: bool
    config: dict[str, Any]

    @property
    def recorded_name(self) -> str:
        """What the manifest calls the source: the hub id, or the folder's absolute path."""
        return self.spec if self.from_hub else str(self.path.resolve())

    @property
    def revision(self) -> str | None:
        """The hub commit the snapshot came from (its folder is named after it)."""
        return self.path.name if self.from_hub else None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def architecture(self) -> str:
        architectures = self.config.get("architectures") or [""]
        return str(architectures[0])

    @property
    def num_labels(self) -> int:
        if "num_labels" in self.config:
            return int(self.config["num_labels"])
        # transformers' PretrainedConfig default when neither field is present.
        return len(self.config.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})

    @property
    def max_positions(self) -> int:
        return int(self.config.get("max_position_embeddings", DEFAULT_MAX_LENGTH))


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).exists() or not HUB_ID.match(spec)


def resolve(spec: str) -> ModelSource:
    """Returns the checkpoint on disk, fetching a hub id into the Hugging Face cache first."""
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise InvalidSource(f"{spec}: no such folder; pass a model folder or a hub id")
        from_hub = False
    else:
        path = _fetch_from_hub(spec)
        from_hub = True
    if not path.is_dir():
        raise InvalidSource(f"{spec}: not a folder; pass the folder that holds config.json")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidSource(
            f"{spec}: not a Hugging Face model folder (no config.json); pass the folder that "
            "holds config.json, the weights and the tokenizer"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidSource(f"{config_path}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InvalidSource(f"{config_path}: config.json must hold a JSON object")
    if not (path / "tokenizer.json").is_file():
        raise InvalidSource(
            f"{spec}: no tokenizer.json; the server tokenizes with the fast tokenizer, so save "
            "the model with a fast tokenizer (tokenizer.save_pretrained) first"
        )
    return ModelSource(spec=spec, path=path, from_hub=from_hub, config=config)


def _fetch_from_hub(spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with the export extra
        raise InvalidSource(f"{spec}: fetching from the hub needs the export extra") from exc
    try:
        # Other frameworks' weights and ready-made exports are never read; skip their download.
        return Path(snapshot_download(spec, ignore_patterns=HUB_IGNORED))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise InvalidSource(
            f"{spec}: not a local folder, and it could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}); check the id and the network, or pass a local folder"
        ) from exc


def check_kind(source: ModelSource, kind: Kind) -> None:
    """Refuses checkpoints that cannot serve as ``kind``, saying what to do instead."""
    if source.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"{source.spec}: model_type {source.model_type or '(none)'!r} is not supported; "
            f"Tandem exports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if kind == "cross-encoder":
        if not source.architecture.endswith("ForSequenceClassification"):
            raise InvalidSource(
                f"{source.spec}: architecture {source.architecture or '(none)'} has no "
                "sequence-classification head; a cross-encoder needs *ForSequenceClassification "
                "with num_labels=1 (is this a bi-encoder? export it with "
                "`tandem export bi-encoder`)"
            )
        if source.num_labels != 1:
            raise InvalidSource(
                f"{source.spec}: the classification head has num_labels={source.num_labels}; "
                "a reranker needs a single relevance logit (num_labels=1)"
            )
    elif source.architecture.endswith("ForSequenceClassification"):
        raise InvalidSource(
            f"{source.spec}: {source.architecture} is a classifier, not an embedding model "
            "(export it with `tandem export cross-encoder`)"
        )


def sentence_transformers_pooling(source: ModelSource) -> Pooling:
    """Reads the pooling and normalisation that sentence-transformers would apply.

    A plain transformers checkpoint (no modules.json) gets mean pooling with normalisation,
    the convention of the retrieval checkpoints that ship without sentence-transformers files.
    """
    modules_path = source.path / "modules.json"
    if not modules_path.is_file():
        return Pooling(mode="mean", normalize=True)
    modules = json.loads(modules_path.read_text(encoding="utf-8"))
    types = [str(module.get("type", "")) for module in modules]
    unserved = [kind for kind in types if not kind.endswith(SERVED_MODULES)]
    if unserved:
        raise UnsupportedModel(
            f"{source.spec}: modules.json holds {', '.join(unserved)}; Tandem serves a "
            "Transformer followed by Pooling and optionally Normalize, and any other module "
            "would change the vectors"
        )
    normalize = any(kind.endswith(".Normalize") for kind in types)
    mode: PoolingMode = "mean"
    include_prompt = True
    for module in modules:
        if str(module.get("type", "")).endswith(".Pooling"):
            config_path = source.path / module.get("path", "") / "config.json"
            if config_path.is_file():
                config = json.loads(config_path.read_text(encoding="utf-8"))
                mode = _pooling_mode(config)
                include_prompt = bool(config.get("include_prompt", True))
    return Pooling(mode=mode, normalize=normalize, include_prompt=include_prompt)


def sentence_transformers_prompts(
    source: ModelSource, overrides: dict[str, str], default_name: str | None
) -> Prompts:
    """The checkpoint's prompts (``config_sentence_transformers.json``), with the export's
    ``--prompt`` and ``--default-prompt-name`` laid over them."""
    texts: dict[str, str] = {}
    configured_default = None
    config_path = source.path / "config_sentence_transformers.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidSource(f"{config_path} is not valid JSON ({exc})") from exc
        raw = config.get("prompts") or {}
        if not isinstance(raw, dict) or not all(
            isinstance(name, str) and isinstance(text, str) for name, text in raw.items()
        ):
            raise InvalidSource(f"{config_path}: prompts must map each name to a text")
        texts.update(raw)
        configured_default = config.get("default_prompt_name")
    texts.update(overrides)
    chosen_default = default_name if default_name is not None else configured_default
    if chosen_default is not None and chosen_default not in texts:
        raise InvalidSource(
            f"{source.spec}: the default prompt {chosen_default!r} is not one of its prompts "
            f"({', '.join(sorted(texts)) or 'none'}); add it with --prompt "
            f"{chosen_default}=TEXT"
        )
    return Prompts(texts=texts, default_name=chosen_default)


def matryoshka_sizes(source: ModelSource, override: Matryoshka | None) -> Matryoshka | None:
    """The prefix sizes the checkpoint was trained to be cut to, read from ``config.json`` as
    vLLM reads them (``matryoshka_dimensions``; ``is_matryoshka`` alone: any size), unless the
    export's ``--matryoshka-dimensions`` gives them. Few checkpoints say so in their config;
    a model card that does is what the flag is for."""
    chosen = override
    if chosen is None:
        listed = source.config.get("matryoshka_dimensions")
        if isinstance(listed, list) and listed and all(isinstance(n, int) for n in listed):
            chosen = Matryoshka(tuple(sorted(set(listed), reverse=True)))
        elif source.config.get("is_matryoshka") is True:
            chosen = Matryoshka()
    if chosen is None:
        return None
    dimension = source.config.get("hidden_size")
    if isinstance(dimension, int):
        try:
            check_sizes(chosen, dimension)
        except ValueError as exc:
            if override is not None:
                raise UsageError(f"--matryoshka-dimensions: {exc}") from exc
            raise InvalidSource(f"{source.spec}/config.json: {exc}") from exc
    return chosen


def _pooling_mode(config: dict[str, Any]) -> PoolingMode:
    if "pooling_mode" in config:
        named = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "lasttoken"}
        if config["pooling_mode"] in named:
            return named[config["pooling_mode"]]  # type: ignore[return-value]
    chosen = [
        mode
        for flag, mode in (
            ("pooling_mode_mean_tokens", "mean"),
            ("pooling_mode_cls_token", "cls"),
            ("pooling_mode_max_tokens", "max"),
            ("pooling_mode_lasttoken", "lasttoken"),
        )
        if config.get(flag)
    ]
    if len(chosen) != 1:
        raise UnsupportedModel(
            f"pooling config {config} combines or omits modes; Tandem supports exactly one of "
            "mean, cls, max or lasttoken"
        )
    return chosen[0]  # type: ignore[return-value]


def default_max_length(source: ModelSource, kind: Kind) -> int:
    """The sequence limit sentence-transformers uses for this checkpoint."""
    config_path = source.path / "sentence_bert_config.json"
    if config_path.is_file():
        configured = json.loads(config_path.read_text(encoding="utf-8")).get("max_seq_length")
        if configured:
            return min(int(configured), source.max_positions)
    tokenizer_config = source.path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        limit = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("model_max_length")
        if isinstance(limit, int) and 0 < limit <= source.max_positions:
            return limit
    return min(DEFAULT_MAX_LENGTH, source.max_positions)
