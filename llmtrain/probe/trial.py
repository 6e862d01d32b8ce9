"""One probe trial: train the LIVE model at micro-batch m and measure the peak
(docs/architecture.md, "Probing").

A trial at m is `TRIAL_STEPS` real optimizer steps at the worst-case shape — every sequence
`seq_len` tokens long, random token ids, random class labels — taken by the engine's own step
functions (`forward_backward`, `optimizer_step`), so precision (autocast, GradScaler for
fp16), gradient checkpointing, the (chunked) loss, clipping and optimizer are exactly `fit`'s,
and the lazily created Adam state counts. The last step's window holds two micro-batches of m
when training will accumulate (k > 1): its second forward then runs with the window's
gradients already held, next to the weights and the optimizer state — the steady-state peak of
training, which a one-micro-batch window would miss by the size of the gradients.

Nothing is copied: the trial trains the model itself, with the real optimizer when there is one
(`TrialSetup.optimizer`) or else one built by the run's own factory on the live parameters and
dropped after the trial (in `fit` the probe runs before the run's optimizer exists). Copying
would hold the weights twice — with a frozen PEFT base, most of the memory. What the steps
change is put back by `LiveState`: a snapshot of the weights, buffers, gradients and optimizer
state taken before the first trial, outside any measurement, and restored after the last one —
to host memory on CUDA (it is not device memory), to a temporary safetensors file on CPU (where
host memory is the very thing measured; the file's pages are not this process's resident
memory). Every RNG is saved before a trial and restored after it, and the trial never touches
the data pipeline (its tokens come from a private generator), so the weights, optimizer state,
RNG states and data position are bit-identical afterwards.

Pass rule (the one definition every probe number uses):
    peak(m)  = measured peak of the trial (memory.py): the whole process on CPU, the caching
               allocator's reserved memory on CUDA — the live weights, gradients, optimizer
               state and activations, each held once, exactly as training holds them
    budget   = (1 − margin) × capacity
    trial ok ⇔ no out-of-memory error and peak(m) ≤ budget.
A trial whose memory in use passes the budget is stopped at the next module call or gradient
accumulation (`budget_guard`): it would fail the rule anyway, and stopping it keeps a failing
trial from costing more than the budget.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmtrain import layout
from llmtrain.data.batching import collate, supervised_count
from llmtrain.engine.checkpoint import rng_state, set_rng_state
from llmtrain.engine.distributed import DistInfo
from llmtrain.engine.model import param_specs
from llmtrain.engine.parallel import unwrap
from llmtrain.engine.placement import place
from llmtrain.engine.step import (
    StepSpec,
    Window,
    drop_failed_backward,
    forward_backward,
    optimizer_step,
)
from llmtrain.probe.memory import MemoryBackend, OverBudget, fmt_bytes, is_oom
from llmtrain.probe.result import Trial
from llmtrain.util.atomic import ensure_space, temp_sibling

TRIAL_STEPS = 2  # step 1 creates the optimizer state, step 2 runs with it in place
# Classification needs a head size to build the model; when neither the config nor the data is
# at hand the probe uses 2 — the head is num_labels × hidden, negligible next to activations.
PROBE_NUM_LABELS = 2
# A small initial fp16 loss scale: an overflow-skipped step would skip creating the Adam state.
TRIAL_INIT_SCALE = 2.0**8
PLAIN_STEP = StepSpec("causal-lm", "tokens", "fp32", grad_clip=1.0)  # TrialSetup's default


@dataclass
class TrialSetup:
    """Everything a trial needs, as plain objects: the search does not know about Config."""

    model: torch.nn.Module
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    seq_len: int
    device: torch.device
    # how each step trains: `StepSpec.from_config` for a run (probe/plan.py), so a trial
    # trains exactly as `fit` (precision, loss, clipping, document isolation)
    spec: StepSpec = PLAIN_STEP
    optimizer: torch.optim.Optimizer | None = None  # the real one, if it exists already
    rank: int = 0
    steps: int = TRIAL_STEPS
    seed: int = 0
    # micro-batches in the last step's window: 2 when training accumulates (k > 1), 1 when the
    # micro-batch is the whole window (the probe sets it per m; see train_steps)
    micro_batches: int = 2
    scratch_dir: str | None = None  # CPU snapshot file's directory; None: the system temp dir


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


class LiveState:
    """What trials may change — parameters, buffers, gradients, the real optimizer's state and
    the train/eval mode — saved once and put back bit for bit (module docstring).

    Invariant: between `__init__` and `restore`, the saved copy lives outside the memory the
    probe measures (host RAM on CUDA, a file on CPU), so the trials' peaks do not include it.
    """

    def __init__(self, setup: TrialSetup):
        self.model = unwrap(setup.model)
        self.optimizer = setup.optimizer
        self.training = self.model.training
        self.on_cpu = setup.device.type == "cpu"
        self.params = dict(self.model.named_parameters())
        self.buffers = dict(self.model.named_buffers())
        self.opt_keys: list[tuple[torch.Tensor, list[str]]] = []
        self.opt_plain: dict[tuple[int, str], Any] = {}
        self.opt_devices: dict[tuple[int, str], torch.device] = {}
        self.alias: dict[str, str] = {}  # a tensor sharing storage with one saved earlier
        tensors = self._collect()
        self.path: Path | None = None
        self.host: dict[str, torch.Tensor] = {}
        if self.on_cpu:
            self.path = self._write(tensors, Path(setup.scratch_dir or tempfile.gettempdir()))
        else:
            self.host = {k: t.detach().to("cpu", copy=True) for k, t in tensors.items()}

    def _collect(self) -> dict[str, torch.Tensor]:
        """Every tensor to save, by a key that `restore` maps back; shared storage once."""
        out: dict[str, torch.Tensor] = {}
        seen: dict[tuple[int, torch.Size], str] = {}

        def add(key: str, t: torch.Tensor) -> None:
            if t.device.type == "meta":
                return
            first = seen.get((t.data_ptr(), t.shape)) if t.numel() else None
            if first is not None:  # safetensors refuses shared storage: save it once
                self.alias[key] = first
                return
            seen[(t.data_ptr(), t.shape)] = key
            out[key] = t.detach().contiguous()

        for name, p in self.params.items():
            add(f"param.{name}", p)
            if p.grad is not None:
                add(f"grad.{name}", p.grad)
        for name, b in self.buffers.items():
            add(f"buffer.{name}", b)
        for i, (p, st) in enumerate(self.optimizer.state.items() if self.optimizer else ()):
            self.opt_keys.append((p, list(st)))
            for k, v in st.items():
                if torch.is_tensor(v):
                    add(f"opt.{i}.{k}", v)
                    self.opt_devices[(i, k)] = v.device
                else:
                    self.opt_plain[(i, k)] = v
        return out

    @staticmethod
    def _write(tensors: dict[str, torch.Tensor], directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = temp_sibling(
            directory / layout.PROBE_SNAPSHOT_FILE
        )  # swept by remove_stale_temps on a crash
        ensure_space(directory, sum(map(_tensor_bytes, tensors.values())), "the probe snapshot")
        save_file(tensors, str(path))  # written from the tensors' memory, no copy
        return path

    @contextmanager
    def _saved(self) -> Iterator[Callable[[str], torch.Tensor | None]]:
        """A reader of the saved tensors, one at a time (CPU: from the file)."""
        if self.path is None:
            yield lambda key: self.host.get(self.alias.get(key, key))
            return
        with safe_open(str(self.path), framework="pt") as f:
            names = set(f.keys())

            def read(key: str) -> torch.Tensor | None:
                key = self.alias.get(key, key)
                return f.get_tensor(key) if key in names else None

            yield read

    @torch.no_grad()
    def restore(self) -> None:
        """Everything exactly as at `__init__`."""
        with self._saved() as saved:
            for name, p in self.params.items():
                value = saved(f"param.{name}")
                if value is not None:
                    p.copy_(value)
                grad = saved(f"grad.{name}")
                p.grad = grad.to(p.device) if grad is not None else None
            for name, b in self.buffers.items():
                value = saved(f"buffer.{name}")
                if value is not None:
                    b.copy_(value)
            if self.optimizer is not None:
                self._restore_optimizer(saved)
        self.model.train(self.training)

    def _restore_optimizer(self, saved: Callable[[str], torch.Tensor | None]) -> None:
        state = self.optimizer.state
        before = {id(p) for p, _ in self.opt_keys}
        for p in [p for p in state if id(p) not in before]:
            del state[p]  # created lazily by a trial
        for i, (p, keys) in enumerate(self.opt_keys):
            entry = state[p]
            for k in [k for k in entry if k not in keys]:
                del entry[k]
            for k in keys:
                value = saved(f"opt.{i}.{k}")
                if value is None:
                    entry[k] = self.opt_plain[(i, k)]
                elif torch.is_tensor(entry.get(k)) and entry[k].shape == value.shape:
                    entry[k].copy_(value)
                else:
                    entry[k] = value.to(self.opt_devices[(i, k)])

    def close(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None
        self.host = {}


@contextmanager
def live_state(setup: TrialSetup) -> Iterator[LiveState]:
    """Snapshot before, restore after (also after an error), and remove the snapshot. The model
    first moves to the trial device, where training will put it anyway."""
    unwrap(setup.model).to(setup.device)
    state = LiveState(setup)
    try:
        yield state
    finally:
        try:
            state.restore()
        finally:
            state.close()


def static_bytes(model: torch.nn.Module, optimizer_name: str, momentum: float = 0.0) -> int:
    """Analytic weights + grads + optimizer state of one process (engine/placement.py at world
    1), each tensor at its real element size: frozen bf16 or quantized (packed uint8, with its
    block scales) weights count what they hold, gradients exist for trainable parameters only,
    and the optimizer's state is `engine.optim.state_bytes` (8-bit moments ≈ 1 byte each)."""
    return place(param_specs(model), 1, "ddp", optimizer_name, momentum).ranks[0].total


