"""Runs' metrics records drawn into one PNG against the optimizer step: loss (train solid,
each eval set dashed), learning rate, tokens/s, grad norm, and accuracy or memory where
logged, several runs overlaid. Used by `llmtrain report` and, at the end of a run, by the
trackers that attach `report.png` (engine/trackers.py).

Drawn with matplotlib's object API on the Agg canvas: no display, no global pyplot state.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DPI = 110
EVAL_STYLES = ("--", "-.", ":", (0, (5, 1, 1, 1)))  # one per eval set, in the order logged


def is_eval(record: dict[str, Any]) -> bool:
    """An eval record: split `eval`, or `eval/<name>` for a named eval set."""
    split = record.get("split")
    return isinstance(split, str) and (split == "eval" or split.startswith("eval/"))


@dataclass
class RunMetrics:
    """One run's records, split by kind, in file order."""

    name: str
    path: Path
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]  # every eval set's records

    @classmethod
    def of(cls, name: str, path: Path, records: list[dict[str, Any]]) -> RunMetrics:
        train = [r for r in records if r.get("split") == "train"]
        return cls(name, path, train, [r for r in records if is_eval(r)])

    def eval_splits(self) -> list[str]:
        """The eval sets' splits in the order they were first logged."""
        return list(dict.fromkeys(str(r["split"]) for r in self.eval))

    def of_split(self, split: str) -> list[dict[str, Any]]:
        return [r for r in self.eval if r["split"] == split]

    def series(self, records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of `key` where it is a number."""
        pairs = [
            (int(r["step"]), float(r[key]))
            for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
        ]
        return [s for s, _ in pairs], [v for _, v in pairs]


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
    out += [("rank_budget", "AdaLoRA total rank budget")] if logged("train", "rank_budget") else []
    return out


def _line(ax: Any, series: tuple[list[int], list[float]], style: Any, **kw: Any) -> None:
    """One series, if the run logged it (an empty one would still get a legend entry);
    markers when there are few points, so a short run shows where its values are."""
    steps, values = series
    if not steps:
        return
    ax.plot(steps, values, marker="o" if len(steps) <= 30 else "", ls=style, ms=3, **kw)


def _evals(ax: Any, run: RunMetrics, key: str, color: str, suffix: str = "", **kw: Any) -> None:
    """`key` of every eval set of `run`, one line style per set, labelled with its split."""
    for i, split in enumerate(run.eval_splits()):
        style = EVAL_STYLES[i % len(EVAL_STYLES)]
        label = f"{run.name} {split}{suffix}"
        _line(ax, run.series(run.of_split(split), key), style, color=color, label=label, **kw)


def draw_panel(ax: Any, panel: str, runs: list[RunMetrics], colors: list[str]) -> None:
    """One panel: every run in its own color; train solid, eval sets dashed."""
    for run, color in zip(runs, colors, strict=True):
        if panel == "loss":
            _line(ax, run.series(run.train, "loss"), "-", color=color, label=f"{run.name} train")
            _evals(ax, run, "loss", color)
        elif panel == "accuracy":
            _evals(ax, run, "doc_accuracy", color, " doc_accuracy")
            # window accuracy: the same style per set, fainter
            _evals(ax, run, "accuracy", color, " accuracy (windows)", alpha=0.45)
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
