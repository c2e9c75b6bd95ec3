"""The `tandem` command: one entry point whose subcommands load only what they need.

`tandem export` needs the export extra (torch, transformers, optimum); serving does not.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tandem import __version__

EXIT_USAGE = 2


def _add_verification_flags(parser: argparse.ArgumentParser) -> None:
    bars = parser.add_argument_group("parity thresholds (against the FP32 PyTorch reference)")
    bars.add_argument("--min-mean-cosine", type=float, default=0.99, help="bi-encoder")
    bars.add_argument("--min-cosine", type=float, default=0.97, help="bi-encoder, worst text")
    bars.add_argument("--min-mean-spearman", type=float, default=0.98, help="cross-encoder")
    bars.add_argument("--min-topk-overlap", type=float, default=0.9, help="cross-encoder")
    bars.add_argument("--topk", type=int, default=10, help="k of the top-k overlap")
    sample = parser.add_argument_group("verification sample (real TREC RAG 2024 text)")
    sample.add_argument("--texts", type=int, default=256, help="bi-encoder passages (>= 200)")
    sample.add_argument("--queries", type=int, default=20, help="cross-encoder queries (>= 20)")
    sample.add_argument("--candidates", type=int, default=50, help="candidates per query")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both runtimes")


def build_parser() -> argparse.ArgumentParser:
    from server.index import IndexSettings

    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="convert and verify an encoder as ONNX")
    kinds = export.add_subparsers(dest="kind", required=True)
    for kind in ("bi-encoder", "cross-encoder"):
        sub = kinds.add_parser(kind, help=f"export a {kind}")
        sub.add_argument("--model", required=True, help="local folder or Hugging Face hub id")
        sub.add_argument("--out", required=True, type=Path, help="artifact folder to create")
        sub.add_argument(
            "--precision",
            choices=("int8", "fp16", "fp32"),
            default="int8",
            help="int8 for CPUs (default), fp16 for GPUs, fp32 as reference",
        )
        sub.add_argument(
            "--preset",
            choices=("avx2", "avx512", "avx512_vnni", "arm64"),
            help="INT8 layout; default: picked from this CPU's flags",
        )
        sub.add_argument(
            "--max-length",
            type=int,
            help="token limit; default: the model's sentence-transformers setting",
        )
        sub.add_argument("--force", action="store_true", help="replace a non-empty --out")
        _add_verification_flags(sub)
    verify = kinds.add_parser("verify", help="re-measure an artifact's parity")
    verify.add_argument("folder", type=Path, help="artifact folder holding manifest.json")
    verify.add_argument("--model", help="reference checkpoint; default: the manifest's source")
    verify.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="run the artifact on this device (cuda for FP16 on a GPU)",
    )
    _add_verification_flags(verify)
    index = commands.add_parser("index", help="build a collection from a corpus")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser("build", help="bulk-load a JSONL corpus (resumable)")
    build.add_argument(
        "--corpus",
        type=Path,
        required=True,
        help='.jsonl or .jsonl.gz, one {"id", "text", "metadata"} per line',
    )
    build.add_argument("--out", type=Path, required=True, help="collection folder")
    build.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    build.add_argument(
        "--reranker",
        type=Path,
        default=Path("artifacts/cross-encoder"),
        help="its tokenizer pre-tokenizes documents; a missing folder skips it",
    )
    build.add_argument("--batch-size", type=int, default=64, help="documents per transaction")
    defaults = IndexSettings()
    build.add_argument(
        "--dtype",
        choices=("i8", "f16", "f32"),
        default=defaults.dtype,
        help="vector type in the index (i8: a quarter of f32's memory)",
    )
    build.add_argument(
        "--connectivity",
        type=int,
        default=defaults.connectivity,
        help="HNSW graph degree M: more recall, more memory",
    )
    build.add_argument(
        "--expansion-add",
        type=int,
        default=defaults.expansion_add,
        help="HNSW ef at build time: better graph, slower build",
    )
    build.add_argument(
        "--expansion-search",
        type=int,
        default=defaults.expansion_search,
        help="HNSW ef at query time: more recall, slower search",
    )
    build.add_argument(
        "--exact-below",
        type=int,
        default=defaults.exact_below,
        help="search exactly while the index holds fewer vectors than this",
    )
    build.add_argument("--threads", type=int, default=2)
    publish = index_commands.add_parser(
        "publish",
        help="publish a collection as the next version under a root that replicas follow",
    )
    publish.add_argument("--collection", type=Path, required=True, help="the writer's folder")
    publish.add_argument("--root", type=Path, required=True, help="the published root")
    publish.add_argument("--keep", type=int, default=3, help="versions kept (older pruned)")
    from server import settings

    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Settings come from flags, then TANDEM_<NAME> env, then a TOML file "
        "(--config or TANDEM_CONFIG), then the defaults shown.",
    )
    settings.build_parser(serve)
    from tandem import client

    search = commands.add_parser("search", help="query a running server")
    client.add_arguments(search)
    bench = commands.add_parser("bench", help="load tests and quality evaluation")
    benches = bench.add_subparsers(dest="bench", required=True)
    from benchmarks import load, overload, quality, replicas, serving

    load.add_arguments(benches.add_parser("load", help="load generator against a server"))
    overload.add_arguments(
        benches.add_parser("overload", help="2x/5x capacity shedding, or a memory soak")
    )
    serving.add_arguments(
        benches.add_parser("serving", help="Tandem against the seeds' pipeline, side by side")
    )
    quality.add_arguments(benches.add_parser("quality", help="nDCG/MRR/recall on RAG24"))
    replicas.add_arguments(
        benches.add_parser("replicas", help="throughput through nginx with 1, 2, 3 replicas")
    )
    return parser


def _run_publish(args: argparse.Namespace) -> int:
    from server.publish import PublishError, publish

    try:
        version = publish(args.collection, args.root, keep=args.keep)
    except PublishError as exc:
        print(f"tandem index publish: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.root}: published version {version}")
    return 0


def _run_index(args: argparse.Namespace) -> int:
    if args.index_command == "publish":
        return _run_publish(args)
    from server.collection import Collection, CollectionError
    from server.index import IndexSettings
    from server.indexer import CorpusError, build
    from server.pairs import PairTokenizer
    from server.store import StoreError
    from tandem.artifact import ArtifactError
    from tandem.encoders import BiEncoder

    try:
        embedder = BiEncoder(args.bi_encoder, threads=args.threads)
        pairs = None
        if (args.reranker / "manifest.json").is_file():
            pairs = PairTokenizer.from_artifact(args.reranker)
        settings = IndexSettings(
            dtype=args.dtype,
            connectivity=args.connectivity,
            expansion_add=args.expansion_add,
            expansion_search=args.expansion_search,
            exact_below=args.exact_below,
        )
        collection = Collection(args.out, embedder=embedder, pairs=pairs, settings=settings)
        try:
            report = build(collection, args.corpus, batch_size=args.batch_size)
        finally:
            collection.close()
    except (CorpusError, ArtifactError, CollectionError) as exc:
        print(f"tandem index build: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"tandem index build: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: {report.added} documents added, {report.skipped} already present, "
        f"{report.total} read in {report.seconds:.1f} s"
    )
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from export.errors import ExportError
    from export.parity import Thresholds
    from export.pipeline import ExportRequest, export_model
    from export.verify import Sample, verify_folder
    from tandem import rag24

    bars = Thresholds(
        min_mean_cosine=args.min_mean_cosine,
        min_cosine=args.min_cosine,
        min_mean_spearman=args.min_mean_spearman,
        min_topk_overlap=args.min_topk_overlap,
        topk=args.topk,
    )
    sample = Sample(texts=args.texts, queries=args.queries, candidates=args.candidates)
    try:
        data = rag24.load()
        if args.kind == "verify":
            manifest = verify_folder(
                args.folder,
                data,
                bars=bars,
                sample=sample,
                model=args.model,
                threads=args.threads,
                device=args.device,
            )
        else:
            manifest = export_model(
                ExportRequest(
                    kind=args.kind,
                    model=args.model,
                    out=args.out,
                    precision=args.precision,
                    preset=args.preset,
                    max_length=args.max_length,
                    force=args.force,
                    bars=bars,
                    sample=sample,
                    threads=args.threads,
                ),
                data,
            )
    except ExportError as exc:
        print(f"tandem export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except rag24.DataUnavailable as exc:
        print(f"tandem export: error: {exc}", file=sys.stderr)
        return 1
    assert manifest.parity is not None
    print(f"verified {manifest.kind} ({manifest.precision}): {manifest.parity.metrics}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from server import logs
    from server.app import serve
    from server.collection import CollectionError
    from server.settings import SettingsError, from_namespace
    from tandem.artifact import ArtifactError

    try:
        settings = from_namespace(args, os.environ)
    except SettingsError as exc:
        print(f"tandem serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(level="debug" if args.verbose else settings.log_level, style=settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (ArtifactError, CollectionError) as exc:
        logging.getLogger("server").error("refusing to start: %s", exc)
        return 1
    except RuntimeError as exc:
        # grpc reports a port it cannot bind as a RuntimeError.
        logging.getLogger("server").error("cannot start: %s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "search":
        from tandem import client

        return client.run(args)
    if args.command == "bench":
        from benchmarks import load, overload, quality, replicas, serving

        modules = {
            "load": load, "serving": serving, "quality": quality, "overload": overload,
            "replicas": replicas,
        }  # fmt: skip
        return int(modules[args.bench].main(args))
    # Root stays at WARNING: onnxruntime's quantizer logs every tensor at INFO on it.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in ("tandem", "export", "server"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.command == "export":
        return _run_export(args)
    if args.command == "index":
        return _run_index(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
