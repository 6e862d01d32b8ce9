"""`llmtrain predict RUN_DIR --input FILE`: one prediction per document, through the run's own
tokenizer, windows and aggregation (docs/architecture.md, "Using a trained run").

Classification writes `{"id", "label", "probs": {label: p}, "windows"}` per document; a causal
LM `{"id", "loss", "ppl", "tokens", "windows"}` (next-token loss over the document's own
windows). The model runs through `engine.evaluate.forward_store`, the pass `fit`'s eval runs.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from llmtrain.console import human_console
from llmtrain.data.corpus import corpus_files
from llmtrain.engine.evaluate import (
    StoreOutputs,
    document_losses,
    document_probs,
    document_scores,
    forward_store,
)
from llmtrain.engine.step import StepSpec
from llmtrain.rundir.outputs import check_output
from llmtrain.rundir.trained import (
    InputStore,
    TrainedRun,
    encode_input,
    inference_batch,
    input_source,
    open_run,
    scoring_spec,
)
from llmtrain.util.atomic import atomic_write

SHOWN_ROWS = 20  # documents listed on a terminal; --output gets all of them


class _DocsPerSecond(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed or 0:,.1f} docs/s")


@contextmanager
def doc_progress(
    out: Console, docs: InputStore | Any, label: str
) -> Iterator[Callable[[np.ndarray], None]]:
    """A progress bar over documents (with docs/s) fed by forward_store's `on_batch`; a
    no-op off a terminal. Rows are in document order, so the last row's document tells how
    far the pass is."""
    doc_ids = np.asarray(docs.doc_ids)
    total = int(doc_ids.max()) + 1 if len(doc_ids) else 0
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("docs"),
        _DocsPerSecond(),
        console=out,
        transient=True,
        disable=not out.is_terminal,
    )
    task = progress.add_task(label, total=total)
    with progress:
        yield lambda rows: progress.update(task, completed=int(doc_ids[rows[-1]]) + 1)


def classification_rows(run: TrainedRun, docs: InputStore, out: StoreOutputs) -> list[dict]:
    """One row per document: the aggregated prediction, its probabilities, its windows."""
    method = run.cfg.data.chunk.aggregate
    ids, scores, _ = document_scores(out, docs.doc_ids, method)
    windows = torch.from_numpy(docs.windows()[ids])
    probs = document_probs(scores, method, windows).cpu().tolist()
    pred = scores.argmax(-1).cpu().tolist()
    names = run.label_names or [str(i) for i in range(scores.shape[1])]
    return [
        {
            "id": docs.names[d],
            "label": names[p],
            "probs": dict(zip(names, row, strict=True)),
            "windows": int(n),
        }
        for d, p, row, n in zip(ids.tolist(), pred, probs, windows.tolist(), strict=True)
    ]


def lm_rows(docs: InputStore, out: StoreOutputs) -> list[dict]:
    """One row per document: mean next-token loss over its windows, perplexity, targets."""
    n_docs = len(docs.names)
    loss, targets = document_losses(out, docs.doc_ids, n_docs)
    windows = docs.windows()
    rows = []
    for d in range(n_docs):
        mean = float(loss[d] / targets[d]) if targets[d] else None
        ppl = math.exp(min(mean, 700.0)) if mean is not None else None
        rows.append(
            {
                "id": docs.names[d],
                "loss": mean,
                "ppl": ppl,
                "tokens": int(targets[d]),
                "windows": int(windows[d]),
            }
        )
    return rows


def summarize(run: TrainedRun, docs: InputStore, rows: list[dict], seconds: float) -> dict:
    """Counts and speed; the document accuracy when every input document has a known label;
    for a causal LM the token-weighted loss and perplexity of the whole input."""
    summary: dict[str, Any] = {
        "documents": len(rows),
        "windows": len(docs),
        "seconds": round(seconds, 3),
        "docs_per_s": round(len(rows) / max(seconds, 1e-9), 2),
        "weights": str(run.weights),
    }
    if run.classify:
        known = set(run.label_names or ())
        if rows and all(g is not None and g in known for g in docs.gold):
            hits = [r["label"] == g for r, g in zip(rows, docs.gold, strict=True)]
            summary["doc_accuracy"] = sum(hits) / len(hits)
        return summary
    tokens = sum(r["tokens"] for r in rows)
    total = sum(r["loss"] * r["tokens"] for r in rows if r["loss"] is not None)
    if tokens:
        summary.update(loss=total / tokens, ppl=math.exp(min(total / tokens, 700.0)))
    summary["tokens"] = tokens
    return summary


def predict_rows(
    run: TrainedRun, docs: InputStore, micro: int, out: Console
) -> tuple[list[dict], float]:
    """The forward pass over every window, then the per-document rows; (rows, seconds)."""
    t0 = time.perf_counter()
    with doc_progress(out, docs, "predict") as on_batch:
        spec = replace(StepSpec.from_config(run.cfg), isolate_docs=docs.isolate_docs)
        outputs = forward_store(
            run.model,
            docs,
            spec,
            micro=micro,
            pad_id=run.pad_id,
            device=run.device,
            per_row=not run.classify,
            on_batch=on_batch,
        )
    rows = classification_rows(run, docs, outputs) if run.classify else lm_rows(docs, outputs)
    return rows, time.perf_counter() - t0


def render_rows(run: TrainedRun, rows: list[dict]) -> Table:
    """The first SHOWN_ROWS predictions as a table."""
    table = Table(title=f"predict · {run.path}", title_justify="left")
    if run.classify:
        for col in ("id", "label", "p", "windows"):
            table.add_column(col, justify="left" if col in ("id", "label") else "right")
        for r in rows[:SHOWN_ROWS]:
            p = r["probs"][r["label"]]
            table.add_row(r["id"], r["label"], f"{p:.3f}", str(r["windows"]))
    else:
        for col in ("id", "loss", "ppl", "tokens", "windows"):
            table.add_column(col, justify="left" if col == "id" else "right")
        for r in rows[:SHOWN_ROWS]:
            loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
            ppl = "-" if r["ppl"] is None else f"{r['ppl']:.4g}"
            table.add_row(r["id"], loss, ppl, str(r["tokens"]), str(r["windows"]))
    return table


def summary_line(summary: dict) -> str:
    n = summary["documents"]
    line = (
        f"{n:,} document{'' if n == 1 else 's'} ({summary['windows']:,} windows) in "
        f"{summary['seconds']:.1f}s, {summary['docs_per_s']:,.1f} docs/s"
    )
    if "doc_accuracy" in summary:
        line += f"; doc_accuracy {summary['doc_accuracy']:.4f} against the input's labels"
    if "loss" in summary:
        line += f"; loss {summary['loss']:.4f}, ppl {summary['ppl']:.4g}"
    return line


def execute(
    run_dir: str,
    *,
    input_path: str,
    output: str | None = None,
    batch: str | None = None,
    text_field: str | None = None,
    id_field: str | None = None,
    checkpoint: str | None = None,
    as_json: bool = False,
) -> dict:
    """Entry point of `llmtrain predict`; returns the summary (tests read it)."""
    out = human_console(as_json)
    trained = open_run(run_dir, checkpoint=checkpoint, needs_corpus=False)
    source = input_source(
        input_path, text_field=text_field, like=trained.cfg.data.train_parts[0].source
    )
    if id_field is not None:
        source = source.model_copy(update={"id_field": id_field or None})
    if output is not None:  # before any work: never over an input or the run's own files
        inputs = corpus_files(source, key="--input")
        runs = [trained.path, *([Path(checkpoint).parent.parent] if checkpoint else [])]
        check_output(output, option="--output", inputs=inputs, runs=runs)
    with tempfile.TemporaryDirectory(prefix="llmtrain-predict-") as tmp:
        docs = encode_input(trained, source, Path(tmp), spec=scoring_spec(trained), key="input")
        micro = inference_batch(trained, batch)
        rows, seconds = predict_rows(trained, docs, micro, out)
        summary = summarize(trained, docs, rows, seconds)
    if output is not None:
        atomic_write(Path(output), "".join(json.dumps(r) + "\n" for r in rows))
        summary["output"] = output
    if as_json:
        payload = {"summary": summary, **({} if output else {"predictions": rows})}
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()
        return summary
    if output is None:
        out.print(render_rows(trained, rows))
        if len(rows) > SHOWN_ROWS:
            out.print(f"… {len(rows) - SHOWN_ROWS:,} more; --output FILE.jsonl writes them all")
    else:
        out.print(f"wrote {len(rows):,} predictions to {output}", soft_wrap=True)
    out.print(summary_line(summary), highlight=False, soft_wrap=True)
    return summary
