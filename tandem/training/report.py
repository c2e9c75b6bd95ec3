"""The training report: a Markdown table, the JSON behind it, a plot, and the same figures in
the exported artifacts' manifests (so a server can say what its reranker measured)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tandem.artifact import read_manifest, write_manifest
from tandem.training.evaluate import Generalisation, Row

Tests = Mapping[str, Mapping[str, Mapping[str, float]]]


def render(summary: Mapping[str, Any], rows: Sequence[Row], tests: Tests, *, trained: str) -> str:
    evaluation = summary["evaluation"]
    split = summary["split"]
    training = summary["training"]
    lines = [
        f"Held out: {evaluation['queries']} queries with a document of grade >= "
        f"{evaluation['relevant']} ({split['rule']}; {split['train_queries']} trained on). "
        f"Rerankers reorder the first {evaluation['depth']} {summary['first_stage']['mode']} "
        "candidates.",
        "",
        f"| system | nDCG@10 | MRR@10 | Recall@{evaluation['depth']} | ms / pair | "
        "trained - system, nDCG@10 (95% CI, p) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        test = tests.get(row.system, {}).get("ndcg@10")
        versus = (
            "-" if test is None
            else f"{test['mean_difference']:+.3f} ({test['ci_low']:+.3f} to "
                 f"{test['ci_high']:+.3f}, p = {test['p_value']:.4f})"
        )  # fmt: skip
        ms = "-" if row.ms_per_pair is None else f"{row.ms_per_pair:.1f}"
        lines.append(
            f"| {row.system} | {row.ndcg_at_10:.3f} | {row.mrr_at_10:.3f} | {row.recall:.3f} "
            f"| {ms} | {versus} |"
        )
    lines += generalisation_lines(evaluation)
    rate = training["pairs_per_second"]
    timed = (
        f"{training['seconds'] / 60:.1f} min at {rate:.1f} pairs/s"
        if rate is not None
        else f"resumed after its last epoch, from {training['resumed_from']}, so no step was timed"
    )
    epochs = summary["recipe"]["epochs"]
    lines += [
        "",
        f"Training: {training['pairs_per_epoch']:,} pairs an epoch, {epochs} "
        f"epoch{'' if epochs == 1 else 's'}, {timed} ({training['device']}, "
        f"{training['threads']} threads, bf16 {'on' if training['bf16'] else 'off'}); loss "
        f"{summary['recipe']['loss']}, base {summary['base']['source']} "
        f"({summary['base']['kind']}).",
    ]
    return "\n".join(lines) + "\n"


def generalisation_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """The trained reranker's lead over stage 1 on its training queries beside the held-out
    one: both ahead, it learned relevance; ahead only on the first, it learned the queries."""
    seen = evaluation.get("training_queries")
    if not seen:
        return []
    lead = Generalisation(
        seen["queries"], seen["stage1_to_trained"], seen["held_out_stage1_to_trained"]
    )
    return ["", lead.sentence()]


def write(
    out: Path, summary: Mapping[str, Any], rows: Sequence[Row], tests: Tests, *, trained: str
) -> None:
    (out / "train.md").write_text(render(summary, rows, tests, trained=trained), encoding="utf-8")
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    try:
        title = f"tandem train: {summary['split']['rule']}"
        plot(rows, out / "train.png", title=title[:140])
    except ImportError:
        print("no plot: matplotlib is missing (pip install 'tandem[bench]')", file=sys.stderr)


def plot(rows: Sequence[Row], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(9, 0.6 * len(rows) + 1.6))
    names = [row.system for row in rows]
    positions = range(len(rows))
    height = 0.38
    axes.barh([p - height / 2 for p in positions], [row.ndcg_at_10 for row in rows], height,
              label="nDCG@10")  # fmt: skip
    axes.barh([p + height / 2 for p in positions], [row.mrr_at_10 for row in rows], height,
              label="MRR@10")  # fmt: skip
    for position, row in zip(positions, rows, strict=True):
        axes.text(row.ndcg_at_10 + 0.005, position - height / 2, f"{row.ndcg_at_10:.3f}",
                  va="center", fontsize=8)  # fmt: skip
    axes.set_yticks(list(positions), names)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.08)
    axes.set_xlabel("held-out queries")
    axes.legend(loc="lower right")
    axes.grid(True, axis="x", alpha=0.3)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def record_in_manifest(folder: Path, summary: Mapping[str, Any]) -> None:
    """Adds what the run was (base, data hash, split, recipe) and what it measured to the
    artifact's manifest. The manifest is not among the hashed files, so the artifact stays
    verified."""
    manifest = read_manifest(folder)
    evaluation = summary["evaluation"]
    trained = next(row for row in evaluation["rows"] if row["system"] == evaluation["trained"])
    extra = dict(manifest.extra)
    extra["training"] = {
        "base": summary["base"],
        "labels": summary["labels"],
        "split": {key: value for key, value in summary["split"].items() if key != "held_out_ids"},
        "recipe": summary["recipe"],
        "seconds": summary["training"]["seconds"],
        "held_out": {
            "queries": evaluation["queries"],
            "depth": evaluation["depth"],
            "first_stage": summary["first_stage"]["mode"],
            "ndcg_at_10": trained["ndcg_at_10"],
            "mrr_at_10": trained["mrr_at_10"],
            "rows": evaluation["rows"],
            "paired_tests": evaluation["paired_tests"],
        },
        "created_at": summary["created_at"],
    }
    write_manifest(folder, _with_extra(manifest, extra))


def _with_extra(manifest: Any, extra: dict[str, Any]) -> Any:
    from dataclasses import replace

    return replace(manifest, extra=extra)
