"""`tandem train`: fine-tune the reranker on your own labels, measure it on held-out queries,
and export it as verified artifacts ready to publish to running servers.

    labels (TREC qrels, JSON lines, or the server's Feedback) -> split by a seeded rule
    -> (``--pseudo-queries``: queries made from the collection's text, trained on only)
    -> the collection's first stage (hard negatives, and the held-out candidates)
    -> CrossEncoderTrainer (LambdaLoss or BCE; resumable per epoch)
    -> export: INT8 (CPU) and FP16 (GPU), each checked against the trained FP32 checkpoint
    -> held-out report: stage 1 alone, the starting reranker, the trained one (train.md,
       train.json, train.png), also written into the artifacts' manifests; and the trained
       one against stage 1 on a sample of its training queries (did it learn relevance, or
       those queries?)

Held-out evaluation is not optional: queries are split by the sha1 of ``seed:query_id``
(``--eval-fraction`` of them held out), or the user names them (``--eval-queries``), and no
held-out query's labels are trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.relevance import read_queries
from tandem.server.engine.fusion import FirstStage, Fusion
from tandem.server.settings import Settings
from tandem.training import evaluate, labels, pools, report
from tandem.training.base import Base, resolve_base, with_new_head
from tandem.training.labels import Judged, LabelError

if TYPE_CHECKING:
    from tandem.encoders import CrossEncoder
    from tandem.server.engine.store import DocumentStore

log = logging.getLogger(__name__)
PRECISIONS = ("int8", "fp16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("labels (one source)")
    data.add_argument("--collection", type=Path, required=True, help="the collection folder")
    data.add_argument("--queries", type=Path, help="TREC topics, JSON lines {id, query}, …")
    data.add_argument("--qrels", type=Path, help="TREC qrels for --queries (graded)")
    data.add_argument(
        "--labels", type=Path, help='JSON lines {"query", "positives", "negatives"?, "scores"?}'
    )
    data.add_argument(
        "--from-feedback", action="store_true", help="the labels and clicks the server stored"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for everything written")
    parser.add_argument(
        "--base",
        default="artifacts/cross-encoder",
        help="the serving reranker's artifact (default), a Hugging Face cross-encoder, or an "
        "encoder (a bi-encoder) to give a new one-logit head",
    )
    parser.add_argument("--bi-encoder", type=Path, default=Path("artifacts/bi-encoder"))
    split = parser.add_argument_group("held-out split")
    split.add_argument("--eval-queries", type=Path, help="the held-out queries (their ids)")
    split.add_argument("--eval-fraction", type=float, default=0.5, help="held out by sha1")
    split.add_argument("--seed", type=int, default=0, help="the split, the shuffles, the init")
    mining = parser.add_argument_group("hard negatives (from the collection's first stage)")
    mining.add_argument(
        "--first-stage", choices=[stage.value for stage in FirstStage], default="hybrid"
    )
    mining.add_argument("--negatives", type=int, default=16, help="mined per query")
    mining.add_argument(
        "--margin",
        type=float,
        help="keep a negative only this far below the best positive's bi-encoder score",
    )
    mining.add_argument("--list-size", type=int, default=32, help="documents per query's list")
    fit = parser.add_argument_group("training")
    fit.add_argument("--loss", choices=("lambda", "bce"), default="lambda")
    fit.add_argument("--distill", type=float, default=0.5, help="the bi-encoder's share")
    fit.add_argument(
        "--pseudo-queries", type=int, default=0,
        help="also train on this many queries made from the collection's text (a sentence "
        "as the query, its document as the answer): queries on every topic it holds",
    )  # fmt: skip
    fit.add_argument("--epochs", type=int, default=2)
    fit.add_argument("--batch-size", type=int, default=2, help="queries (lambda) or pairs (bce)")
    fit.add_argument("--learning-rate", type=float, default=5e-5)
    fit.add_argument("--warmup-ratio", type=float, default=0.1)
    fit.add_argument(
        "--max-length", type=int, default=128,
        help="tokens per training pair (from all-MiniLM-L6-v2's backbone, 128 scored 0.078 "
        "nDCG@10 above 256 on RAG24, and trains 2.2x as fast)",
    )  # fmt: skip
    fit.add_argument(
        "--serve-max-length",
        type=int,
        help="tokens per pair in the exported artifact; default: --max-length. A reranker "
        "scores best at the length it trained at (one trained at 128 lost 0.035 nDCG@10 "
        "served at 512); a server reads longer documents in windows of this length",
    )
    fit.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    fit.add_argument(
        "--bf16", choices=("auto", "on", "off"), default="auto",
        help="bf16 autocast: auto uses it on CPUs with AMX or avx512_bf16, and on GPUs",
    )  # fmt: skip
    fit.add_argument("--restart", action="store_true", help="discard a previous run in --out")
    check = parser.add_argument_group("evaluation and export")
    check.add_argument("--eval-depth", type=int, default=30, help="candidates reranked")
    check.add_argument("--relevant", type=int, help="grade that counts (default: 2 on 0-3)")
    check.add_argument(
        "--compare", type=Path, action="append", default=[], help="other reranker artifacts"
    )
    check.add_argument("--precisions", default="int8,fp16", help="artifacts to export")
    check.add_argument(
        "--verify-queries", type=int, default=20, help="the export's parity sample: queries"
    )
    check.add_argument("--verify-candidates", type=int, default=50, help="… and candidates each")
    check.add_argument("--min-mean-spearman", type=float, default=0.98, help="the parity bars")
    check.add_argument("--min-topk-overlap", type=float, default=0.9, help="… as tandem export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rrf-k", type=int, default=Settings.rrf_k)
    parser.add_argument("--dense-weight", type=float, default=Settings.dense_weight)
    parser.add_argument("--lexical-weight", type=float, default=Settings.lexical_weight)


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    judged = read_labels(args)
    train, held = split(judged, args)
    relevant = args.relevant or (2 if max_grade(judged) > 1 else 1)
    made = made_queries(args, grade=max_grade(judged))
    stage = FirstStage(args.first_stage)
    fusion = Fusion(args.dense_weight, args.lexical_weight, args.rrf_k)
    depth = max(args.eval_depth, args.negatives + len_labelled(train), 50)
    retrieved = pools.retrieve(
        args.collection, args.bi_encoder, [*train, *held, *made], depth=depth, stage=stage,
        fusion=fusion, threads=args.threads, strict=args.qrels is None,
    )  # fmt: skip
    pools.check_pools(held, retrieved.pools)
    lists = build([*train, *made], retrieved, args)
    # After the labels and the collection are checked, which take seconds: naming the base
    # may reach for the hub.
    base = resolve_base(args.base)
    if args.restart:
        shutil.rmtree(args.out / "checkpoints", ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = base.checkpoint
    if base.kind == "new-head":
        checkpoint = with_new_head(base, args.out / "start", seed=args.seed)
    from tandem.training import fit

    recipe = fit.Recipe(
        base=base.source, loss=args.loss, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_ratio=args.warmup_ratio,
        max_length=args.max_length, negatives=args.negatives, margin=args.margin,
        list_size=args.list_size, distill=args.distill, seed=args.seed,
        data_sha256=fit.data_hash(lists),
    )  # fmt: skip
    bf16 = args.bf16 == "on" or (
        args.bf16 == "auto" and (args.device.startswith("cuda") or fit.bf16_supported())
    )
    model, training = fit.train(
        lists, recipe, checkpoint=checkpoint, out=args.out, device=args.device, bf16=bf16,
        threads=args.threads,
    )  # fmt: skip
    artifacts = export(model, args)
    trained_name = "trained (INT8 artifact)"
    # Loaded once for the held-out queries and the training ones: each load compiles kernels.
    trained = evaluate.load_reranker(artifacts["int8"], threads=args.threads)
    rows, tests, judged_held = held_out(
        args, held, retrieved, stage, base, trained, trained_name, relevant
    )
    generalisation = on_training_queries(
        args, train, retrieved, stage, trained, relevant, held_lead=tests, count=len(held)
    )
    summary: dict[str, Any] = {
        "arguments": {name: str(value) for name, value in sorted(vars(args).items())},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base": {"source": base.source, "checkpoint": base.checkpoint, "kind": base.kind},
        "labels": label_source(args),
        "split": split_rule(args, train, held),
        "pseudo_queries": {
            "asked": args.pseudo_queries,
            "made": len(made),
            "rule": "inverse cloze: a sentence as the query",
        },
        "recipe": asdict(recipe),
        "training": training,
        "first_stage": {"mode": stage.value, "fusion": asdict(fusion)},
        "evaluation": {
            "queries": judged_held,
            "relevant": relevant,
            "depth": args.eval_depth,
            "rows": [asdict(row) for row in rows],
            "paired_tests": tests,
            "trained": trained_name,
            "training_queries": {
                "queries": generalisation.train_queries,
                "stage1_to_trained": generalisation.train_lead,
                "held_out_stage1_to_trained": generalisation.held_lead,
                "memorised": generalisation.memorised,
            },
        },
        "artifacts": {name: str(path) for name, path in artifacts.items()},
    }
    report.write(args.out, summary, rows, tests, trained=trained_name)
    for folder in artifacts.values():
        report.record_in_manifest(folder, summary)
    print(report.render(summary, rows, tests, trained=trained_name))
    if generalisation.memorised:
        log.warning("%s", generalisation.sentence())
    print(f"wrote {args.out}/train.md, train.json and train.png; artifacts: "
          f"{', '.join(str(path) for path in artifacts.values())}")  # fmt: skip
    return 0


def held_out(
    args: argparse.Namespace,
    held: Sequence[Judged],
    retrieved: pools.Retrieved,
    stage: FirstStage,
    base: Base,
    trained: CrossEncoder,
    trained_name: str,
    relevant: int,
) -> tuple[list[evaluate.Row], dict[str, dict[str, dict[str, float]]], int]:
    """Stage 1 alone, the starting reranker and any --compare artifacts, and the trained
    artifact, each reranking the same held-out candidates; then the rows and paired tests."""
    systems = evaluate.first_stage_systems(
        held, retrieved.pools, depth=args.eval_depth, name=stage.value
    )
    compared = ([base.artifact] if base.artifact else []) + list(args.compare)
    folders = list(dict.fromkeys(compared))
    names = distinct_names(folders)
    named = [(f"{name} (reranker)", folder) for name, folder in zip(names, folders, strict=True)]

    def add(name: str, reranker: CrossEncoder) -> None:
        folder = reranker.folder
        note = "the starting reranker" if folder == base.artifact else str(folder)
        systems.append(
            evaluate.reranked(
                name,
                reranker,
                held,
                retrieved.pools,
                retrieved.texts,
                depth=args.eval_depth,
                note=note,
            )
        )

    for name, folder in named:
        add(name, evaluate.load_reranker(folder, threads=args.threads))
    add(trained_name, trained)
    return evaluate.measure(
        systems, held, trained=trained_name, relevant=relevant, depth=args.eval_depth
    )


def distinct_names(folders: Sequence[Path]) -> list[str]:
    """Each folder's name, with as many of its parents as tell it from the others: two
    ``reranker-int8`` folders of two runs are two rows of the report, not one."""
    parts = [folder.parts for folder in folders]
    depth = 1
    while depth < max((len(each) for each in parts), default=1) and len(
        {each[-depth:] for each in parts}
    ) < len(parts):
        depth += 1
    return ["/".join(each[-depth:]) for each in parts]


def on_training_queries(
    args: argparse.Namespace,
    train: Sequence[Judged],
    retrieved: pools.Retrieved,
    stage: FirstStage,
    trained: CrossEncoder,
    relevant: int,
    *,
    held_lead: Mapping[str, Mapping[str, Mapping[str, float]]],
    count: int,
) -> evaluate.Generalisation:
    """Stage 1 and the trained artifact on as many training queries as were held out, so
    the report can say whether the held-out figure is a lack of steps or of queries."""
    sample = evaluate.training_sample(train, count=count, seed=args.seed)
    stage1 = evaluate.first_stage_systems(
        sample, retrieved.pools, depth=args.eval_depth, name=stage.value
    )[0]
    name = "trained, on training queries"
    system = evaluate.reranked(
        name, trained, sample, retrieved.pools, retrieved.texts, depth=args.eval_depth
    )
    _, tests, scored = evaluate.measure(
        [stage1, system], sample, trained=name, relevant=relevant, depth=args.eval_depth
    )
    return evaluate.Generalisation(
        scored, tests[stage1.name]["ndcg@10"], dict(held_lead[stage1.name]["ndcg@10"])
    )


def check_arguments(args: argparse.Namespace) -> None:
    if args.qrels is not None and args.queries is None:
        raise LabelError("--qrels needs --queries (the topics the qrels judge)")
    if args.queries is not None and args.qrels is None:
        raise LabelError("--queries needs --qrels (the judgements to train on)")
    sources = [args.labels is not None, args.from_feedback, args.qrels is not None]
    if sum(sources) != 1:
        raise LabelError(
            "give one label source: --queries with --qrels, --labels, or --from-feedback"
        )
    if (
        args.epochs < 1 or args.batch_size < 1 or args.list_size < 2 or args.negatives < 0
        or args.pseudo_queries < 0
    ):  # fmt: skip
        raise LabelError(
            "--epochs and --batch-size must be >= 1, --list-size >= 2, --negatives and "
            "--pseudo-queries >= 0"
        )
    if args.eval_depth < 1:
        raise LabelError("--eval-depth must be >= 1")
    unknown = set(precisions(args)) - set(PRECISIONS)
    if unknown or "int8" not in precisions(args):
        raise LabelError(f"--precisions must include int8 and name only {', '.join(PRECISIONS)}")
    if not (args.bi_encoder / "manifest.json").is_file():
        raise LabelError(f"--bi-encoder {args.bi_encoder} is not an exported bi-encoder")


def precisions(args: argparse.Namespace) -> list[str]:
    return [item.strip() for item in str(args.precisions).split(",") if item.strip()]


def read_labels(args: argparse.Namespace) -> list[Judged]:
    if args.labels is not None:
        return labels.from_jsonl(args.labels)
    if args.from_feedback:
        store = open_store(args.collection)
        try:
            return labels.from_feedback(store.feedback_labels())
        finally:
            store.close()
    return labels.from_trec(args.queries, args.qrels)


def made_queries(args: argparse.Namespace, *, grade: float) -> list[Judged]:
    """``--pseudo-queries`` queries from the collection's text, for training only."""
    if args.pseudo_queries <= 0:
        return []
    from tandem.training import pseudo

    store = open_store(args.collection)
    try:
        return pseudo.inverse_cloze(
            store, count=args.pseudo_queries, seed=args.seed, grade=grade or 1.0
        )
    finally:
        store.close()


