"""One probe trial: train at micro-batch m on shadow copies and measure the peak
(docs/architecture.md, "Probing").

A trial at m is `TRIAL_STEPS` real optimizer steps at the worst-case shape — every sequence
`seq_len` tokens long, random token ids, random class labels — taken by the engine's own step
functions (`forward_backward`, `optimizer_step`), so precision (autocast, GradScaler for
fp16), gradient checkpointing, loss, clipping and optimizer are exactly `fit`'s, and the lazily
created Adam state and the second step's gradients-plus-state peak both count. It runs on
shadow copies: a deepcopy of the model and a fresh optimizer from the same factory holding a
copy of the real optimizer's state. Every RNG is saved before and restored after, and the
trial never touches the data pipeline (its tokens come from a private generator), so the real
weights, optimizer state, RNG states and data position are bit-identical afterwards.

Pass rule (the one definition every probe number uses):
    peak(m)  = measured peak of the trial (memory.py) − bytes the shadow copy duplicates
               (the real weights, grads and optimizer state, which real training holds once)
    budget   = (1 − margin) × capacity
    trial ok ⇔ no out-of-memory error and peak(m) ≤ budget.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from llmtrain.data.batching import supervised_count
from llmtrain.engine.checkpoint import rng_state, set_rng_state
from llmtrain.engine.distributed import DistInfo
from llmtrain.engine.parallel import unwrap
from llmtrain.engine.step import StepSpec, Window, forward_backward, optimizer_step
from llmtrain.probe.memory import MemoryBackend, fmt_bytes, is_oom
from llmtrain.probe.result import Trial

TRIAL_STEPS = 2  # step 1 creates the optimizer state, step 2 runs with it in place
# Classification needs a head size to build the model; when neither the config nor the data is
# at hand the probe uses 2 — the head is num_labels × hidden, negligible next to activations.
PROBE_NUM_LABELS = 2
# A small initial fp16 loss scale: an overflow-skipped step would skip creating the Adam state.
TRIAL_INIT_SCALE = 2.0**8


@dataclass
class TrialSetup:
    """Everything a trial needs, as plain objects: the search does not know about Config."""

    model: torch.nn.Module
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    seq_len: int
    device: torch.device
    task: str = "causal-lm"
    precision: str = "fp32"
    loss_normalization: str = "tokens"
    grad_clip: float | None = 1.0  # None: no clipping
    optimizer: torch.optim.Optimizer | None = None  # the real one, if it exists already
    rank: int = 0
    steps: int = TRIAL_STEPS
    seed: int = 0

    def step_spec(self) -> StepSpec:
        return StepSpec(
            task=self.task,
            normalization=self.loss_normalization,
            precision=self.precision,
            grad_clip=self.grad_clip,
        )


# ------------------------------------------------------------------------- RNG and state
@contextmanager
def preserved_rng() -> Iterator[None]:
    """Dropout and friends inside a trial draw random numbers; nobody outside may notice."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _optimizer_state_tensors(optimizer: torch.optim.Optimizer | None) -> Iterator[torch.Tensor]:
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                yield v


