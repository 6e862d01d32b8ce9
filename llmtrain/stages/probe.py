"""The probe stage: measure the largest micro-batch that trains on this device (DESIGN §8).

A *trial* at micro-batch m is `TRIAL_STEPS` real optimizer steps at the worst-case shape —
every sequence `seq_len` tokens long, random token ids, random class labels — with the run's
precision (autocast, GradScaler for fp16), gradient checkpointing, loss and optimizer, so the
lazily created Adam state and the second step's gradients-plus-state peak both count. It runs
on shadow copies: a deepcopy of the model and a fresh optimizer from the same factory holding
a copy of the real optimizer's state. Every RNG is saved before and restored after, and the
probe never touches the data pipeline (its tokens come from a private generator), so the real
weights, optimizer state, RNG states and data position are bit-identical afterwards.

Pass rule (the one definition every number here uses):
    peak(m)  = measured peak of the trial (memory.py) − bytes the shadow copy duplicates
               (the real weights, grads and optimizer state, which real training holds once)
    budget   = (1 − margin) × capacity
    trial ok ⇔ no out-of-memory error and peak(m) ≤ budget.
The true maximum M* is the largest m whose trial is ok (what a brute-force scan finds with the
same measurement). Guarantee, for peaks that grow with m: 0.9·M* ≤ answer ≤ M* — the answer is
always an m whose own trial passed, and the search stops only when the first failing m is
within 1/16 of it. The margin is headroom *on top*: it shrinks the budget, not the search
tolerance.

Search (`search_micro_batch`): m=1 and m=2 are measured; their difference is the activation
memory of one sample, which with the measured intercept predicts the largest m under the
budget (the analytic weights + grads + optimizer-state bytes are computed too, to refuse at
once a model that cannot fit at all). That guess is verified by a trial; from there the search
gallops outwards (steps doubling, from 1/16 of the guess) until it brackets the answer, then
narrows the bracket by interpolating measured peaks, falling back to bisection (geometric while
the bracket spans more than ×2). Capped by `max_micro` and by ceil(global_batch / world). At
most 2·ceil(log2(cap)) + 4 trials; typically 4–6.

Distributed: each rank searches locally (an OOM is caught inside its own trial, so a rank
never leaves the search early), then *every* rank reaches one `all_reduce_min`, so all ranks
agree on the smallest answer and none waits forever on a rank that hit an OOM. The cache
decision is made collectively the same way.

Cache: `<run.output_dir>/probe-cache.json`, one entry per setup key (a hash of the model's HF
config, parameter count, seq_len, precision, gradient checkpointing, optimizer, task, loss
normalization, device name and capacity setting, world size, margin, cap, torch version).
Kept in the run directory because it is visible, deleted with the run, and never shared by
runs that might differ in ways the key does not see. `fit` with `micro_batch: auto` reuses a
matching entry unless `batch.probe.cache` is false; `probe-batch` always measures and then
refreshes the entry, so a following `fit` reuses what was just shown.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import Config, parse_bytes
from llmtrain.errors import LLMTrainError
from llmtrain.train.checkpoint import rng_state, set_rng_state
from llmtrain.train.distributed import DistInfo, all_reduce_min
from llmtrain.train.faults import maybe_fault_oom
from llmtrain.train.loss import summed_loss
from llmtrain.train.memory import (
    MemoryBackend,
    backend_for,
    device_name,
    device_total_bytes,
    fmt_bytes,
    is_oom,
)
from llmtrain.train.precision import autocast_context

TRIAL_STEPS = 2  # step 1 creates the optimizer state, step 2 runs with it in place
SEARCH_TOLERANCE = 1 / 16  # stop when the first failing m is within this fraction of the answer
CACHE_FILE = "probe-cache.json"
CACHE_VERSION = 1
# Classification needs a head size to build the model; when neither the config nor the data is
# at hand the probe uses 2 — the head is num_labels × hidden, negligible next to activations.
PROBE_NUM_LABELS = 2


# ---------------------------------------------------------------------------- results
@dataclass
class Trial:
    """One trial: micro-batch, verdict, measured (adjusted) peak, and how fast it trained."""

    micro_batch: int
    ok: bool
    peak_bytes: int | None
    seconds: float
    tokens_per_s: float | None = None
    error: str | None = None
    alloc_retries: int = 0


@dataclass
class ProbeResult:
    """The probe's answer and the evidence for it (the `probe-batch --json` object)."""

    micro_batch: int
    grad_accum: int
    global_batch: int
    seq_len: int
    device: str
    capacity_bytes: int
    peak_bytes: int | None
    margin: float
    trials: list[Trial]
    cached: bool = False
    budget_bytes: int = 0
    world_size: int = 1
    max_micro: int = 0
    static_bytes: int = 0  # analytic: weights + grads + optimizer state
    activation_bytes_per_sample: int | None = None  # measured: peak(2) − peak(1)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        d = dict(d)
        d["trials"] = [Trial(**t) for t in d.get("trials", [])]
        return cls(**d)


