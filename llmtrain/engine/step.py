"""One optimizer step, in two parts that both `fit` and the probe's trials call:

1. `forward_backward`: every micro-batch of a window backpropagates
   sum(per-token losses) / N × world into zeroed gradients, where N is the supervised count of
   the WHOLE window on all ranks, known before any backward (DDP and FSDP average gradients over
   ranks, so × world makes the result the global sum / N). Gradients are synchronised only on
   the last micro-batch (`no_sync_context`).
   AdaLoRA's orthogonal regularizer w·R(A, B) joins the last micro-batch's loss, so it enters
   once per window.
2. `optimizer_step`: unscale, clip the true global gradient, step, and report whether the fp16
   loss scaler skipped the update.

A micro-batch's loss is `engine.loss.model_loss`: for causal LM with `loss_chunk` set, the output
projection and cross-entropy run chunk by chunk inside the model's forward, so the whole
[batch, seq, vocab] logits never exist (docs/architecture.md, "Memory").

`make_window` prepares part 1's input: this rank's contiguous share of the window's sequences,
collated into micro-batches of at most `micro`, with N counted over all ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from llmtrain.config import Config
from llmtrain.data.batching import (
    SequenceSource,
    collate,
    micro_steps,
    rank_share,
    split_micro,
    supervised_count,
)
from llmtrain.engine.adalora import orth_regularizer
from llmtrain.engine.distributed import DistInfo, all_reduce_sum
from llmtrain.engine.faults import oom_fault_point
from llmtrain.engine.loss import model_loss
from llmtrain.engine.parallel import clip_grad_norm, no_sync_context, reduces_in_backward


@dataclass(frozen=True)
class StepSpec:
    """How every step of a run trains: fixed for the run, shared by `fit` and the probe."""

    task: str  # causal-lm | sequence-classification
    normalization: str  # tokens | sequences: what N counts
    precision: str  # fp32 | bf16 | fp16 | fp64
    grad_clip: float | None  # max global gradient norm; None = no clipping
    isolate_docs: bool = False  # pack mode with attention kept inside documents
    loss_chunk: int | None = None  # causal LM: tokens per chunk of the loss; None = full logits
    activation_offload: bool = False  # saved activations in host memory (`offload_context`)
    orth_reg_weight: float = 0.0  # AdaLoRA: w of w·R(A, B), added once per window

    @classmethod
    def from_config(
        cls, cfg: Config, loss_chunk: int | None = None, device: torch.device | None = None
    ) -> StepSpec:
        """The one mapping from a Config to its step, for `fit`, its eval, the probe's trials
        and the commands that score a run. `loss_chunk`: `train.loss_chunk` as resolved for
        the model (`engine.loss.resolve_loss_chunk`); `device`: where it trains (activation
        offload applies on CUDA only)."""
        return cls(
            task=cfg.model.task,
            normalization=cfg.train.loss_normalization,
            precision=cfg.train.precision,
            grad_clip=cfg.optim.grad_clip,
            isolate_docs=cfg.data.is_isolated,
            loss_chunk=loss_chunk,
            activation_offload=offloads(cfg, device),
            orth_reg_weight=orth_reg_weight(cfg),
        )


def offloads(cfg: Config, device: torch.device | None) -> bool:
    """Whether `model.activation_offload` takes effect: set, and training on CUDA (on a CPU the
    activations already live in host memory)."""
    return cfg.model.activation_offload and device is not None and device.type == "cuda"


def orth_reg_weight(cfg: Config) -> float:
    """AdaLoRA's w (0 for every other method: no regularizer)."""
    p = cfg.model.peft
    return p.orth_reg_weight if p is not None and p.method == "adalora" else 0.0


@dataclass
class Window:
    """One optimizer step's data on this rank, already collated into micro-batches."""

    batches: list[dict[str, torch.Tensor]]
    n_total: float  # supervised count of the whole window, all ranks
    sequences: int  # whole window
    tokens: int  # non-pad tokens of the whole window
    padding: int = 0  # the last `padding` batches are zero-weight stand-ins (see micro_steps)