def open_store(collection: Path) -> DocumentStore:
    from tandem.server.engine.collection import STORE_NAME
    from tandem.server.engine.store import DocumentStore, StoreError

    path = collection / STORE_NAME
    if not path.is_file():
        raise LabelError(f"{collection} is not a collection (no {STORE_NAME})")
    try:
        return DocumentStore(path, read_only=True)
    except StoreError as error:
        raise LabelError(f"{path}: {error}") from error


def split(judged: Sequence[Judged], args: argparse.Namespace) -> tuple[list[Judged], list[Judged]]:
    if args.eval_queries is not None:
        wanted = {query_id for query_id, _ in read_queries(args.eval_queries)}
        held = [item for item in judged if item.query_id in wanted]
        train = [item for item in judged if item.query_id not in wanted]
    else:
        train, held = labels.split(judged, eval_fraction=args.eval_fraction, seed=args.seed)
    if not held:
        raise LabelError(
            f"the split left no held-out query (of {len(judged)}): raise --eval-fraction, or "
            "name them with --eval-queries"
        )
    if not train:
        raise LabelError(
            f"the split left no training query (of {len(judged)}): lower --eval-fraction"
        )
    return train, held


def max_grade(judged: Sequence[Judged]) -> float:
    return max((grade for item in judged for grade in item.grades.values()), default=0.0)


