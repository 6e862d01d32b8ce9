"""`llmtrain evaluate RUN_DIR`: fit's eval record again, for the final model or a checkpoint,
on the run's eval store (or `--input`, chunked as the run chunks); classification adds a
per-class precision/recall table and the confusion matrix of the documents.

The numbers come from `engine.evaluate.forward_store` + `scores_of`, what `fit`'s eval runs,
with the same micro-batch and `train.eval_max_batches`: on the run's eval data they equal the
eval record of the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from llmtrain import layout
from llmtrain.console import human_console
from llmtrain.data.batching import SequenceSource
from llmtrain.data.chunk_spec import resolve_spec
from llmtrain.data.store_cache import ensure_stores
from llmtrain.engine.evaluate import StoreOutputs, document_scores, forward_store, scores_of
from llmtrain.engine.loss import resolve_loss_chunk
from llmtrain.engine.step import StepSpec
from llmtrain.errors import LLMTrainError
from llmtrain.rundir.trained import (
    TrainedRun,
    encode_input,
    inference_batch,
    input_source,
    open_run,
    read_run_metrics,
)


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """[n, n] counts: row = the true class, column = the predicted one."""
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (true, pred), 1)
    return m


def per_class(matrix: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where a class
    was never predicted or never present: no division by zero)."""
    rows = []
    for i, name in enumerate(names):
        tp = int(matrix[i, i])
        predicted, support = int(matrix[:, i].sum()), int(matrix[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {"label": name, "precision": precision, "recall": recall, "f1": f1, "support": support}
        )
    return rows


def eval_sources(
    run: TrainedRun, input_path: str | None, text_field: str | None, tmp: Path
) -> dict[str, SequenceSource]:
    """The stores to evaluate on, by split: `--input` chunked like the run's data (labels
    required for a classifier) as split "eval", else the run's own eval sets (reused, or
    rebuilt from their corpora): "eval", or "eval/<name>" for each named set."""
    if input_path is not None:
        data = run.cfg.data
        like = next(iter(data.eval_sets.values()), data.train_parts[0].source)
        source = input_source(input_path, text_field=text_field, like=like)
        spec = resolve_spec(run.cfg, run.tokenizer)
        store = encode_input(run, source, tmp, spec=spec, require_label=run.classify, key="input")
        return {"eval": store}
    report = ensure_stores(run.cfg, run.tokenizer, progress=False)
    stores = {s: st for s, st in report.stores.items() if s != "train" and len(st) > 0}
    if not stores:
        raise LLMTrainError(
            f"{run.path}: the run has no eval data (data.eval / data.eval_fraction); give "
            "--input FILE"
        )
    return stores


def classification_details(run: TrainedRun, store: SequenceSource, out: StoreOutputs) -> dict:
    """The documents' confusion matrix and per-class scores (after data.chunk.aggregate)."""
    _, scores, doc_labels = document_scores(
        out, np.asarray(store.doc_ids), run.cfg.data.chunk.aggregate
    )
    names = run.label_names or [str(i) for i in range(scores.shape[1])]
    matrix = confusion_matrix(doc_labels.cpu().numpy(), scores.argmax(-1).cpu().numpy(), len(names))
    return {"labels": names, "confusion": matrix.tolist(), "per_class": per_class(matrix, names)}


def weights_step(run: TrainedRun) -> int | None:
    """The optimizer step of the weights: the checkpoint's, or the run's last for final/."""
    if run.weights.name.startswith(layout.CHECKPOINT_PREFIX):
        digits = run.weights.name.removeprefix(layout.CHECKPOINT_PREFIX)
        return int(digits) if digits.isdigit() else None
    try:
        records, _ = read_run_metrics(run.path)
    except LLMTrainError:
        return None
    steps = [int(r["step"]) for r in records if r.get("split") in ("train", "eval")]
    return max(steps) if steps else None


def evaluate_run(
    run: TrainedRun,
    store: SequenceSource,
    micro: int,
    *,
    max_batches: int | None,
    split: str = "eval",
) -> dict[str, Any]:
    """fit's eval record for these weights (split, step, metrics) plus, for a classifier,
    the per-class table and confusion matrix."""
    cfg = run.cfg
    isolate = getattr(store, "isolate_docs", cfg.data.is_isolated)
    # fit's eval computes a causal LM's loss chunked when train.loss_chunk resolves to it
    chunk = resolve_loss_chunk(cfg.train.loss_chunk, run.model, cfg.model.task).tokens
    spec = dataclasses.replace(StepSpec.from_config(cfg, chunk), isolate_docs=isolate)
    out = forward_store(
        run.model,
        store,
        spec,
        micro=micro,
        pad_id=run.pad_id,
        device=run.device,
        max_batches=max_batches,
    )
    result: dict[str, Any] = {"split": split, "step": weights_step(run)}
    result.update(scores_of(out, np.asarray(store.doc_ids), cfg.data.chunk.aggregate))
    if run.classify:
        result.update(classification_details(run, store, out))
    result["weights"] = str(run.weights)
    result["micro_batch"] = micro
    return result


def render(out: Console, result: dict[str, Any]) -> None:
    """The metrics, one row per eval set, then (classification) each set's per-class scores
    and confusion matrix."""
    out.print(f"evaluate {result['weights']} (step {result['step']})", soft_wrap=True)
    sets = result.get("sets", [result])
    table = Table()
    metrics = [k for k in ("loss", "ppl", "accuracy", "doc_accuracy") if k in sets[0]]
    named = "sets" in result
    if named:
        table.add_column("set")
    for k in metrics:
        table.add_column(k, justify="right")
    for r in sets:
        cells = [f"{r[k]:.4f}" if k != "ppl" else f"{r[k]:.4g}" for k in metrics]
        table.add_row(*([r["split"]] if named else []), *cells)
    out.print(table)
    for r in sets:
        if "per_class" in r:
            render_classes(out, r, f" {r['split']}" if named else "")


def render_classes(out: Console, result: dict[str, Any], where: str) -> None:
    """One eval set's per-class scores and confusion matrix (documents)."""
    classes = Table(title=f"per class{where} (documents)", title_justify="left")
    for col in ("label", "precision", "recall", "f1", "support"):
        classes.add_column(col, justify="left" if col == "label" else "right")
    for r in result["per_class"]:
        classes.add_row(
            r["label"],
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
            f"{r['f1']:.3f}",
            str(r["support"]),
        )
    out.print(classes)
    confusion = Table(title=f"confusion{where} (documents)", title_justify="left")
    confusion.add_column("true \\ predicted")
    for name in result["labels"]:
        confusion.add_column(name, justify="right")
    for name, row in zip(result["labels"], result["confusion"], strict=True):
        confusion.add_row(name, *(str(v) for v in row))
    out.print(confusion)


def combined(sets: list[dict[str, Any]]) -> dict[str, Any]:
    """Named eval sets: what the sets share once, their records under "sets"."""
    shared = ("step", "weights", "micro_batch")
    return {
        **{k: sets[0][k] for k in shared},
        "sets": [{k: v for k, v in r.items() if k not in shared} for r in sets],
    }


def execute(
    run_dir: str,
    *,
    input_path: str | None = None,
    checkpoint: str | None = None,
    batch: str | None = None,
    text_field: str | None = None,
    as_json: bool = False,
) -> dict[str, Any]:
    """Entry point of `llmtrain evaluate`; returns the result (tests read it): fit's eval
    record for one eval set; {"step", "weights", "micro_batch", "sets": [record, ...]} for
    named eval sets, one record per set."""
    out = human_console(as_json)
    trained = open_run(run_dir, checkpoint=checkpoint, needs_corpus=input_path is None)
    with tempfile.TemporaryDirectory(prefix="llmtrain-evaluate-") as tmp:
        stores = eval_sources(trained, input_path, text_field, Path(tmp))
        micro = inference_batch(trained, batch)
        # fit caps its eval at eval_max_batches micro-batches; an --input is read whole
        cap = trained.cfg.train.eval_max_batches if input_path is None else None
        sets = [
            evaluate_run(trained, store, micro, max_batches=cap, split=split)
            for split, store in stores.items()
        ]
    result = sets[0] if list(stores) == ["eval"] else combined(sets)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    else:
        render(out, result)
    return result
