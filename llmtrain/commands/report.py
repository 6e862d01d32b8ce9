"""`llmtrain report RUN_DIR [RUN_DIR ...]`: one PNG of the runs' metrics.jsonl against the
optimizer step — loss (train and eval), learning rate, tokens/s, grad norm, and accuracy or
memory where logged — several runs overlaid, plus a summary table
(docs/architecture.md, "Using a trained run").

Drawn with matplotlib's object API on the Agg canvas (no display, no global pyplot state) and
written atomically.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llmtrain import layout
from llmtrain.console import human_console, say
from llmtrain.errors import LLMTrainError
from llmtrain.rundir.outputs import check_output
from llmtrain.rundir.trained import read_run_metrics, run_name
from llmtrain.util.atomic import atomic_write

DPI = 110


@dataclass
class RunMetrics:
    """One run's records, split by kind, in file order."""

    name: str
    path: Path
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]

    def series(self, records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of `key` where it is a number."""
        pairs = [
            (int(r["step"]), float(r[key]))
            for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
        ]
        return [s for s, _ in pairs], [v for _, v in pairs]


def load_runs(run_dirs: list[str]) -> list[RunMetrics]:
    """Each run's metrics; names are the runs' run.name, made unique with the directory."""
    runs = []
    for d in run_dirs:
        records, bad = read_run_metrics(d)
        if bad:
            say(f"skipped {len(bad)} unreadable line(s) of metrics.jsonl ({bad[0]})", label="note")
        train = [r for r in records if r.get("split") == "train"]
        evals = [r for r in records if r.get("split") == "eval"]
        if not train and not evals:
            raise LLMTrainError(f"{Path(d) / layout.METRICS_FILE}: no train or eval records yet")
        runs.append(RunMetrics(run_name(d), Path(d), train, evals))
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path})"
    return runs


def memory_keys(runs: list[RunMetrics]) -> list[str]:
    """Numeric train-record fields about memory (whatever name a run logged them under)."""
    keys: list[str] = []
    for run in runs:
        for r in run.train:
            for k, v in r.items():
                if "mem" in k and isinstance(v, (int, float)) and k not in keys:
                    keys.append(k)
    return keys


def panels(runs: list[RunMetrics]) -> list[tuple[str, str]]:
    """(panel, y label) for what the runs logged: loss always, the rest when present."""

    def logged(records: str, *keys: str) -> bool:
        return any(k in r for run in runs for r in getattr(run, records) for k in keys)

    out = [("loss", "loss")]
    out += [("lr", "learning rate")] if logged("train", "lr") else []
    out += [("tokens_per_s", "tokens/s")] if logged("train", "tokens_per_s") else []
    out += [("grad_norm", "grad norm")] if logged("train", "grad_norm") else []
    if logged("eval", "doc_accuracy", "accuracy"):
        out.append(("accuracy", "eval accuracy"))
    out += [("memory", "memory")] if memory_keys(runs) else []
    return out


def _line(ax: Any, series: tuple[list[int], list[float]], style: str, **kw: Any) -> None:
    """One series, if the run logged it (an empty one would still get a legend entry);
    markers when there are few points, so a short run shows where its values are."""
    steps, values = series
    if not steps:
        return
    marker = "o" if len(steps) <= 30 else ""
    ax.plot(steps, values, marker + style, ms=3, **kw)


def draw_panel(ax: Any, panel: str, runs: list[RunMetrics], colors: list[str]) -> None:
    """One panel: every run in its own color; train solid, eval dashed."""
    for run, color in zip(runs, colors, strict=True):
        if panel == "loss":
            _line(ax, run.series(run.train, "loss"), "-", color=color, label=f"{run.name} train")
            _line(ax, run.series(run.eval, "loss"), "--", color=color, label=f"{run.name} eval")
        elif panel == "accuracy":
            doc = run.series(run.eval, "doc_accuracy")
            _line(ax, doc, "-", color=color, label=f"{run.name} doc_accuracy")
            window = run.series(run.eval, "accuracy")
            _line(ax, window, ":", color=color, label=f"{run.name} accuracy (windows)")
        elif panel == "memory":
            for key in memory_keys([run]):
                _line(ax, run.series(run.train, key), "-", color=color, label=f"{run.name} {key}")
        else:
            _line(ax, run.series(run.train, panel), "-", color=color, label=run.name)
    if panel in ("loss", "accuracy", "memory"):
        ax.legend(fontsize="small")


def draw(runs: list[RunMetrics]) -> bytes:
    """The PNG: a grid of panels sharing the step axis, a legend of run names on top."""
    from matplotlib.figure import Figure

    shown = panels(runs)
    rows = (len(shown) + 1) // 2
    fig = Figure(figsize=(12, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (panel, label) in zip(axes, shown, strict=False):
        draw_panel(ax, panel, runs, colors)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel in ("loss", "lr", "grad_norm") and _positive(ax):
            ax.set_yscale("log")
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    handles = [axes[0].plot([], [], color=c)[0] for c in colors]
    fig.legend(handles, [r.name for r in runs], loc="outside upper center", ncols=min(4, len(runs)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _positive(ax: Any) -> bool:
    """A log scale is readable only when every plotted value is positive (and varies)."""
    values = [y for line in ax.get_lines() for y in line.get_ydata()]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


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
    evals = [r for r in run.eval if isinstance(r.get("loss"), (int, float))]
    if evals:
        best = min(evals, key=lambda r: r["loss"])
        row.update(
            final_eval_loss=evals[-1]["loss"],
            best_eval_loss=best["loss"],
            best_eval_step=best["step"],
        )
    accs = [r for r in run.eval if isinstance(r.get("doc_accuracy"), (int, float))]
    if accs:
        best = max(accs, key=lambda r: r["doc_accuracy"])
        row.update(best_doc_accuracy=best["doc_accuracy"], best_doc_accuracy_step=best["step"])
    return row


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(out: Console, rows: list[dict[str, Any]], path: Path) -> None:
    table = Table(title="llmtrain report", title_justify="left")
    for col in ("run", "steps", "tokens", "final loss", "best eval", "wall time"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        best = "-"
        if "best_eval_loss" in r:
            best = f"loss {r['best_eval_loss']:.4f} @ {r['best_eval_step']}"
        if "best_doc_accuracy" in r:
            best += f", doc_acc {r['best_doc_accuracy']:.3f} @ {r['best_doc_accuracy_step']}"
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
            best,
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
