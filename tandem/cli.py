"""The `tandem` command: one entry point whose subcommands load only what they need.

Building the parser imports nothing heavy (`tandem --help` loads neither onnxruntime, usearch,
grpc nor torch): each subcommand imports its own modules when it runs. `tandem export` needs
the export extra (torch, transformers, optimum); serving does not.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tandem import __version__

if TYPE_CHECKING:
    from tandem.matryoshka import Matryoshka

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


BENCHES = {
    "load": "load generator against a server",
    "overload": "2x/5x capacity shedding, or a memory soak",
    "serving": "Tandem against the seeds' pipeline, side by side",
    "quality": "nDCG/MRR/recall on RAG24",
    "replicas": "throughput through nginx with 1, 2, 3 replicas",
    "http_overhead": "Rerank of 50 documents over HTTP (Cohere v2) against gRPC, one server",
    "gpu": "the reranker on a GPU, bare and served, beside sentence-transformers (make gpu-carry)",
    "runtimes": "reranker and bi-encoder throughput per CPU runtime (OpenVINO, onnxruntime)",
    "peers": "Tandem beside Infinity and the seeds' pipeline, on the same rerank requests",
    "quantization": "static INT8 recipes for a reranker: top-5 overlap with FP32, and speed",
    "stage1": "dense, lexical and hybrid first stages on RAG24: quality, latency, index size",
    "swap": "a new reranker published to a server under Search load: failed calls, the switch",
    "long_documents": "whole RAG24 documents reranked by their first window or all (MaxP)",
    "rerank_depth": "passages a budgeted Rerank scores, by how many it sends (--against: A/B)",
    "bulk_embed": "an indexing job's Embed calls (OpenAI SDK) beside Searches (--against: A/B)",
    "dimensions": "a bi-encoder's vectors cut to each prefix size (Matryoshka): RAG24 quality",
    "filters": "metadata filters on RAG24: stage-1 latency, recall against exact, post-filtering",
    "listing": "listing documents a page at a time (Get with no ids): pages, walks, Search beside",
}


def build_parser() -> argparse.ArgumentParser:
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
            "--runtime",
            choices=("onnxruntime", "openvino"),
            help="graph format; default: openvino (static INT8) for int8 on x86-64, else "
            "onnxruntime. fp16 also keeps the checkpoint for the PyTorch GPU backend",
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
        if kind == "bi-encoder":
            sub.add_argument(
                "--prompt",
                action="append",
                default=[],
                type=_prompt_flag,
                metavar="NAME=TEXT",
                help="text put before an input, by name (repeatable), over the checkpoint's "
                "config_sentence_transformers.json: `query` goes before Search queries and "
                '`document` before stored documents, e.g. --prompt "query=query: " for e5',
            )
            sub.add_argument(
                "--default-prompt-name",
                metavar="NAME",
                help="the prompt an Embed with neither a role nor a name gets; default: the "
                "checkpoint's default_prompt_name, else none",
            )
            sub.add_argument(
                "--matryoshka-dimensions",
                type=_matryoshka_flag,
                metavar="SIZES",
                help="the prefix sizes the model was trained to be cut to (512,256,128, or "
                "'any'), over config.json's matryoshka_dimensions: Embed serves "
                "dimensions=N only for these. Only for a model trained with Matryoshka loss",
            )
        _add_verification_flags(sub)
    verify = kinds.add_parser("verify", help="re-measure an artifact's parity")
    verify.add_argument("folder", type=Path, help="artifact folder holding manifest.json")
    verify.add_argument("--model", help="reference checkpoint; default: the manifest's source")
    verify.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (an FP16 artifact on a GPU)"
    )
    verify.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "openvino", "torch"),
        default="auto",
        help="runtime to measure; torch runs the checkpoint an FP16 artifact keeps",
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
    # No defaults here: a flag left out means "the collection's own" for an existing one,
    # and IndexSettings' default for a new one (the help shows it).
    build.add_argument(
        "--dtype",
        choices=("i8", "f16", "f32"),
        help="vector type in the index (default i8: a quarter of f32's memory)",
    )
    build.add_argument(
        "--connectivity",
        type=int,
        help="HNSW graph degree M (default 16): more recall, more memory",
    )
    build.add_argument(
        "--expansion-add",
        type=int,
        help="HNSW ef at build time (default 128): better graph, slower build",
    )
    build.add_argument(
        "--expansion-search",
        type=int,
        help="HNSW ef at query time (default 64): more recall, slower search",
    )
    build.add_argument(
        "--exact-below",
        type=int,
        help="search exactly while the index holds fewer vectors than this (default 10000)",
    )
    build.add_argument(
        "--max-passages",
        type=int,
        help="embed a document longer than the bi-encoder's window as up to this many "
        "overlapping passages (default 64); 1: its first window only",
    )
    build.add_argument(
        "--passage-overlap",
        type=int,
        help="tokens each passage shares with the one before (default 32)",
    )
    build.add_argument("--threads", type=int, default=2)
    publish = index_commands.add_parser(
        "publish",
        help="publish a collection as the next version under a root that replicas follow",
    )
    publish.add_argument("--collection", type=Path, required=True, help="the writer's folder")
    publish.add_argument("--root", type=Path, required=True, help="the published root")
    publish.add_argument("--keep", type=int, default=3, help="versions kept (older pruned)")
    models = commands.add_parser("models", help="publish a reranker to running servers")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    publish_model = model_commands.add_parser(
        "publish",
        help="publish a verified reranker artifact as the next version under a models root; "
        "servers started with --reranker ROOT swap it in without a restart",
    )
    publish_model.add_argument("artifact", type=Path, help="a verified cross-encoder artifact")
    publish_model.add_argument("--root", type=Path, required=True, help="the models root")
    publish_model.add_argument("--keep", type=int, default=3, help="versions kept (older pruned)")
    publish_model.add_argument(
        "--allow-worse",
        action="store_true",
        help="publish a trained reranker even where its training measured it below stage 1 "
        "alone on held-out queries (refused otherwise)",
    )
    from tandem.server import settings

    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Settings come from flags, then TANDEM_<NAME> env, then a TOML file "
        "(--config or TANDEM_CONFIG), then the defaults shown.",
    )
    settings.build_parser(serve)
    from tandem import client, documents

    search = commands.add_parser("search", help="query a running server")
    client.add_arguments(search)
    listing = commands.add_parser(
        "documents",
        help="list a running server's documents as JSON lines (the corpus format index build "
        "reads), all or those a filter or id prefix keeps",
    )
    documents.add_arguments(listing)
    # Its flags are parsed by tandem.tune itself, which loads the models' runtimes on import.
    tuning = commands.add_parser(
        "tune",
        help="how deep stage 1 must reach on your queries: recall_k, first stage, budget "
        "(tandem tune --help lists its flags)",
        add_help=False,
    )
    tuning.add_argument("tune_args", nargs=argparse.REMAINDER, help="tandem tune's flags")
    training = commands.add_parser(
        "train",
        help="fine-tune the reranker on your labels, measured on held-out queries "
        "(tandem train --help lists its flags)",
        add_help=False,
    )
    training.add_argument("train_args", nargs=argparse.REMAINDER, help="tandem train's flags")
    bench = commands.add_parser(
        "bench",
        help="load tests and quality evaluation",
        description="tandem bench NAME --help lists a benchmark's own flags.",
    )
    bench.add_argument(
        "bench",
        choices=sorted(BENCHES),
        help="; ".join(f"{name}: {text}" for name, text in BENCHES.items()),
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's flags")
    return parser


def _run_publish(args: argparse.Namespace) -> int:
    from tandem.server.replication.publish import PublishError, publish

    try:
        version = publish(args.collection, args.root, keep=args.keep)
    except PublishError as exc:
        print(f"tandem index publish: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.root}: published version {version}")
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from tandem.artifact import read_manifest
    from tandem.server.replication.models import held_out_lead, publish_reranker
    from tandem.server.replication.publish import PublishError

    try:
        version = publish_reranker(
            args.artifact, args.root, keep=args.keep, allow_worse=args.allow_worse
        )
    except PublishError as exc:
        print(f"tandem models publish: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"{args.root}: published reranker version {version}; servers following it swap it in "
        "within --follow-seconds (send SIGHUP for now)"
    )
    lead = held_out_lead(read_manifest(args.artifact))  # opened and checked just now
    if lead is not None:
        print(f"measured by tandem train: {lead.sentence()}")
    return 0


def _run_index(args: argparse.Namespace) -> int:
    if args.index_command == "publish":
        return _run_publish(args)
    from tandem.artifact import ArtifactError
    from tandem.encoders import BiEncoder
    from tandem.server.engine.collection import Collection, CollectionError
    from tandem.server.engine.indexer import CorpusError, build
    from tandem.server.engine.pairs import PairTokenizer
    from tandem.server.engine.store import StoreError

    try:
        embedder = BiEncoder(args.bi_encoder, threads=args.threads)
        pairs = None
        if (args.reranker / "manifest.json").is_file():
            pairs = PairTokenizer.from_artifact(args.reranker)
        chosen = {
            "dtype": args.dtype,
            "connectivity": args.connectivity,
            "expansion_add": args.expansion_add,
            "expansion_search": args.expansion_search,
            "exact_below": args.exact_below,
            "max_passages": args.max_passages,
            "passage_overlap": args.passage_overlap,
        }
        settings = {name: value for name, value in chosen.items() if value is not None}
        collection = Collection(args.out, embedder=embedder, pairs=pairs, settings=settings)
        try:
            report = build(collection, args.corpus, batch_size=args.batch_size)
            lexical = collection.lexical
            indexed = len(collection.index), len(lexical) if lexical is not None else 0
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
        f"{report.total} read in {report.seconds:.1f} s; the vector index holds {indexed[0]} "
        f"passages, the lexical (BM25) index {indexed[1]} documents"
    )
    return 0


def _prompt_flag(value: str) -> tuple[str, str]:
    name, equals, text = value.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(
            f'{value!r}: write NAME=TEXT, e.g. "query=query: " (the text keeps its spaces)'
        )
    return name.strip(), text


def _matryoshka_flag(value: str) -> Matryoshka:
    from tandem.matryoshka import parse_sizes

    try:
        return parse_sizes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_export(args: argparse.Namespace) -> int:
    from tandem import rag24
    from tandem.export.errors import ExportError
    from tandem.export.parity import Thresholds
    from tandem.export.pipeline import ExportRequest, export_model
    from tandem.export.verify import Sample, verify_folder

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
                backend=args.backend,
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
                    runtime=args.runtime,
                    prompts=dict(getattr(args, "prompt", [])),
                    default_prompt_name=getattr(args, "default_prompt_name", None),
                    matryoshka=getattr(args, "matryoshka_dimensions", None),
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

    from tandem.artifact import ArtifactError
    from tandem.server import logs
    from tandem.server.app import Unverified, serve
    from tandem.server.engine.collection import CollectionError
    from tandem.server.settings import SettingsError, from_namespace

    try:
        settings = from_namespace(args, os.environ)
    except SettingsError as exc:
        print(f"tandem serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(level="debug" if args.verbose else settings.log_level, style=settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (ArtifactError, CollectionError, Unverified) as exc:
        logging.getLogger("tandem.server").error("refusing to start: %s", exc)
        return 1
    except RuntimeError as exc:
        # grpc reports a port it cannot bind as a RuntimeError.
        logging.getLogger("tandem.server").error("cannot start: %s", exc)
        return 1
    return 0


def _run_tune(argv: Sequence[str]) -> int:
    from tandem import tune
    from tandem.artifact import ArtifactError
    from tandem.server.engine.collection import CollectionError

    parser = argparse.ArgumentParser(
        prog="tandem tune",
        description=tune.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_arguments(parser)
    try:
        return tune.main(parser.parse_args(argv))
    except (tune.TuneError, ArtifactError, CollectionError, ValueError) as exc:
        print(f"tandem tune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run_train(argv: Sequence[str]) -> int:
    from tandem.artifact import ArtifactError
    from tandem.export.errors import ExportError
    from tandem.training import run
    from tandem.training.labels import LabelError

    parser = argparse.ArgumentParser(
        prog="tandem train",
        description=run.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tandem").setLevel(logging.INFO)
    try:
        return run.main(args)
    except (LabelError, ArtifactError) as exc:
        print(f"tandem train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ExportError as exc:
        print(f"tandem train: error: the trained model's export failed: {exc}", file=sys.stderr)
        return exc.exit_code


def _run_bench(name: str, argv: Sequence[str]) -> int:
    import importlib

    module = importlib.import_module(f"tandem.benchmarks.{name}")
    parser = argparse.ArgumentParser(prog=f"tandem bench {name}", description=BENCHES[name])
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(list(argv))))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["tune"]:  # argparse will not pass a leading --help on as a remainder
        return _run_tune(arguments[1:])
    if arguments[:1] == ["train"]:
        return _run_train(arguments[1:])
    args = build_parser().parse_args(arguments)
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "search":
        from tandem import client

        return client.run(args)
    if args.command == "documents":
        from tandem import documents

        return documents.run(args)
    if args.command == "bench":
        return _run_bench(args.bench, args.bench_args)
    # Root stays at WARNING: onnxruntime's quantizer logs every tensor at INFO on it.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("tandem").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.command == "export":
        return _run_export(args)
    if args.command == "index":
        return _run_index(args)
    if args.command == "models":
        return _run_models(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
