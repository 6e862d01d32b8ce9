"""Evaluation: token-weighted loss and perplexity (causal LM); window accuracy and document
accuracy after combining the windows of each document (classification). The records are
described in docs/architecture.md, "Run directory".

`forward_store` is the one pass over a store that both `fit`'s eval (`evaluate`) and
`llmtrain predict` / `llmtrain evaluate` run: the same micro-batches, the same collate, the same
window logits, so a prediction made after training is the one eval scored.

Under torchrun each rank evaluates every world-th micro-batch and the sums are all-reduced,
so every rank returns the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llmtrain.data.batching import IGNORE, SequenceSource, collate, split_micro
from llmtrain.engine.distributed import DistInfo, all_reduce_sum
from llmtrain.engine.loss import model_loss, summed_loss
from llmtrain.engine.parallel import is_fsdp
from llmtrain.engine.precision import autocast_context
from llmtrain.engine.step import StepSpec

AGGREGATES = ("mean_logits", "max_logits", "mean_probs", "first", "vote")


def aggregate_windows(
    logits: torch.Tensor, doc_ids: np.ndarray, method: str
) -> tuple[np.ndarray, torch.Tensor]:
    """Combine window logits [n, C] into one score row per document.

    Windows are in store order, so a document's first window is its lowest index. Returns
    (the sorted unique doc ids, scores [D, C]); the prediction is argmax of a row. For a
    document with a single window every method predicts exactly that window's argmax.
    """
    docs, inverse = np.unique(doc_ids, return_inverse=True)
    inv = torch.from_numpy(inverse).to(logits.device)
    n_docs, n_cls = len(docs), logits.shape[1]
    counts = torch.zeros(n_docs, dtype=logits.dtype, device=logits.device).index_add_(
        0, inv, torch.ones_like(inv, dtype=logits.dtype)
    )[:, None]

    def mean_of(x: torch.Tensor) -> torch.Tensor:
        return (
            torch.zeros(n_docs, n_cls, dtype=x.dtype, device=x.device).index_add_(0, inv, x)
            / counts
        )

    if method == "mean_logits":
        return docs, mean_of(logits)
    if method == "mean_probs":
        return docs, mean_of(logits.softmax(-1))
    if method == "max_logits":
        out = torch.full((n_docs, n_cls), -math.inf, dtype=logits.dtype, device=logits.device)
        return docs, out.scatter_reduce_(0, inv[:, None].expand_as(logits), logits, "amax")
    if method == "first":
        first = np.full(n_docs, -1)
        for row in range(len(inverse) - 1, -1, -1):  # walk backwards: the lowest row wins
            first[inverse[row]] = row
        return docs, logits[torch.from_numpy(first)]
    if method == "vote":
        votes = F.one_hot(logits.argmax(-1), n_cls).to(logits.dtype)
        # Ties go to the class with the higher mean probability (a term below one vote).
        return docs, mean_of(votes) * counts + 1e-3 * mean_of(logits.softmax(-1))
    raise ValueError(f"unknown aggregate {method!r}; expected one of {AGGREGATES}")


@dataclass
class StoreOutputs:
    """What one pass over the first `n_rows` rows of a store produced, all-reduced.

    `loss_sum / count` is the eval loss. Classification: `window_logits` [n_rows, C] (fp64)
    and `labels` [n_rows], in store row order. Causal LM with `per_row`: `row_loss` and
    `row_targets` [n_rows], each row's summed next-token loss and its number of targets.
    """

    loss_sum: torch.Tensor
    count: torch.Tensor
    n_rows: int
    labels: torch.Tensor
    window_logits: torch.Tensor | None = None
    row_loss: torch.Tensor | None = None
    row_targets: torch.Tensor | None = None


def row_token_losses(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a causal-LM batch: (summed next-token loss, number of targets), fp64."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(targets.shape)
    return per_token.double().sum(dim=1), (targets != IGNORE).sum(dim=1).double()


class _Accumulator:
    """The sums a pass collects, on one rank, before the all-reduce."""

    def __init__(self, n_rows: int, device: torch.device, classify: bool, per_row: bool):
        self.device, self.classify = device, classify
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.labels = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.n_rows = n_rows
        self.window_logits: torch.Tensor | None = None
        self.row_loss = self.row_targets = None
        if per_row and not classify:
            self.row_loss = torch.zeros(n_rows, dtype=torch.float64, device=device)
            self.row_targets = torch.zeros(n_rows, dtype=torch.float64, device=device)

    def add(self, idx: np.ndarray, logits: torch.Tensor, labels: torch.Tensor, task: str) -> None:
        self.loss_sum += summed_loss(logits, labels, task).double()
        rows = torch.from_numpy(idx).to(self.device)
        if self.classify:
            self.count += len(idx)
            if self.window_logits is None:
                self.window_logits = torch.zeros(
                    self.n_rows, logits.shape[-1], dtype=torch.float64, device=self.device
                )
            self.window_logits[rows] = logits.double()
            self.labels[rows] = labels
            return
        self.count += (labels[:, 1:] != IGNORE).sum()
        if self.row_loss is not None:
            self.row_loss[rows], self.row_targets[rows] = row_token_losses(logits, labels)

    def add_summed(self, summed: torch.Tensor, labels: torch.Tensor) -> None:
        """Causal LM: a micro-batch's summed loss, computed without its logits (loss_chunk)."""
        self.loss_sum += summed.double()
        self.count += (labels[:, 1:] != IGNORE).sum()

    def reduced(self, num_labels: int) -> StoreOutputs:
        """All-reduce over ranks (no-ops in one process) into the pass's outputs."""
        all_reduce_sum(self.loss_sum)
        all_reduce_sum(self.count)
        if self.classify:
            if self.window_logits is None:  # this rank had nothing: join with zeros
                self.window_logits = torch.zeros(
                    self.n_rows, num_labels, dtype=torch.float64, device=self.device
                )
            all_reduce_sum(self.window_logits)
            all_reduce_sum(self.labels)
        for t in (self.row_loss, self.row_targets):
            if t is not None:
                all_reduce_sum(t)
        return StoreOutputs(
            self.loss_sum,
            self.count,
            self.n_rows,
            self.labels,
            self.window_logits,
            self.row_loss,
            self.row_targets,
        )