@dataclass
class MicroBatchPlan:
    """What `fit` runs with: micro-batch, accumulation steps, and the probe behind them."""

    micro_batch: int
    grad_accum: int
    probe: ProbeResult | None = None

    def __int__(self) -> int:  # pipeline.resolve_micro takes int(plan)
        return self.micro_batch


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
    grad_clip: float | None = 1.0
    optimizer: torch.optim.Optimizer | None = None  # the real one, if it exists already
    rank: int = 0
    steps: int = TRIAL_STEPS
    seed: int = 0
    # Injectable for tests/benchmarks: runs the training steps on (shadow model, optimizer).
    step_fn: Callable[..., list[float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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
    """m sequences of exactly seq_len random tokens: the longest micro-batch training can see.
    Drawn from a private generator, so the global RNG streams are not consumed."""
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
        batch["labels"] = ids.clone()
    return {k: v.to(setup.device) for k, v in batch.items()}


def train_steps(
    setup: TrialSetup,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
) -> list[float]:
    """`setup.steps` optimizer steps exactly as the training loop takes them; seconds per step.

    The forward goes through the fault hook, so LLMTRAIN_FAULT_OOM_MICRO fails trials too.
    """
    m = int(batch["input_ids"].shape[0])
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    fp16 = setup.precision == "fp16"
    # A small initial scale: an overflow-skipped step would skip creating the Adam state.
    scaler = torch.amp.GradScaler(setup.device.type, init_scale=2.0**8, enabled=fp16)
    n = m if setup.task == "sequence-classification" else m * (setup.seq_len - 1)
    times = []
    for _ in range(setup.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        maybe_fault_oom(m, setup.rank)
        with autocast_context(setup.precision, setup.device):
            logits = model(**inputs).logits
        loss = summed_loss(logits, labels, setup.task, setup.loss_normalization) / n
        del logits
        scaler.scale(loss).backward()
        del loss
        scaler.unscale_(optimizer)
        if setup.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        times.append(time.perf_counter() - t0)
    return times


def shadow_trial(setup: TrialSetup, m: int) -> list[float]:
    """Train copies of the model and optimizer at micro-batch m; the originals and every RNG
    are as they were when this returns or raises."""
    real = getattr(setup.model, "module", setup.model)  # unwrap DDP: trials run locally
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
        step = setup.step_fn or train_steps
        try:
            return step(setup, shadow, optimizer, batch)
        finally:
            del shadow, optimizer, batch


def run_trial(setup: TrialSetup, backend: MemoryBackend, m: int, budget: int) -> Trial:
    """One measured trial. OOM (real or simulated) is a failed trial; any other error
    propagates unchanged."""
    dup = duplicate_bytes(getattr(setup.model, "module", setup.model), setup.optimizer)
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
        peak = getattr(backend, "last_peak", None)
        peak = max(0, peak - dup) if peak else None
        return Trial(m, False, peak, time.perf_counter() - t0, None, error)
    seconds = time.perf_counter() - t0
    backend.release()
    peak = max(0, measured.peak_bytes - dup)
    ok = peak <= budget
    tps = m * setup.seq_len / times[-1] if times and times[-1] > 0 else None
    error = None if ok else f"peak {fmt_bytes(peak)} > budget {fmt_bytes(budget)}"
    return Trial(m, ok, peak, seconds, tps, error, measured.alloc_retries)


# ---------------------------------------------------------------------------- the search
def trial_bound(cap: int) -> int:
    """The most trials a search may run: 2·ceil(log2(cap)) + 4."""
    return 2 * math.ceil(math.log2(max(cap, 2))) + 4


def _fit_line(ok: list[Trial]) -> tuple[float, float] | None:
    """(intercept, slope) of peak against m through the smallest and largest ok trials."""
    pts = sorted((t.micro_batch, t.peak_bytes) for t in ok if t.peak_bytes is not None)
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return None
    (a, pa), (b, pb) = pts[0], pts[-1]
    slope = (pb - pa) / (b - a)
    if slope <= 0:
        return None
    return pa - slope * a, slope


def search_micro_batch(
    trial: Callable[[int], Trial], *, cap: int, budget: int, max_trials: int | None = None
) -> tuple[int, list[Trial]]:
    """The largest m in [1, cap] whose trial passes, within SEARCH_TOLERANCE; 0 if m=1 fails.

    `trial(m)` runs and judges one trial (ok ⇔ no OOM and peak ≤ budget); `budget` is used
    here only to predict where the answer lies from measured peaks.
    """
    max_trials = max_trials or trial_bound(cap)
    trials: list[Trial] = []
    by_m: dict[int, Trial] = {}
    lo, hi = 0, cap + 1  # lo: largest m that passed; hi: smallest m that failed (cap+1: none)

    def run(m: int) -> bool:
        nonlocal lo, hi
        t = trial(m)
        trials.append(t)
        by_m[m] = t
        if t.ok:
            lo = max(lo, m)
        else:
            hi = min(hi, m)
        return t.ok

    def done() -> bool:
        return (
            lo >= cap or hi - lo <= max(1, int(lo * SEARCH_TOLERANCE)) or len(trials) >= max_trials
        )

    def predicted() -> int | None:
        line = _fit_line([t for t in by_m.values() if t.ok])
        if line is None:
            return None
        intercept, slope = line
        return int((budget - intercept) // slope)

    if not run(1) or done():
        return lo, trials
    run(2)
    if done():
        return lo, trials
    # the analytic guess, verified
    guess = predicted() or 2 * lo
    run(min(max(guess, lo + 1), hi - 1))
    step = max(1, math.ceil(lo * SEARCH_TOLERANCE))
    interpolate = True
    while not done():
        if hi > cap:  # nothing failed yet: gallop upwards
            m = min(cap, lo + step)
            step *= 2
            run(m)
        else:  # bracketed: interpolate measured peaks, else bisect
            width = hi - lo
            m = None
            if interpolate:
                p_hi = by_m[hi].peak_bytes if hi in by_m else None
                p_lo = by_m[lo].peak_bytes
                if p_hi is not None and p_lo is not None and p_hi > p_lo:
                    m = lo + int((budget - p_lo) * (hi - lo) // (p_hi - p_lo))
                else:
                    m = predicted()
            if m is not None:  # a prediction outside the bracket still tests its near edge
                m = min(max(m, lo + 1), hi - 1)
            else:
                m = math.isqrt(lo * hi) if hi > 2 * lo else (lo + hi) // 2
                m = min(max(m, lo + 1), hi - 1)
            run(m)
            # interpolation that failed to halve the bracket gives way to bisection once
            interpolate = (hi - lo) <= width // 2 or not interpolate
    return lo, trials


# --------------------------------------------------------------------------- the probe
def probe_micro_batch(
    setup: TrialSetup,
    backend: MemoryBackend,
    *,
    global_batch: int,
    world_size: int = 1,
    margin: float = 0.1,
    max_micro: int = 4096,
    optimizer_name: str = "adamw",
) -> ProbeResult:
    """Measure the largest micro-batch for `setup` on `backend`'s device; all ranks agree."""
    t0 = time.perf_counter()
    cap = max(1, min(max_micro, math.ceil(global_batch / world_size)))
    capacity = backend.capacity()
    budget = int((1 - margin) * capacity)
    static = static_bytes(getattr(setup.model, "module", setup.model), optimizer_name)
    if static > budget:
        # Still join the collective below, so the other ranks are not left waiting.
        micro, trials = 0, []
    else:
        micro, trials = search_micro_batch(
            lambda m: run_trial(setup, backend, m, budget), cap=cap, budget=budget
        )
    agreed = all_reduce_min(torch.tensor([micro], dtype=torch.long, device=setup.device))
    micro = int(agreed.item())
    if micro < 1:
        why = (
            f"the weights, gradients and optimizer state alone need {fmt_bytes(static)}"
            if static > budget
            else "a trial at micro-batch 1 does not fit (on this or another rank)"
        )
        raise LLMTrainError(
            f"batch.micro_batch: auto: {why}, more than the budget {fmt_bytes(budget)} "
            f"({1 - margin:.0%} of {fmt_bytes(capacity)}); shorten data.chunk.seq_len, enable "
            "model.gradient_checkpointing, use a smaller model or raise batch.probe.memory_limit"
        )
    by_m = {t.micro_batch: t for t in trials}
    ok = sorted(
        (t for t in trials if t.ok and t.peak_bytes is not None), key=lambda t: t.micro_batch
    )
    act = None
    if 1 in by_m and 2 in by_m and by_m[1].ok and by_m[2].ok:
        act = (by_m[2].peak_bytes or 0) - (by_m[1].peak_bytes or 0)
    chosen = by_m.get(micro)
    return ProbeResult(
        micro_batch=micro,
        grad_accum=math.ceil(global_batch / (micro * world_size)),
        global_batch=global_batch,
        seq_len=setup.seq_len,
        device=f"{setup.device.type}: {device_name(setup.device)}",
        capacity_bytes=capacity,
        peak_bytes=chosen.peak_bytes if chosen else (ok[-1].peak_bytes if ok else None),
        margin=margin,
        trials=trials,
        budget_bytes=budget,
        world_size=world_size,
        max_micro=max_micro,
        static_bytes=static,
        activation_bytes_per_sample=act,
        seconds=time.perf_counter() - t0,
    )


# ------------------------------------------------------------------ config-level wiring
def _memory_limit(cfg: Config) -> int | None:
    limit = cfg.batch.probe.memory_limit
    if limit is None:
        return None
    try:
        return parse_bytes(limit)
    except ValueError as e:
        raise LLMTrainError(f"batch.probe.memory_limit: {e} (got {limit!r})") from None


def setup_from_config(
    cfg: Config,
    model: torch.nn.Module,
    device: torch.device,
    *,
    rank: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrialSetup:
    """A TrialSetup that trains exactly as `fit` would: the run's optimizer factory, precision,
    loss normalization, clipping and seq_len."""
    from llmtrain.train.optim import build_optimizer

    return TrialSetup(
        model=model,
        make_optimizer=lambda m: build_optimizer(cfg, m),
        seq_len=cfg.data.chunk.seq_len,
        device=device,
        task=cfg.model.task,
        precision=cfg.train.precision,
        loss_normalization=cfg.train.loss_normalization,
        grad_clip=cfg.optim.grad_clip,
        optimizer=optimizer,
        rank=rank,
        seed=cfg.run.seed,
    )


def cache_key(cfg: Config, model: torch.nn.Module, device: torch.device, world_size: int) -> dict:
    """What a probe result depends on. Two setups with equal keys need the same memory."""
    real = getattr(model, "module", model)
    hf = getattr(real, "config", None)
    hf_dict = hf.to_dict() if hf is not None else {}
    for noise in ("_name_or_path", "transformers_version", "id2label", "label2id"):
        hf_dict.pop(noise, None)
    limit = _memory_limit(cfg)
    b = cfg.batch
    return {
        "version": CACHE_VERSION,
        "model_class": type(real).__name__,
        "model_config": hf_dict,
        "parameters": sum(p.numel() for p in real.parameters()),
        "gradient_checkpointing": _checkpointing(real),
        "seq_len": cfg.data.chunk.seq_len,
        "precision": cfg.train.precision,
        "optimizer": cfg.optim.name,
        "task": cfg.model.task,
        "loss_normalization": cfg.train.loss_normalization,
        "device": device_name(device),
        "capacity": limit if limit is not None else f"total:{device_total_bytes(device)}",
        "world_size": world_size,
        "margin": b.probe.margin,
        "cap": min(b.probe.max_micro, math.ceil(b.global_batch / world_size)),
        "torch": torch.__version__,
    }


def _checkpointing(model: torch.nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _key_hash(key: dict) -> str:
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_path(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged cache is only a cache: probe again and rewrite it
    return data.get("entries", {}) if isinstance(data, dict) else {}


def load_cached(cfg: Config, key: dict) -> ProbeResult | None:
    entry = _read_cache(cache_path(cfg)).get(_key_hash(key))
    if not entry:
        return None
    try:
        result = ProbeResult.from_dict(entry["result"])
    except (KeyError, TypeError):
        return None
    result.cached = True
    return result


def store_cached(cfg: Config, key: dict, result: ProbeResult) -> None:
    """Add or replace this setup's entry; written atomically (tmp file + rename)."""
    path = cache_path(cfg)
    entries = _read_cache(path)
    entries[_key_hash(key)] = {"key": key, "result": {**result.to_dict(), "cached": False}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(
        json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, default=str),
        encoding="utf-8",
    )
    os.replace(tmp, path)


def probe_for_config(
    cfg: Config,
    model: torch.nn.Module,
    device: torch.device,
    *,
    dist: DistInfo | None = None,
    use_cache: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
) -> ProbeResult:
    """The probe for a config: a cached result when every rank has one, else a measurement
    (which rank 0 then stores)."""
    dist = dist or DistInfo()
    key = cache_key(cfg, model, device, dist.world_size)
    cached = load_cached(cfg, key) if use_cache else None
    # all ranks must take the same branch, or some would wait in the probe's collective
    hit = all_reduce_min(torch.tensor([int(cached is not None)], device=device))
    if cached is not None and int(hit.item()) == 1:
        return cached
    setup = setup_from_config(cfg, model, device, rank=dist.rank, optimizer=optimizer)
    result = probe_micro_batch(
        setup,
        backend_for(device, _memory_limit(cfg)),
        global_batch=cfg.batch.global_batch,
        world_size=dist.world_size,
        margin=cfg.batch.probe.margin,
        max_micro=cfg.batch.probe.max_micro,
        optimizer_name=cfg.optim.name,
    )
    if dist.is_main:
        store_cached(cfg, key, result)
    return result


def resolve_micro_batch(
    cfg: Config,
    model: torch.nn.Module,
    device: torch.device,
    world_size: int = 1,
    *,
    dist: DistInfo | None = None,
) -> MicroBatchPlan:
    """`fit`'s micro-batch: the configured integer, or (for `auto`) the probed or cached one;
    grad_accum = ceil(global_batch / (micro × world)). Prints the resolved (micro, k, global)
    on rank 0. `dist` (optional) supplies rank and world size under torchrun."""
    dist = dist or DistInfo(world_size=world_size)
    world = dist.world_size
    b = cfg.batch
    if b.micro_batch != "auto":
        micro = int(b.micro_batch)
        return MicroBatchPlan(micro, math.ceil(b.global_batch / (micro * world)), None)
    result = probe_for_config(cfg, model, device, dist=dist, use_cache=b.probe.cache)
    if dist.is_main:
        from llmtrain.console import err_console

        source = "cached probe" if result.cached else f"probed in {result.seconds:.1f}s"
        err_console.print(
            f"micro_batch auto → [bold]{result.micro_batch}[/] ({source}), "
            f"grad_accum {result.grad_accum}, global batch {b.global_batch}"
            + (f" over {world} ranks" if world > 1 else "")
        )
    return MicroBatchPlan(result.micro_batch, result.grad_accum, result)


# ---------------------------------------------------------------------------------- CLI
def render_table(result: ProbeResult) -> Any:
    from rich.table import Table

    table = Table(title=f"probe-batch · {result.device} · seq_len {result.seq_len}")
    for col in ("micro", "result", "peak", "% capacity", "tokens/s", "seconds"):
        table.add_column(col, justify="right")
    for t in result.trials:
        verdict = "[green]ok[/]" if t.ok else "[red]OOM[/]"
        share = f"{100 * t.peak_bytes / result.capacity_bytes:.1f}%" if t.peak_bytes else "-"
        tps = f"{t.tokens_per_s:,.0f}" if t.tokens_per_s else "-"
        table.add_row(
            str(t.micro_batch), verdict, fmt_bytes(t.peak_bytes), share, tps, f"{t.seconds:.2f}"
        )
    return table


def cli_probe(cfg: Config, *, as_json: bool) -> None:
    """`llmtrain probe-batch`: build the run's model, measure, print a table (or one JSON
    object on stdout), and refresh the cache entry `fit` will reuse."""
    from llmtrain.console import human_console
    from llmtrain.stages.tokenize import load_tokenizer
    from llmtrain.train.distributed import barrier, resolve_device, setup, teardown
    from llmtrain.train.model import build_model

    out = human_console(as_json)
    # under torchrun each rank probes its own GPU; setup() binds the process to it
    device = resolve_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = setup(device)
    try:
        # Rank 0 trains (or loads) the cached tokenizer first; the others then open it.
        if not dist.is_main:
            barrier()
        tokenizer = load_tokenizer(cfg)
        if dist.is_main:
            barrier()
        num_labels = None
        if cfg.model.task == "sequence-classification":
            num_labels = cfg.model.num_labels or PROBE_NUM_LABELS
        model = build_model(cfg, tokenizer, num_labels).to(device)
        result = probe_for_config(cfg, model, device, dist=dist, use_cache=False)
    finally:
        teardown()
    if not dist.is_main:
        return
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
        sys.stdout.flush()
        return
    out.print(render_table(result))
    out.print(
        f"budget {fmt_bytes(result.budget_bytes)} = (1 − margin {result.margin:g}) × capacity "
        f"{fmt_bytes(result.capacity_bytes)}; weights+grads+optimizer "
        f"{fmt_bytes(result.static_bytes)}"
        + (
            f", activations {fmt_bytes(result.activation_bytes_per_sample)}/sequence"
            if result.activation_bytes_per_sample
            else ""
        )
    )
    out.print(
        f"[bold]micro_batch {result.micro_batch}[/], grad_accum {result.grad_accum}, "
        f"global batch {result.global_batch}"
        + (f" over {result.world_size} ranks" if result.world_size > 1 else "")
        + f"  ({len(result.trials)} trials, {result.seconds:.1f}s; cached in {cache_path(cfg)})"
    )