def make_window(
    store: SequenceSource,
    indices: np.ndarray,
    spec: StepSpec,
    *,
    micro: int,
    pad_id: int,
    dist: DistInfo,
    device: torch.device,
    n_total: float | None = None,
) -> Window:
    """Collate this rank's share of `indices` and count N over all ranks (one all-reduce;
    none when `n_total` is already known — re-cutting after an OOM on this rank alone, while
    the other ranks wait in the gradient all-reduce)."""

    def batch_of(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return collate(store, idx, pad_id=pad_id, task=spec.task, isolate_docs=spec.isolate_docs)

    share = rank_share(indices, dist.rank, dist.world_size)
    batches = [batch_of(idx) for idx in split_micro(share, micro)]
    if n_total is None:
        n_local = sum(supervised_count(b, spec.task, spec.normalization) for b in batches)
        n = torch.tensor(float(n_local), dtype=torch.float64, device=device)
        n_total = float(all_reduce_sum(n).item())
    tokens = int(np.asarray(store.lengths)[indices].sum())
    # Every rank runs the same number of micro-batches (the busiest rank's); the others
    # repeat the window's first sequence with weight zero, joining the collectives only.
    padding = max(0, micro_steps(len(indices), micro, dist.world_size) - len(batches))
    if padding:
        batches += [batch_of(indices[:1])] * padding
    return Window(batches, n_total, len(indices), tokens, padding)


def offload_context(spec: StepSpec, device: torch.device) -> contextlib.AbstractContextManager:
    """Around a training forward with `spec.activation_offload`: every tensor autograd saves
    for backward is copied to host memory (pinned on CUDA, so the copies are asynchronous) and
    copied back when backward needs it. Under non-reentrant gradient checkpointing the saved
    tensors are each layer's inputs (the checkpoint saves them through the same hooks), so
    device memory holds one layer's recomputed activations at a time. Same values either way:
    a copy, not a cast."""
    if not spec.activation_offload:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


class OOMInGradientSync(torch.OutOfMemoryError):
    """An out-of-memory error inside the backward in which DDP all-reduces the gradients (the
    window's last micro-batch). Unlike one anywhere else it cannot be retried at a smaller
    micro-batch: the other ranks wait inside that all-reduce for buckets this rank never sent,
    and this rank's reducer is left mid-iteration, so a retry deadlocks (measured: both ranks
    hung until killed) or trips DDP's "finished reduction" check."""


def forward_backward(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    win: Window,
    spec: StepSpec,
    *,
    device: torch.device,
    dist: DistInfo,
) -> torch.Tensor:
    """Forward/backward every micro-batch of the window into zeroed grads; returns the
    window's summed loss (this rank, float64, detached). Raises torch.OutOfMemoryError (also
    the simulated one of LLMTRAIN_FAULT_OOM_MICRO) with the gradients in an undefined state;
    `OOMInGradientSync` when it struck inside DDP's gradient all-reduce."""
    optimizer.zero_grad(set_to_none=True)
    scale = dist.world_size / max(win.n_total, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    real = len(win.batches) - win.padding
    for i, batch in enumerate(win.batches):
        weight = scale if i < real else 0.0  # a stand-in joins the collectives, adds nothing
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = inputs.pop("labels")
        last = i == len(win.batches) - 1
        fault = oom_fault_point(model, int(batch["input_ids"].shape[0]), dist.rank)
        with fault, no_sync_context(model, last=last):
            with offload_context(spec, device):
                summed = model_loss(
                    model,
                    inputs,
                    labels,
                    task=spec.task,
                    normalization=spec.normalization,
                    precision=spec.precision,
                    device=device,
                    loss_chunk=spec.loss_chunk,
                )
            del inputs, labels  # the graph holds what backward needs, nothing else does
            objective = summed * weight
            if spec.orth_reg_weight and last:
                objective = objective + window_regularizer(model, spec.orth_reg_weight)
            try:
                scaler.scale(objective).backward()
            except torch.OutOfMemoryError as e:
                if not reduces_in_backward(model, last):
                    raise
                raise OOMInGradientSync(str(e)) from e
        if i < real:
            loss_sum += summed.detach().double()
        del summed
    return loss_sum


def drop_failed_backward(device: torch.device) -> None:
    """After a backward that raised (an out-of-memory error, the probe's budget guard): free
    what torch's autograd engine still holds of it. The failed graph — its saved activations,
    most of the memory the step had — stays alive until the next backward runs on the thread
    that ran it (seen on torch 2.13: tests/test_oom_recovery.py, and the probe's stopped trials
    in docs/benchmarks.md); `gc.collect` and `empty_cache` cannot reach it. One backward of a
    scalar leaf is that next backward, now, before the caller retries or measures."""
    with torch.enable_grad():
        for dev in {torch.device("cpu"), device}:
            torch.autograd.backward(torch.zeros((), device=dev, requires_grad=True))


def window_regularizer(model: torch.nn.Module, weight: float) -> torch.Tensor:
    """w·R(A, B) of AdaLoRA, once per window (on its last micro-batch, inside the gradient
    sync): the window's objective is then sum(token losses) / N + w·R, as one big batch's.
    Every rank adds it and DDP averages the ranks' gradients, so it counts once there too."""
    return weight * orth_regularizer(model)


@dataclass(frozen=True)
class StepOutcome:
    """What `optimizer_step` did: `stepped` is False when the fp16 scaler found an overflow
    and skipped the update (the caller retries the same window at the lower scale)."""

    stepped: bool
    grad_norm: float


def optimizer_step(
    raw_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    spec: StepSpec,
    after_update: Callable[[], None] | None = None,
) -> StepOutcome:
    """Unscale, clip the global gradient norm (over FSDP shards too), step, update the scaler,
    and zero the gradients. `after_update` runs when the update was applied, between the step
    and zero_grad (the window's complete gradients still there): AdaLoRA's rank allocator."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(raw_model, spec.grad_clip)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    stepped = scale_before is None or scaler.get_scale() >= scale_before
    if stepped and after_update is not None:
        after_update()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(stepped, grad_norm)