def len_labelled(train: Sequence[Judged]) -> int:
    """How deep to mine: past a query's labelled documents, which the first stage finds too."""
    return min(max((len(item.grades) for item in train), default=0), 100)


def build(
    train: Sequence[Judged], retrieved: pools.Retrieved, args: argparse.Namespace
) -> list[Any]:
    from tandem.training import fit

    return fit.build_lists(
        train, retrieved.pools, retrieved.texts, negatives=args.negatives, margin=args.margin,
        list_size=args.list_size, distill=args.distill, seed=args.seed,
    )  # fmt: skip


def export(model: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The trained checkpoint through the export every reranker takes: each precision is
    checked against it (FP32) before its manifest says verified."""
    from tandem import rag24
    from tandem.export.parity import Thresholds
    from tandem.export.pipeline import ExportRequest, export_model
    from tandem.export.verify import Sample

    data = rag24.load()
    length = serve_length(args)
    artifacts = {}
    for precision in precisions(args):
        folder = args.out / f"reranker-{precision}"
        request = ExportRequest(
            kind="cross-encoder", model=str(model), out=folder, precision=precision,  # type: ignore[arg-type]
            force=True, threads=args.threads, max_length=length,
            sample=Sample(queries=args.verify_queries, candidates=args.verify_candidates),
            bars=Thresholds(
                min_mean_spearman=args.min_mean_spearman, min_topk_overlap=args.min_topk_overlap
            ),
        )  # fmt: skip
        export_model(request, data)
        artifacts[precision] = folder
    return artifacts


def serve_length(args: argparse.Namespace) -> int:
    """The exported artifact's tokens per pair: the length it trained at, unless named."""
    length: int = args.serve_max_length or args.max_length
    if length > args.max_length:
        log.warning(
            "--serve-max-length %d is longer than the %d tokens it trains at: pairs that "
            "long hold positions and text it never saw (from a new head, trained at 128 "
            "and served at 512, it scored 0.035 nDCG@10 lower on RAG24; RESULTS)",
            length, args.max_length,
        )  # fmt: skip
    return length


def label_source(args: argparse.Namespace) -> dict[str, Any]:
    files = [path for path in (args.queries, args.qrels, args.labels) if path is not None]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return {
        "files": [str(path) for path in files],
        "from_feedback": bool(args.from_feedback),
        "sha256": digest.hexdigest() if files else None,
    }


def split_rule(
    args: argparse.Namespace, train: Sequence[Judged], held: Sequence[Judged]
) -> dict[str, Any]:
    rule = (
        f"the queries in {args.eval_queries}" if args.eval_queries is not None
        else f"held out when int(sha1('{args.seed}:' + query_id), 16) % 10000 < "
             f"{int(args.eval_fraction * 10_000)}"
    )  # fmt: skip
    return {"rule": rule, "train_queries": len(train), "held_out_queries": len(held),
            "held_out_ids": [item.query_id for item in held]}  # fmt: skip
