"""Which sequences go into which optimizer step, and how a micro-batch becomes tensors.

The order depends only on (seed, epoch) — never on micro_batch, k or the world size — so any
(micro, k, world) that reaches the same global batch sees the same sequences in every step
(docs/architecture.md, "Exact accumulation"). A step's *window* is `global_batch` consecutive
entries of the epoch's permutation; each rank takes a contiguous share of it and cuts that into
micro-batches.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Protocol

import numpy as np
import torch

IGNORE = -100  # the label value cross_entropy skips


class SequenceSource(Protocol):
    """What the loop needs from a TokenStore (an in-memory fake satisfies it in tests)."""

    lengths: np.ndarray

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    def doc_starts(self, i: int) -> np.ndarray: ...


# ------------------------------------------------------------------------------- order
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the n sequences for this epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Optimizer steps per pass; the last window of an epoch holds the remainder."""
    return max(1, math.ceil(n / global_batch))


def total_steps(n: int, global_batch: int, max_steps: int | None, epochs: float | None) -> int:
    """max_steps, or ceil(epochs × steps per epoch)."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil((epochs or 1.0) * steps_per_epoch(n, global_batch)))


def window_indices(order: np.ndarray, step_in_epoch: int, global_batch: int) -> np.ndarray:
    """The sequences of one optimizer step (shorter for the last step of an epoch)."""
    return order[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch]


def rank_share(window: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of a window: as even as possible, the first len % world
    ranks one more; the union over ranks is exactly the window, never rounded."""
    base, extra = divmod(len(window), world)
    start = rank * base + min(rank, extra)
    return window[start : start + base + (1 if rank < extra else 0)]


def split_micro(share: np.ndarray, micro: int) -> list[np.ndarray]:
    """Cut a share into micro-batches of at most `micro` (the last one may be smaller)."""
    return [share[i : i + micro] for i in range(0, len(share), micro)]


def micro_steps(window_len: int, micro: int, world: int = 1) -> int:
    """Micro-batches that every rank runs for a window: as many as the busiest rank needs.

    A rank with a smaller share — or none, in an epoch's last window — runs zero-weight
    stand-ins for the difference, because every rank must join the same collectives (DDP's
    gradient all-reduce on the last micro-batch, FSDP's all-gathers on every one)."""
    return max(1, math.ceil(math.ceil(window_len / world) / micro))


def grad_accum(global_batch: int, micro: int, world: int = 1) -> int:
    """k = ceil(global / (micro × world)): micro-batches per optimizer step on the busiest rank."""
    return math.ceil(global_batch / (micro * world))


# ------------------------------------------------------------------------------ collate
def collate(
    store: SequenceSource,
    indices: np.ndarray,
    *,
    pad_id: int,
    task: str,
    isolate_docs: bool = False,
) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch, padded to its longest sequence (right padding).

    causal-lm: `labels` are the input ids with IGNORE on padding (the model input is not shifted;
    the loss shifts), and on every token a store's `loss_mask` marks as no target (instruction
    data: prompts, system text). classification: `labels` holds one class id per sequence.
    `isolate_docs` (pack mode, cross_doc_attention false): position ids restart at every
    document start and the first token of each document after the first is not a target, and
    no attention_mask is passed — transformers then derives a per-document causal mask from the
    restarting positions (masking_utils.find_packed_sequence_indices). Padding becomes one more
    segment of its own, so real tokens never see it. (Not transformers'
    DataCollatorWithFlattening: it flattens the micro-batch into one row, which gives the same
    loss but a (micro × seq_len)² attention mask outside flash-attention, one "sequence" for
    normalization: sequences, and no classification; docs/benchmarks.md, "Collation".)
    """
    items = [store[int(i)] for i in indices]
    width = max(len(it["input_ids"]) for it in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, it in enumerate(items):
        ids = torch.from_numpy(np.asarray(it["input_ids"], dtype=np.int64))
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if task == "sequence-classification":
        batch["attention_mask"] = mask
        batch["labels"] = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
        return batch
    labels = input_ids.masked_fill(mask == 0, IGNORE)
    for row, it in enumerate(items):  # instruction data: only the store's targets are labels
        target = it.get("loss_mask")
        if target is not None:
            keep = torch.from_numpy(np.asarray(target, dtype=bool))
            labels[row, : len(keep)].masked_fill_(~keep, IGNORE)
    if not isolate_docs:
        batch["attention_mask"] = mask
        batch["labels"] = labels
        return batch
    positions = torch.zeros((n, width), dtype=torch.long)
    for row, idx in enumerate(indices):
        length = len(items[row]["input_ids"])
        starts = [int(s) for s in store.doc_starts(int(idx)) if 0 < s < length]
        bounds = [0, *starts, length] + ([width] if length < width else [])
        for a, b in itertools.pairwise(bounds):
            positions[row, a:b] = torch.arange(b - a)
        labels[row, starts] = IGNORE  # a new document is not predicted from the previous one
    batch["position_ids"] = positions
    batch["labels"] = labels
    return batch


def supervised_count(batch: dict[str, torch.Tensor], task: str, normalization: str) -> int:
    """How many terms this micro-batch adds to the window's normalizer N.

    causal-lm / tokens: label positions that survive the shift (not IGNORE);
    sequences (and classification): the number of sequences.
    """
    if task == "sequence-classification":
        return int(batch["input_ids"].shape[0])
    targets = batch["labels"][:, 1:] != IGNORE
    if normalization == "sequences":
        return int(targets.any(dim=1).sum())  # a sequence with no target adds nothing
    return int(targets.sum())
