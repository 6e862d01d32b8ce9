"""`llmtrain report RUN_DIR [RUN_DIR ...]`: one PNG of the runs' metrics.jsonl against the
optimizer step — loss (train and eval), learning rate, tokens/s, grad norm, and accuracy,
memory or AdaLoRA's rank budget where logged — several runs overlaid, plus a summary table
(docs/architecture.md, "Using a trained run").

The drawing is `llmtrain.plot`'s (also used by the trackers at the end of a run); the PNG is
written atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from llmtrain import layout
from llmtrain.config.schema import HIGHER_IS_BETTER
from llmtrain.console import human_console, say
from llmtrain.errors import LLMTrainError
from llmtrain.plot import RunMetrics, draw
from llmtrain.rundir.outputs import check_output
from llmtrain.rundir.trained import read_run_metrics, run_name
from llmtrain.util.atomic import atomic_write


def load_runs(run_dirs: list[str]) -> list[RunMetrics]:
    """Each run's metrics; names are the runs' run.name, made unique with the directory."""
    runs = []
    for d in run_dirs:
        records, bad = read_run_metrics(d)
        if bad:
            say(f"skipped {len(bad)} unreadable line(s) of metrics.jsonl ({bad[0]})", label="note")
        run = RunMetrics.of(run_name(d), Path(d), records)
        if not run.train and not run.eval:
            raise LLMTrainError(f"{Path(d) / layout.METRICS_FILE}: no train or eval records yet")
        runs.append(run)
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path})"
    return runs


def wall_seconds(train: list[dict[str, Any]]) -> float | None:
    """Training time over every session of the run: elapsed_s restarts at a resume, so the
    last value of each session is added up."""
    total, last = 0.0, None
    for r in train:
        t = r.get("elapsed_s")
        if not isinstance(t, (int, float)):
            continue
        if last is not None and t < last:
            total += last
        last = t
    return None if last is None else total + last


def best_metric_of(run: RunMetrics) -> tuple[str, str] | None:
    """(split, key) that "best eval" means for this run: its train.best_metric (read from its
    config without validation, like run.name), else the loss of the first eval set logged."""
    try:
        data = yaml.safe_load((run.path / "config.resolved.yaml").read_text(encoding="utf-8"))
        value = data["train"]["best_metric"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        value = None
    if isinstance(value, str) and ":" in value:
        split, _, key = value.partition(":")
        return split, key
    splits = run.eval_splits()
    return (splits[0], "loss") if splits else None


def best_eval(run: RunMetrics) -> dict[str, Any]:
    """The best eval record by the run's best metric (lowest loss/ppl, highest accuracy),
    plus the final and best loss of that eval set."""
    chosen = best_metric_of(run)
    if chosen is None:
        return {}
    split, key = chosen
    row: dict[str, Any] = {"best_metric": f"{split}:{key}"}
    records = [r for r in run.of_split(split) if isinstance(r.get(key), (int, float))]
    if records:
        pick = max if key in HIGHER_IS_BETTER else min
        best = pick(records, key=lambda r: r[key])
        row.update(best_value=best[key], best_step=best["step"])
    losses = [r for r in run.of_split(split) if isinstance(r.get("loss"), (int, float))]
    if losses:
        best = min(losses, key=lambda r: r["loss"])
        row.update(
            final_eval_loss=losses[-1]["loss"],
            best_eval_loss=best["loss"],
            best_eval_step=best["step"],
        )
    accs = [r for r in run.of_split(split) if isinstance(r.get("doc_accuracy"), (int, float))]
    if accs:
        best = max(accs, key=lambda r: r["doc_accuracy"])
        row.update(best_doc_accuracy=best["doc_accuracy"], best_doc_accuracy_step=best["step"])
    return row


def summary(run: RunMetrics) -> dict[str, Any]:
    """Final loss, best eval, steps, tokens and wall time of one run."""
    steps = [int(r["step"]) for r in run.train + run.eval]
    row: dict[str, Any] = {
        "run": run.name,
        "path": str(run.path),
        "steps": max(steps) if steps else 0,
        "tokens": sum(int(r.get("tokens", 0)) for r in run.train),
        "final_loss": run.train[-1]["loss"] if run.train else None,
        "wall_s": wall_seconds(run.train),
    }
    row.update(best_eval(run))
    return row


def best_text(r: dict[str, Any]) -> str:
    """The table's "best eval": the best metric's value and step (its split named when the
    run has named eval sets), a classifier's best doc_accuracy beside a loss."""
    if "best_value" not in r:
        return "-"
    split, _, key = r["best_metric"].partition(":")
    where = "" if split == "eval" else f"{split} "
    text = f"{where}{key} {r['best_value']:.4f} @ {r['best_step']}"
    if key == "loss" and "best_doc_accuracy" in r:
        text += f", doc_acc {r['best_doc_accuracy']:.3f} @ {r['best_doc_accuracy_step']}"
    return text


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(out: Console, rows: list[dict[str, Any]], path: Path) -> None:
    table = Table(title="llmtrain report", title_justify="left")
    for col in ("run", "steps", "tokens", "final loss", "best eval", "wall time"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        wall = (
            "-"
            if r["wall_s"] is None
            else f"{r['wall_s'] / 60:.1f} min"
            if r["wall_s"] >= 120
            else f"{r['wall_s']:.1f} s"
        )
        table.add_row(
            r["run"],
            f"{r['steps']:,}",
            f"{r['tokens']:,}",
            _num(r["final_loss"], ".4f"),
            best_text(r),
            wall,
        )
    out.print(table)
    out.print(f"wrote {path}", soft_wrap=True)


def execute(run_dirs: list[str], *, output: str | None = None, as_json: bool = False) -> Path:
    """Entry point of `llmtrain report`; returns the PNG's path."""
    if not run_dirs:
        raise LLMTrainError("report: give at least one run directory")
    runs = load_runs(run_dirs)
    path = (
        Path(output)
        if output
        else (
            Path(run_dirs[0]) / layout.REPORT_FILE if len(runs) == 1 else Path(layout.REPORT_FILE)
        )
    )
    metrics = [Path(d) / layout.METRICS_FILE for d in run_dirs]
    check_output(path, option="--output", inputs=metrics, runs=[Path(d) for d in run_dirs])
    atomic_write(path, draw(runs))
    rows = [summary(r) for r in runs]
    if as_json:
        sys.stdout.write(json.dumps({"output": str(path), "runs": rows}) + "\n")
        sys.stdout.flush()
    else:
        render(human_console(as_json), rows, path)
    return path