def duplicate_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes a shadow trial holds twice: the real weights, grads and optimizer state stay
    resident while their copies train, but real training holds them once — so this is
    subtracted from the measured peak. Exact sizes of existing tensors, not an estimate."""
    seen: set[int] = set()
    total = 0
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += list(_optimizer_state_tensors(optimizer))
    for t in tensors:
        key = t.data_ptr()
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        total += _tensor_bytes(t)
    return total


def static_bytes(model: torch.nn.Module, optimizer_name: str, momentum: float = 0.0) -> int:
    """Analytic weights + grads + optimizer state: parameters × bytes per parameter."""
    per_param_state = {"adamw": 2, "adam": 2, "sgd": 1 if momentum > 0 else 0}.get(
        optimizer_name, 2
    )
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        n = _tensor_bytes(p)
        total += n * (
            1 + (1 if p.requires_grad else 0) + (per_param_state if p.requires_grad else 0)
        )
    return total


# ------------------------------------------------------------------------------ a trial
def worst_case_batch(setup: TrialSetup, m: int, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """m sequences of exactly seq_len random tokens: the longest micro-batch training can see,
    with labels as `collate` makes them. Drawn from a private generator, so the global RNG
    streams are not consumed."""
    gen = torch.Generator().manual_seed(setup.seed)
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.randint(0, vocab, (m, setup.seq_len), generator=gen)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad is not None and 0 <= pad < vocab and vocab > 1:
        ids[ids == pad] = (pad + 1) % vocab  # classification heads look for the last non-pad
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if setup.task == "sequence-classification":
        num_labels = int(getattr(model.config, "num_labels", PROBE_NUM_LABELS))
        batch["labels"] = torch.randint(0, num_labels, (m,), generator=gen)
    else:
        batch["labels"] = ids.clone()  # no padding, so nothing is IGNORE
    return {k: v.to(setup.device) for k, v in batch.items()}


def train_steps(
    setup: TrialSetup,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
) -> list[float]:
    """`setup.steps` optimizer steps on a one-micro-batch window, taken by the engine's step
    functions; seconds per step. `model` is unwrapped: a trial runs locally even under
    torchrun. The forward goes through the fault hook, so LLMTRAIN_FAULT_OOM_MICRO (aimed at
    `setup.rank`) fails trials too."""
    spec = setup.step_spec()
    m = int(batch["input_ids"].shape[0])
    n = supervised_count(batch, spec.task, spec.normalization)
    win = Window(batches=[batch], n_total=float(n), sequences=m, tokens=m * setup.seq_len)
    # world size 1: no collective and no ×world scaling; the rank only aims the fault hook
    local = DistInfo(rank=setup.rank)
    scaler = torch.amp.GradScaler(
        setup.device.type, init_scale=TRIAL_INIT_SCALE, enabled=spec.precision == "fp16"
    )
    times = []
    for _ in range(setup.steps):
        t0 = time.perf_counter()
        forward_backward(model, optimizer, scaler, win, spec, device=setup.device, dist=local)
        optimizer_step(model, optimizer, scaler, spec)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        times.append(time.perf_counter() - t0)
    return times


def shadow_trial(setup: TrialSetup, m: int) -> list[float]:
    """Train copies of the model and optimizer at micro-batch m; the originals and every RNG
    are as they were when this returns or raises."""
    real = unwrap(setup.model)
    with preserved_rng():
        shadow = copy.deepcopy(real)
        for p in shadow.parameters():
            p.grad = None
        shadow.train()
        optimizer = setup.make_optimizer(shadow)
        if setup.optimizer is not None and setup.optimizer.state:
            # deepcopy: load_state_dict keeps tensors that already match, so without it the
            # shadow's in-place Adam updates would write into the real optimizer's state
            optimizer.load_state_dict(copy.deepcopy(setup.optimizer.state_dict()))
        batch = worst_case_batch(setup, m, shadow)
        try:
            return train_steps(setup, shadow, optimizer, batch)
        finally:
            del shadow, optimizer, batch


def run_trial(setup: TrialSetup, backend: MemoryBackend, m: int, budget: int) -> Trial:
    """One measured trial. OOM (real or simulated) is a failed trial; any other error
    propagates unchanged."""
    dup = duplicate_bytes(unwrap(setup.model), setup.optimizer)
    t0 = time.perf_counter()
    error = None
    try:
        times, measured = backend.measure(lambda: shadow_trial(setup, m))
    except Exception as e:
        if not is_oom(e):
            raise
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    if error is not None:
        # Released only here, outside the except block: until it ends, the exception's
        # traceback keeps the trial's frames — shadow model, activations — alive.
        backend.release(collect=True)
        peak = backend.last_peak
        peak = max(0, peak - dup) if peak else None
        return Trial(m, False, peak, time.perf_counter() - t0, None, error)
    seconds = time.perf_counter() - t0
    backend.release()
    peak = max(0, measured.peak_bytes - dup)
    ok = peak <= budget
    tps = m * setup.seq_len / times[-1] if times and times[-1] > 0 else None
    error = None if ok else f"peak {fmt_bytes(peak)} > budget {fmt_bytes(budget)}"
    return Trial(m, ok, peak, seconds, tps, error, measured.alloc_retries)