# ------------------------------------------------------------------------------ a trial
@dataclass
class WorstCaseRows:
    """A SequenceSource of rows exactly seq_len long, each two documents (a start half-way),
    so that `collate` makes a trial's batch as it makes training's: with documents isolated,
    position ids that restart and no attention mask (transformers then builds the per-document
    mask training pays for); otherwise the plain mask."""

    ids: torch.Tensor  # [m, seq_len]
    labels: torch.Tensor | None  # [m] class ids (classification)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = None if self.labels is None else int(self.labels[i])
        return {"input_ids": self.ids[i].numpy(), "doc_id": i, "label": label}

    def doc_starts(self, i: int) -> np.ndarray:
        return np.array([0, self.ids.shape[1] // 2], dtype=np.int64)


def worst_case_batch(setup: TrialSetup, m: int, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """m sequences of exactly seq_len random tokens: the longest micro-batch training can see,
    collated as training collates (`collate`, with the run's document isolation). Drawn from
    a private generator, so the global RNG streams are not consumed."""
    gen = torch.Generator().manual_seed(setup.seed)
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.randint(0, vocab, (m, setup.seq_len), generator=gen)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad is not None and 0 <= pad < vocab and vocab > 1:
        ids[ids == pad] = (pad + 1) % vocab  # classification heads look for the last non-pad
    labels = None
    if setup.spec.task == "sequence-classification":
        num_labels = int(getattr(model.config, "num_labels", PROBE_NUM_LABELS))
        labels = torch.randint(0, num_labels, (m,), generator=gen)
    spec = setup.spec
    batch = collate(
        WorstCaseRows(ids, labels),
        np.arange(m),
        pad_id=-1,  # no row is padded: every one is seq_len long
        task=spec.task,
        isolate_docs=spec.isolate_docs,
    )
    return {k: v.to(setup.device) for k, v in batch.items()}


def train_steps(
    setup: TrialSetup,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
) -> list[float]:
    """`setup.steps` optimizer steps taken by the engine's step functions; seconds per step.
    The first steps' windows hold one micro-batch (step 1 creates the optimizer state); the
    last one holds `setup.micro_batches`, so that with accumulation its second forward runs
    while the window's gradients are already held — training's steady-state peak. `model` is
    unwrapped: a trial runs locally even under torchrun. The forward goes through the fault
    hook, so LLMTRAIN_FAULT_OOM_MICRO (aimed at `setup.rank`) fails trials too."""
    spec = setup.spec
    m = int(batch["input_ids"].shape[0])
    n = float(supervised_count(batch, spec.task, spec.normalization))

    def window(k: int) -> Window:
        return Window([batch] * k, n * k, sequences=m * k, tokens=m * k * setup.seq_len)

    # world size 1: no collective and no ×world scaling; the rank only aims the fault hook
    local = DistInfo(rank=setup.rank)
    scaler = torch.amp.GradScaler(
        setup.device.type, init_scale=TRIAL_INIT_SCALE, enabled=spec.precision == "fp16"
    )
    times = []
    for i in range(setup.steps):
        win = window(setup.micro_batches if i == setup.steps - 1 else 1)
        t0 = time.perf_counter()
        forward_backward(model, optimizer, scaler, win, spec, device=setup.device, dist=local)
        optimizer_step(model, optimizer, scaler, spec)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        times.append(time.perf_counter() - t0)
    return times


@contextmanager
def budget_guard(
    model: torch.nn.Module, current: Callable[[], int] | None, budget: int
) -> Iterator[None]:
    """Stop the trial (OverBudget) at the first module call or gradient accumulation after the
    memory in use (`current()`) passes `budget`. A failing trial then costs the budget plus
    what one module allocates, not its whole peak: a run with `micro_batch: auto` needs at
    most that much more than one with the answer set by hand (the search also skips a trial
    the measured peaks put clearly over: search.clearly_over), and a failing trial cannot push
    the process past a hard limit (a container's) that the budget sits under. The pass rule is
    unchanged: memory over the budget at any moment means a peak over it."""
    if current is None:
        yield
        return

    def check(*_: Any) -> None:
        now = current()
        if now > budget:
            raise OverBudget(f"{fmt_bytes(now)} in use passed the budget; trial stopped")

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(check)]
    handles += [
        p.register_post_accumulate_grad_hook(check) for p in model.parameters() if p.requires_grad
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def live_trial(
    setup: TrialSetup, m: int, current: Callable[[], int] | None = None, budget: int = 0
) -> list[float]:
    """Train the live model at micro-batch m (the real optimizer, or a fresh one from the run's
    factory), stopped when `current()` passes `budget` (`budget_guard`); every RNG is as it
    was when this returns or raises. Weights and optimizer state are changed: the caller's
    `LiveState` puts them back."""
    model = unwrap(setup.model)
    with preserved_rng():
        model.train()
        optimizer = setup.optimizer or setup.make_optimizer(model)
        batch = worst_case_batch(setup, m, model)
        try:
            with budget_guard(model, current, budget):
                return train_steps(setup, model, optimizer, batch)
        finally:
            optimizer.zero_grad(set_to_none=True)
            del optimizer, batch


def run_trial(
    setup: TrialSetup, backend: MemoryBackend, m: int, budget: int, live: LiveState | None = None
) -> Trial:
    """One measured trial. OOM (real or simulated) is a failed trial; any other error
    propagates unchanged. `live`: the probe's snapshot (restored after its last trial); without
    one this trial takes and restores its own."""
    if live is None:
        with live_state(setup) as own:
            return run_trial(setup, backend, m, budget, own)
    t0 = time.perf_counter()
    error = None
    try:
        current = getattr(backend, "current", None)  # a backend that cannot tell: no guard
        times, measured = backend.measure(lambda: live_trial(setup, m, current, budget))
    except Exception as e:  # OOM has several types (is_oom decides); any other is re-raised
        if not is_oom(e):
            raise
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    if error is not None:
        # Released only here, outside the except block: until it ends, the exception's
        # traceback keeps the trial's frames — optimizer state, activations — alive. A trial
        # stopped in its backward also leaves its graph in autograd's engine until the next
        # backward: without the drop, training after the probe ran beside it (1.45x the peak
        # of the same run set by hand; docs/benchmarks.md).
        drop_failed_backward(setup.device)
        backend.release(collect=True)
        return Trial(m, False, backend.last_peak, time.perf_counter() - t0, None, error)
    seconds = time.perf_counter() - t0
    backend.release()
    peak = measured.peak_bytes
    ok = peak <= budget
    tokens = setup.micro_batches * m * setup.seq_len  # of the last step
    tps = tokens / times[-1] if times and times[-1] > 0 else None
    error = None if ok else f"peak {fmt_bytes(peak)} > budget {fmt_bytes(budget)}"
    return Trial(m, ok, peak, seconds, tps, error, measured.alloc_retries)
