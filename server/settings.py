"""The server's one frozen settings object: flags, then ``TANDEM_*`` env, then a TOML file.

Every field is documented once, in ``FIELDS``' help text, which becomes the flag's help. Flags
are the field names with dashes (``--max-in-flight``); env names are ``TANDEM_`` plus the
field name in capitals (``TANDEM_MAX_IN_FLIGHT``); TOML keys are the field names. Nothing
reads the environment at import time: ``load`` takes argv and an environ mapping.
"""

from __future__ import annotations

import argparse
import ipaddress
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tandem.devices import BACKEND_CHOICES, CPU_PRECISIONS, DEVICE_PATTERN, TORCH_DTYPES

ENV_PREFIX = "TANDEM_"
FIRST_STAGES = ("dense", "lexical", "hybrid")  # fusion.FirstStage's values


class SettingsError(Exception):
    """A setting that is malformed, contradicts another, or names a missing file."""


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Settings:
    # Network
    host: str = field(
        default="127.0.0.1",
        metadata=_doc("address to bind; anything but loopback also needs --allow-remote"),
    )
    port: int = field(default=50051, metadata=_doc("gRPC port; 0 picks a free one"))
    allow_remote: bool = field(
        default=False,
        metadata=_doc("allow binding a non-loopback address (set a token, and TLS, first)"),
    )
    metrics_port: int = field(
        default=9464,
        metadata=_doc("Prometheus /metrics HTTP port on --host; 0 picks one, -1 turns it off"),
    )
    http_port: int = field(
        default=8080,
        metadata=_doc(
            "HTTP port on --host (Cohere, Jina, TEI and OpenAI shapes, JSON search, the docs "
            "and search pages); 0 picks one, -1 turns it off"
        ),
    )
    # Data and models
    collection: Path = field(
        default=Path("artifacts/demo"),
        metadata=_doc("collection folder (documents.sqlite + vectors.usearch); made if missing"),
    )
    bi_encoder: Path = field(
        default=Path("artifacts/bi-encoder"), metadata=_doc("bi-encoder artifact folder")
    )
    reranker: Path | None = field(
        default=Path("artifacts/cross-encoder"),
        metadata=_doc(
            "cross-encoder artifact folder, or a models root (tandem models publish) whose "
            "new versions are swapped in without a restart; 'none': retrieve-only"
        ),
    )
    allow_unverified: bool = field(
        default=False,
        metadata=_doc(
            "serve an artifact whose parity check against the FP32 reference failed, or never "
            "ran (its manifest says so); without it, such an artifact stops start-up"
        ),
    )
    reranker_stand_in: bool | None = field(
        default=None,
        metadata=_doc("the reranker is the stand-in (no quality); default: from its manifest"),
    )
    follow_seconds: float = field(
        default=1.0,
        metadata=_doc(
            "when --collection is a published root (tandem index publish) or --reranker a "
            "models root (tandem models publish), how often to look for a new version and "
            "swap it in"
        ),
    )
    read_only: bool = field(
        default=False,
        metadata=_doc(
            "serve the collection read-only: reads work, writes get FAILED_PRECONDITION "
            "(automatic when its folder cannot be written)"
        ),
    )
    index_dtype: str | None = field(
        default=None,
        metadata=_doc(
            "vector type (i8, f16, f32) of a new collection; an existing one keeps what it was "
            "built with, and a different value here stops start-up"
        ),
    )
    expansion_search: int | None = field(
        default=None,
        metadata=_doc(
            "HNSW ef at query time of a new collection; an existing one keeps what it was "
            "built with, and a different value here stops start-up"
        ),
    )
    max_passages_per_doc: int | None = field(
        default=None,
        metadata=_doc(
            "a new collection embeds a document longer than the bi-encoder's window as up to "
            "this many overlapping passages (default 64) and finds it by its best; an "
            "existing one keeps what it was built with, and a different value here stops "
            "start-up"
        ),
    )
    passage_overlap: int | None = field(
        default=None,
        metadata=_doc(
            "tokens each passage of a new collection shares with the one before (default "
            "32, at most half a window); an existing one keeps what it was built with"
        ),
    )
    compact_removed_fraction: float = field(
        default=0.25,
        metadata=_doc(
            "rebuild the index in the background once removed vectors hold this share of its "
            "graph (deletes and replaced documents leave slots behind); 0: never"
        ),
    )
    compact_min_removed: int = field(
        default=1000,
        metadata=_doc("...and at least this many vectors have been removed since the last build"),
    )
    threads: int = field(default=2, metadata=_doc("CPU threads per onnxruntime session"))
    ort_spinning: bool = field(
        default=False,
        metadata=_doc(
            "let onnxruntime's idle threads spin: faster when the sessions have cores to "
            "themselves; off by default because the two sessions, the event loop and the "
            "store share them (on 2 cores, spinning tripled the p99 under overload)"
        ),
    )
    reranker_nice: int = field(
        default=10,
        metadata=_doc(
            "how much lower the reranker's threads run than the rest (Linux nice increment; "
            "0: equal): reranking is elastic under a budget, the rest is on every call's path"
        ),
    )
    ingest_nice: int = field(
        default=10,
        metadata=_doc(
            "how much lower the ingest thread (upserts, and Embeds of --bulk-embed-texts or "
            "more) and the listing thread (Get's pages) run than the query path (Linux nice "
            "increment; 0: equal): index-time work and exports have no deadline, so beside "
            "searches they yield as the reranker does"
        ),
    )
    device: str = field(
        default="cpu",
        metadata=_doc(
            "where both encoders run: cpu, cuda or cuda:N (a GPU needs FP16 artifacts: "
            "tandem export --precision fp16)"
        ),
    )
    bi_encoder_device: str | None = field(
        default=None,
        metadata=_doc("where the bi-encoder runs, when it differs from --device"),
    )
    backend: str = field(
        default="auto",
        metadata=_doc(
            "runtime: auto (the artifact's graph on a CPU; on a GPU, onnxruntime's CUDA "
            "provider if installed, else PyTorch), onnxruntime, openvino or torch"
        ),
    )
    torch_dtype: str = field(
        default="auto",
        metadata=_doc("PyTorch backend precision: auto (float16 on a GPU), bfloat16, float32"),
    )
    cpu_precision: str = field(
        default="auto",
        metadata=_doc(
            "what OpenVINO runs: auto (where this CPU runs bf16, the most faithful variant that "
            "passes the artifact's parity probe and that no other beats by 10 percent; else "
            "f32), f32 or bf16 (the INT8 graph, its unquantized ops in that precision), or "
            "bf16-unquantized (the unquantized graph an INT8 export keeps, in bf16)"
        ),
    )
    cache_dir: Path | None = field(
        default=Path("~/.cache/tandem"),
        metadata=_doc(
            "where start-up keeps what it measured on this CPU (the precision --cpu-precision "
            "auto chose per artifact), so that a restart reuses it; 'none': measure every start"
        ),
    )
    # Security
    tls_cert: Path | None = field(default=None, metadata=_doc("PEM certificate chain: TLS on"))
    tls_key: Path | None = field(default=None, metadata=_doc("PEM private key for --tls-cert"))
    token: str | None = field(
        default=None,
        repr=False,
        metadata=_doc("bearer token every RPC but health must send (prefer TANDEM_TOKEN)"),
    )
    token_file: Path | None = field(
        default=None, metadata=_doc("file holding the bearer token (one line)")
    )
    # Limits
    max_in_flight: int = field(
        default=64,
        metadata=_doc(
            "calls served at once before RESOURCE_EXHAUSTED; 64 x 100 candidates is ~1.5x "
            "what 2 cores rerank in a 100 ms budget, so callers past it would only queue"
        ),
    )
    adaptive_limit: bool = field(
        default=True,
        metadata=_doc(
            "adapt how many Search, Rerank and query-sized Embed calls run at once (up to "
            "max_in_flight) to the lateness of recent ones; refused calls get "
            "RESOURCE_EXHAUSTED"
        ),
    )
    latency_slack_ms: int = field(
        default=5,
        metadata=_doc(
            "a call with a rerank budget is late (and lowers the adaptive limit) past its "
            "budget plus this (a retrieve-only search: past 10 ms); the rest of the 50 ms "
            "over budget that the overload SLO allows is left to the waits the server cannot "
            "time: gRPC's queue of arrived calls and the reply"
        ),
    )
    max_queue_wait_ms: int = field(
        default=25,
        metadata=_doc(
            "refuse a call (RESOURCE_EXHAUSTED) when the work queued ahead of it would delay "
            "it past this; keeps the latency of admitted calls within budget under overload"
        ),
    )
    max_message_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata=_doc("largest request message (each streamed Upsert message) in bytes"),
    )
    max_recall_k: int = field(default=1000, metadata=_doc("largest Search recall_k"))
    max_top_n: int = field(default=1000, metadata=_doc("largest Search/Rerank top_n"))
    max_rerank_documents: int = field(
        default=1000, metadata=_doc("documents per Rerank call (no small fixed cap: raise it)")
    )
    max_embed_texts: int = field(default=256, metadata=_doc("texts per Embed call"))
    bulk_embed_texts: int = field(
        default=5,
        metadata=_doc(
            "an Embed of this many texts or more is index-time work: it runs beside upserts "
            "and waits its turn rather than being refused under load (only max_in_flight "
            "refuses it); fewer texts are a query's, admitted as a search is"
        ),
    )
    max_upsert_documents: int = field(
        default=1000, metadata=_doc("documents per streamed Upsert message")
    )
    max_id_bytes: int = field(default=512, metadata=_doc("longest document id, UTF-8 bytes"))
    default_recall_k: int = field(default=100, metadata=_doc("Search recall_k when unset"))
    default_top_n: int = field(default=5, metadata=_doc("Search top_n when unset"))
    default_rerank_budget_ms: int = field(
        default=100, metadata=_doc("rerank budget when a call sets none; 0: no deadline")
    )
    min_rerank: int = field(
        default=0,
        metadata=_doc(
            "when a call sets no min_rerank: refuse a budgeted call (RESOURCE_EXHAUSTED, with a "
            "retry delay) predicted to rerank fewer candidates than this, rather than answer "
            "in stage-1 order; 0: never"
        ),
    )
    max_tokens_per_doc: int = field(
        default=0,
        metadata=_doc(
            "cut each document to this many tokens before reranking, when a call sets no "
            "max_tokens_per_doc: shorter pairs, so more of them within a budget; 0: only the "
            "reranker's own length"
        ),
    )
    max_chunks_per_doc: int = field(
        default=10,
        metadata=_doc(
            "windows of each document the reranker reads, when a call sets no "
            "max_chunks_per_doc (Cohere v1's name): a document longer than one pair is cut "
            "into overlapping windows and takes its best window's score; 1: its start only"
        ),
    )
    max_chunks_per_doc_limit: int = field(
        default=64,
        metadata=_doc("the most windows a call may ask to be read of each document"),
    )
    window_overlap: int = field(
        default=64,
        metadata=_doc(
            "tokens each window shares with the one before (at most half a window), so that "
            "a passage cut by a window's edge is read whole by the next"
        ),
    )
    # First stage
    first_stage: str = field(
        default="hybrid",
        metadata=_doc(
            "first stage when a call sets none: dense (vectors), lexical (BM25) or hybrid "
            "(both, fused by RRF): hybrid recalled more on RAG24 (benchmarks/RESULTS.md)"
        ),
    )
    # Fixed on half of RAG24's topics (tandem bench stage1), reported on the other half.
    rrf_k: int = field(
        default=10,
        metadata=_doc(
            "hybrid's RRF constant: a document at 0-based rank r scores weight / (k + r + 1); "
            "larger k flattens the lead of the first places (60 in the RRF paper)"
        ),
    )
    dense_weight: float = field(
        default=1.0, metadata=_doc("hybrid's weight on the dense ranking, when a call sets none")
    )
    lexical_weight: float = field(
        default=0.75, metadata=_doc("hybrid's weight on the BM25 ranking, when a call sets none")
    )
    # Batching
    max_batch_tokens: int = field(
        default=0,
        metadata=_doc(
            "padded tokens per reranker run (see BatchLimits); 0: 1024 on a CPU, learned from "
            "the GPU at start-up (the smallest batch within a tenth of its best tokens/s)"
        ),
    )
    max_batch_pairs: int = field(
        default=0, metadata=_doc("pairs per reranker run; 0: 32 on a CPU, more on a GPU")
    )
    max_queued_pairs: int = field(
        default=4096,
        metadata=_doc("pairs waiting to be reranked before RESOURCE_EXHAUSTED (~25 s of work)"),
    )
    query_cache: int = field(default=10_000, metadata=_doc("query vectors kept (LRU); 0: off"))
    # Lifecycle
    checkpoint_seconds: float = field(
        default=30.0,
        metadata=_doc("save the index this often after writes (the store is always durable)"),
    )
    drain_seconds: float = field(
        default=10.0, metadata=_doc("on SIGTERM, time in-flight calls get to finish")
    )
    log_level: str = field(default="info", metadata=_doc("debug, info, warning or error"))
    log_format: str = field(default="json", metadata=_doc("json (one object per line) or text"))

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def index_settings(self) -> dict[str, Any]:
        """The index settings given explicitly, by IndexSettings field name."""
        chosen = {
            "dtype": self.index_dtype,
            "expansion_search": self.expansion_search,
            "max_passages": self.max_passages_per_doc,
            "passage_overlap": self.passage_overlap,
        }
        return {name: value for name, value in chosen.items() if value is not None}


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def _base_type(hint: Any) -> Any:
    """``int`` for ``int``; ``Path`` for ``Path | None``."""
    if isinstance(hint, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return options[0]
    return hint


def _optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def _convert(name: str, raw: Any, hint: Any, origin: str) -> Any:
    base = _base_type(hint)
    # "none" unsets a path ("--reranker none"); a string (the token) is kept as given, so an
    # empty TANDEM_TOKEN is an error rather than a silently open server.
    unsettable = isinstance(raw, str) and _optional(hint) and base is not str
    if unsettable and raw.strip().lower() in ("", "none"):
        return None
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{raw!r} is not a boolean")
        if base is int and isinstance(raw, float):
            raise ValueError(f"{raw!r} is not an integer")
        if base is float and isinstance(raw, bool):
            raise ValueError(f"{raw!r} is not a number")
        return base(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name} ({origin}): {exc}") from exc


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Adds one flag per field; every default is None so unset flags fall through to env."""
    parser = parser or argparse.ArgumentParser(prog="tandem serve")
    parser.add_argument(
        "--config", type=Path, help="TOML file of settings (env: TANDEM_CONFIG)", default=None
    )
    hints = _hints()
    for item in fields(Settings):
        flag = "--" + item.name.replace("_", "-")
        help_text = f"{item.metadata.get('help', '')} (default: {item.default})"
        if _base_type(hints[item.name]) is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, default=None, metavar=item.name.upper(), help=help_text)
    return parser


def load(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Settings:
    return from_namespace(build_parser().parse_args(list(argv)), environ or {})


def from_namespace(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    config_path = args.config or environ.get(f"{ENV_PREFIX}CONFIG")
    file_values = _read_toml(Path(config_path)) if config_path else {}
    hints = _hints()
    values: dict[str, Any] = {}
    for item in fields(Settings):
        flag_value = getattr(args, item.name, None)
        env_value = environ.get(ENV_PREFIX + item.name.upper())
        if flag_value is not None:
            values[item.name] = _convert(item.name, flag_value, hints[item.name], "flag")
        elif env_value is not None:
            values[item.name] = _convert(item.name, env_value, hints[item.name], "env")
        elif item.name in file_values:
            values[item.name] = _convert(
                item.name, file_values[item.name], hints[item.name], str(config_path)
            )
    settings = Settings(**values)
    if settings.token_file is not None and settings.token is None:
        try:
            token = settings.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(f"token_file: cannot read {settings.token_file}: {exc}") from exc
        settings = replace(settings, token=token)
    validate(settings)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"config: cannot read {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config: {path} is not valid TOML: {exc}") from exc
    known = {item.name for item in fields(Settings)}
    normalised = {key.replace("-", "_"): value for key, value in document.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise SettingsError(f"config: {path} has unknown settings: {', '.join(unknown)}")
    return normalised


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(settings: Settings) -> None:
    problems: list[str] = []
    if not is_loopback(settings.host) and not settings.allow_remote:
        problems.append(
            f"host {settings.host!r} is not loopback: pass --allow-remote to bind it on purpose"
        )
    if not 0 <= settings.port <= 65535:
        problems.append(f"port {settings.port} is outside 0-65535")
    for name in ("metrics_port", "http_port"):
        if not -1 <= getattr(settings, name) <= 65535:
            problems.append(f"{name} {getattr(settings, name)} is outside -1-65535")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        problems.append("tls_cert and tls_key go together: set both or neither")
    for name in ("tls_cert", "tls_key", "token_file"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            problems.append(f"{name}: {path} is not a file")
    if settings.token is not None and not settings.token.strip():
        problems.append("token is empty: unset it, or set a real secret")
    if settings.reranker is not None and not (
        (settings.reranker / "manifest.json").is_file()
        or (settings.reranker / "RERANKER").is_file()
    ):
        problems.append(
            f"reranker: {settings.reranker} holds no exported artifact (manifest.json) and is no "
            "models root (RERANKER); export one with `tandem export cross-encoder`, or pass "
            "--reranker none to serve retrieve-only"
        )
    if settings.index_dtype not in (None, "i8", "f16", "f32"):
        problems.append(f"index_dtype {settings.index_dtype!r} is not i8, f16 or f32")
    for name in ("device", "bi_encoder_device"):
        value = getattr(settings, name)
        if value is not None and not DEVICE_PATTERN.match(value.strip().lower()):
            problems.append(f"{name} {value!r} is not cpu, cuda or cuda:N")
    if settings.backend not in BACKEND_CHOICES:
        problems.append(f"backend {settings.backend!r} is not one of {', '.join(BACKEND_CHOICES)}")
    if settings.torch_dtype not in TORCH_DTYPES:
        problems.append(
            f"torch_dtype {settings.torch_dtype!r} is not one of {', '.join(TORCH_DTYPES)}"
        )
    if settings.cpu_precision not in ("auto", *CPU_PRECISIONS):
        problems.append(
            f"cpu_precision {settings.cpu_precision!r} is not one of auto, "
            f"{', '.join(CPU_PRECISIONS)}"
        )
    if settings.first_stage not in FIRST_STAGES:
        problems.append(
            f"first_stage {settings.first_stage!r} is not one of {', '.join(FIRST_STAGES)}"
        )
    if settings.dense_weight + settings.lexical_weight <= 0:
        problems.append("dense_weight and lexical_weight are both 0: give one a weight")
    if settings.log_level not in ("debug", "info", "warning", "error"):
        problems.append(f"log_level {settings.log_level!r} is not debug/info/warning/error")
    if settings.log_format not in ("json", "text"):
        problems.append(f"log_format {settings.log_format!r} is not json or text")
    positive = (
        "threads", "max_in_flight", "max_message_bytes", "max_recall_k", "max_top_n",
        "max_rerank_documents", "max_embed_texts", "bulk_embed_texts", "max_upsert_documents",
        "max_id_bytes",
        "default_recall_k", "default_top_n", "max_queued_pairs", "compact_min_removed",
        "rrf_k", "max_chunks_per_doc", "max_chunks_per_doc_limit",
    )  # fmt: skip
    problems.extend(
        f"{name} must be at least 1 (got {getattr(settings, name)})"
        for name in positive
        if getattr(settings, name) < 1
    )
    for name in (
        "default_rerank_budget_ms", "max_tokens_per_doc", "min_rerank", "query_cache",
        "max_batch_tokens", "max_batch_pairs",
        "checkpoint_seconds",
        "drain_seconds", "max_queue_wait_ms", "latency_slack_ms", "reranker_nice",
        "ingest_nice",
        "compact_removed_fraction", "dense_weight", "lexical_weight", "window_overlap",
    ):  # fmt: skip
        if getattr(settings, name) < 0:
            problems.append(f"{name} must be >= 0 (got {getattr(settings, name)})")
    for name in ("expansion_search", "max_passages_per_doc"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            problems.append(f"{name} must be at least 1 (got {value})")
    if settings.passage_overlap is not None and settings.passage_overlap < 0:
        problems.append(f"passage_overlap must be >= 0 (got {settings.passage_overlap})")
    if settings.max_chunks_per_doc > settings.max_chunks_per_doc_limit:
        problems.append(
            f"max_chunks_per_doc {settings.max_chunks_per_doc} is above "
            f"max_chunks_per_doc_limit {settings.max_chunks_per_doc_limit}"
        )
    if settings.default_recall_k > settings.max_recall_k:
        problems.append("default_recall_k is larger than max_recall_k")
    if settings.default_top_n > settings.max_top_n:
        problems.append("default_top_n is larger than max_top_n")
    if settings.max_message_bytes > 2**31 - 1:
        problems.append("max_message_bytes must fit gRPC's 2 GiB limit")
    if problems:
        raise SettingsError("; ".join(problems))
