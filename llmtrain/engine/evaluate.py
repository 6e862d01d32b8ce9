"""Evaluation: token-weighted loss and perplexity (causal LM); window accuracy and document
accuracy after combining the windows of each document (classification). The records are
described in docs/architecture.md, "Run directory".

Under torchrun each rank evaluates every world-th micro-batch and the sums are all-reduced,
so every rank returns the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from llmtrain.data.batching import IGNORE, SequenceSource, collate, split_micro
from llmtrain.engine.distributed import DistInfo, all_reduce_sum
from llmtrain.engine.loss import summed_loss
from llmtrain.engine.parallel import is_fsdp
from llmtrain.engine.precision import autocast_context

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


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    store: SequenceSource,
    *,
    task: str,
    micro: int,
    pad_id: int,
    device: torch.device,
    precision: str,
    aggregate: str = "mean_logits",
    max_batches: int | None = None,
    isolate_docs: bool = False,
    dist: DistInfo | None = None,
) -> dict[str, float]:
    """Loss (+ppl) or loss/accuracy/doc_accuracy over the eval store (or its first batches)."""
    dist = dist or DistInfo()
    was_training = model.training
    model.eval()
    batches = split_micro(np.arange(len(store)), micro)[:max_batches]
    mine = batches[dist.rank :: dist.world_size]
    classify = task == "sequence-classification"
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    n_rows = sum(len(b) for b in batches)
    window_logits: torch.Tensor | None = None
    labels_all = torch.zeros(n_rows, dtype=torch.long, device=device)
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
        with autocast_context(precision, device):
            logits = model(**batch).logits
        loss_sum += summed_loss(logits, labels, task).double()
        if classify:
            count += len(idx)
            if window_logits is None:
                window_logits = torch.zeros(
                    n_rows, logits.shape[-1], dtype=torch.float64, device=device
                )
            rows = torch.from_numpy(idx).to(device)
            window_logits[rows] = logits.double()
            labels_all[rows] = labels
        else:
            count += (labels[:, 1:] != IGNORE).sum()
    all_reduce_sum(loss_sum)
    all_reduce_sum(count)
    model.train(was_training)
    loss = (loss_sum / count.clamp(min=1)).item()
    if not classify:
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}
    if window_logits is None:  # this rank had nothing: join the reduction with zeros
        n_cls = int(model.config.num_labels)
        window_logits = torch.zeros(n_rows, n_cls, dtype=torch.float64, device=device)
    all_reduce_sum(window_logits)
    all_reduce_sum(labels_all)
    accuracy = (window_logits.argmax(-1) == labels_all).double().mean().item()
    doc_ids = np.asarray(store.doc_ids)[:n_rows]
    _, scores = aggregate_windows(window_logits, doc_ids, aggregate)
    _, first_row = np.unique(doc_ids, return_index=True)
    doc_labels = labels_all[torch.from_numpy(first_row).to(device)]
    doc_accuracy = (scores.argmax(-1) == doc_labels).double().mean().item()
    return {"loss": loss, "accuracy": accuracy, "doc_accuracy": doc_accuracy}