@torch.no_grad()
def forward_store(
    model: torch.nn.Module,
    store: SequenceSource,
    spec: StepSpec,
    *,
    micro: int,
    pad_id: int,
    device: torch.device,
    max_batches: int | None = None,
    dist: DistInfo | None = None,
    per_row: bool = False,
    on_batch: Callable[[np.ndarray], None] | None = None,
) -> StoreOutputs:
    """Run the model over the store (or its first `max_batches` micro-batches of `micro`
    rows, in store order) and collect loss sums and window logits; see StoreOutputs.
    `spec` as training's: task, precision, document isolation, and `loss_chunk` (a causal
    LM without `per_row` computes the loss chunked, as training does: engine/loss.py).
    `on_batch(rows)` is called after each micro-batch (a progress bar)."""
    dist = dist or DistInfo()
    task, precision, loss_chunk = spec.task, spec.precision, spec.loss_chunk
    isolate_docs = spec.isolate_docs
    was_training = model.training
    model.eval()
    batches = split_micro(np.arange(len(store)), micro)[:max_batches]
    mine = batches[dist.rank :: dist.world_size]
    classify = task == "sequence-classification"
    acc = _Accumulator(sum(len(b) for b in batches), device, classify, per_row)
    if is_fsdp(model) and len(mine) < -(-len(batches) // dist.world_size):
        # FSDP forwards are collectives (all-gathers): every rank runs as many; this one
        # repeats a batch whose result it drops
        with autocast_context(precision, device):
            batch = collate(store, batches[0], pad_id=pad_id, task=task, isolate_docs=isolate_docs)
            batch.pop("labels")
            model(**{k: v.to(device) for k, v in batch.items()})
    for idx in mine:
        batch = collate(store, idx, pad_id=pad_id, task=task, isolate_docs=isolate_docs)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        if loss_chunk is not None and not classify and not per_row:
            summed = model_loss(
                model,
                batch,
                labels,
                task=task,
                normalization="tokens",
                precision=precision,
                device=device,
                loss_chunk=loss_chunk,
            )
            acc.add_summed(summed, labels)
        else:
            with autocast_context(precision, device):
                logits = model(**batch).logits
            acc.add(idx, logits, labels, task)
            del logits  # not alive during the next micro-batch's forward
        if on_batch is not None:
            on_batch(idx)
    model.train(was_training)
    return acc.reduced(int(getattr(model.config, "num_labels", 0) or 0))


def document_scores(
    out: StoreOutputs, doc_ids: np.ndarray, aggregate: str
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Classification: (sorted doc ids, aggregated scores [D, C], each document's label —
    that of its first window). `doc_ids` is the store's, per row."""
    assert out.window_logits is not None, "document_scores needs a classification pass"
    doc_ids = np.asarray(doc_ids)[: out.n_rows]
    docs, scores = aggregate_windows(out.window_logits, doc_ids, aggregate)
    _, first_row = np.unique(doc_ids, return_index=True)
    doc_labels = out.labels[torch.from_numpy(first_row).to(out.labels.device)]
    return docs, scores, doc_labels


def document_probs(scores: torch.Tensor, method: str, windows: torch.Tensor) -> torch.Tensor:
    """Class probabilities per document from `aggregate_windows` scores: the softmax of the
    aggregated logits (mean_logits, max_logits, first), the mean probabilities (mean_probs),
    or the share of its `windows` that voted for each class (vote)."""
    if method == "mean_probs":
        return scores
    if method == "vote":  # scores = votes + a tie-break term below 1e-3: round to the votes
        return torch.round(scores) / windows.to(scores.dtype)[:, None]
    return scores.softmax(-1)


def document_losses(
    out: StoreOutputs, doc_ids: np.ndarray, n_docs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Causal LM (a `per_row` pass): per document 0..n_docs-1, (summed next-token loss,
    number of targets) over all of its windows."""
    assert out.row_loss is not None and out.row_targets is not None, "needs per_row=True"
    owners = np.asarray(doc_ids)[: out.n_rows]
    loss = np.bincount(owners, weights=out.row_loss.cpu().numpy(), minlength=n_docs)
    targets = np.bincount(owners, weights=out.row_targets.cpu().numpy(), minlength=n_docs)
    return loss, targets


def scores_of(out: StoreOutputs, doc_ids: np.ndarray, aggregate: str) -> dict[str, float]:
    """fit's eval record from a pass: loss and ppl (causal LM), or loss, window accuracy
    and document accuracy after `aggregate` (classification)."""
    loss = (out.loss_sum / out.count.clamp(min=1)).item()
    if out.window_logits is None:
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}
    accuracy = (out.window_logits.argmax(-1) == out.labels).double().mean().item()
    _, scores, doc_labels = document_scores(out, doc_ids, aggregate)
    doc_accuracy = (scores.argmax(-1) == doc_labels).double().mean().item()
    return {"loss": loss, "accuracy": accuracy, "doc_accuracy": doc_accuracy}


def evaluate(
    model: torch.nn.Module,
    store: SequenceSource,
    spec: StepSpec,
    *,
    micro: int,
    pad_id: int,
    device: torch.device,
    aggregate: str = "mean_logits",
    max_batches: int | None = None,
    dist: DistInfo | None = None,
) -> dict[str, float]:
    """Loss (+ppl) or loss/accuracy/doc_accuracy over the eval store (or its first batches)."""
    out = forward_store(
        model,
        store,
        spec,
        micro=micro,
        pad_id=pad_id,
        device=device,
        max_batches=max_batches,
        dist=dist,
    )
    return scores_of(out, np.asarray(store.doc_ids), aggregate)
