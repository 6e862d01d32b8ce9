"""The training loop: exact k-step accumulation, precision, schedule, eval, checkpoints.

`train()` reads top to bottom like nanoGPT's train.py; each piece it calls does one job:

  restore_or_start   the one place that decides: a fresh run, a resume, or a refusal
  backward_window    the window's forward/backward passes (engine/step.py), re-cut with a
                     halved micro-batch on out-of-memory: same data, same N, same update
  take_step          the exact window loss, then stepped, skipped-non-finite or fp16-retry
  after_step         log, eval, checkpoint and the kill point, on every path that advances

State the loop changes lives in `LoopState`; what is fixed for the run lives in `Run`.
See docs/architecture.md, "Exact accumulation".
"""

from __future__ import annotations

import gc
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from llmtrain import layout
from llmtrain.config import Config
from llmtrain.console import console as default_console
from llmtrain.console import say
from llmtrain.data.batching import (
    SequenceSource,
    grad_accum,
    steps_per_epoch,
    total_steps,
    window_indices,
)
from llmtrain.data.mixture import Mixture
from llmtrain.engine import checkpoint as ckpt
from llmtrain.engine import flops, signals
from llmtrain.engine.adalora import STATE_KEY as ADALORA_STATE
from llmtrain.engine.adalora import RankAllocation
from llmtrain.engine.distributed import DistInfo, all_reduce_min, all_reduce_sum, barrier
from llmtrain.engine.evaluate import evaluate
from llmtrain.engine.faults import kill_point
from llmtrain.engine.loss import resolve_loss_chunk, show_notice
from llmtrain.engine.metrics import MetricsWriter, truncate_after
from llmtrain.engine.model import enable_tf32, model_positions, rebuild_on_host
from llmtrain.engine.optim import build_optimizer, effective_lr, lr_at, resolve_warmup, set_lr
from llmtrain.engine.parallel import (
    full_model_state,
    full_optimizer_state,
    is_fsdp,
    save_pretrained_full,
    unwrap,
    wrap_model,
)
from llmtrain.engine.peft import is_peft, save_adapter_then_merge
from llmtrain.engine.precision import make_scaler
from llmtrain.engine.prefetch import Prefetcher
from llmtrain.engine.progress import LogInterval, TrainLog
from llmtrain.engine.step import (
    OOMInGradientSync,
    StepSpec,
    Window,
    drop_failed_backward,
    forward_backward,
    make_window,
    offloads,
    optimizer_step,
)
from llmtrain.engine.trackers import Trackers
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import atomic_dir
from llmtrain.util.owned import check_replaceable, confined, mark

FP16_MAX_RETRIES = 30  # consecutive overflow-skipped attempts of one step before giving up


@dataclass
class TrainResult:
    """What a finished run reports back to the pipeline and to tests."""

    step: int
    micro_batch: int
    last_loss: float | None = None
    last_eval: dict[str, float] | None = None
    final_dir: Path | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    last_evals: dict[str, dict[str, float]] = field(default_factory=dict)  # by split


@dataclass
class Run:
    """Everything fixed for one run: config, model, optimizer, data, and where it writes."""

    cfg: Config
    model: torch.nn.Module  # what trains: possibly DDP/FSDP-wrapped and compiled
    raw_model: torch.nn.Module  # the module itself: optimizer, checkpoints, eval
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    spec: StepSpec
    train_store: SequenceSource
    eval_stores: dict[str, SequenceSource]  # by split: eval, or eval/<name> per named set
    mixture: Mixture  # the epoch's order; a single source is a mixture of one at its size
    pad_id: int
    device: torch.device
    dist: DistInfo
    out: Path
    steps_per_epoch: int
    total: int
    peak_lr: float
    warmup: int  # optim.warmup_steps resolved against `total` (engine.optim.resolve_warmup)
    mixed: bool = False  # data.train is a list: train records carry `sources`
    prefetch: Prefetcher | None = None  # the next window, cut while this one computes
    adalora: RankAllocation | None = None  # AdaLoRA's rank allocator (engine/adalora.py)


@dataclass
class LoopState:
    """What the loop changes as it goes."""

    step: int
    micro: int
    fp16_retries: int = 0
    last_loss: float | None = None
    last_eval: dict[str, float] | None = None  # the first eval split's (TrainResult.last_eval)
    last_evals: dict[str, dict[str, float]] = field(default_factory=dict)
    order: tuple[int, np.ndarray] | None = None  # (epoch, permutation): one epoch cached
    skipped: list[int] = field(default_factory=list)  # steps skipped under nan_policy: skip
    # sums since the last train record (the next one averages them); saved in checkpoints
    log_interval: LogInterval = field(default_factory=LogInterval)


def show_offload_notice(cfg: Config, device: torch.device) -> None:
    """One line when model.activation_offload is set but has nothing to do (CPU)."""
    if cfg.model.activation_offload and not offloads(cfg, device):
        say(
            f"model.activation_offload has no effect on {device.type} (activations already "
            "live in host memory); it applies on CUDA",
            once=True,
            label="notice",
        )


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimizer step on one rank: dropout masks are then a function of
    (seed, step, rank) only, so a resumed run — on any rank, any world size — draws exactly
    what the uninterrupted one drew, and ranks never share masks."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


EvalStores = SequenceSource | Mapping[str, SequenceSource] | None


def by_split(eval_store: EvalStores) -> dict[str, SequenceSource]:
    """The eval stores by split: one store is split "eval" (data.eval as one corpus, or
    eval_fraction); a mapping is already keyed by split (eval/<name>)."""
    if eval_store is None:
        return {}
    if isinstance(eval_store, Mapping):
        return dict(eval_store)
    return {"eval": eval_store}


def setup_run(
    cfg: Config,
    model: torch.nn.Module,
    tokenizer: Any,
    train_store: SequenceSource,
    eval_store: EvalStores,
    *,
    device: torch.device,
    dist: DistInfo,
    mixture: Mixture | None = None,
) -> Run:
    """Wrap the model (DDP/FSDP2 under torchrun, then torch.compile if asked) and build the
    optimizer and loss scaler. `mixture`: how an epoch draws from `train_store` (a
    data/mixture.ConcatStore); None: the store is one source, drawn once per epoch."""
    if len(train_store) == 0:
        raise LLMTrainError("data.train: the token store holds no sequences; nothing to train on")
    mixed = mixture is not None
    mixture = mixture or Mixture.single(len(train_store))
    n, global_batch = mixture.epoch_size, cfg.batch.global_batch
    total = total_steps(n, global_batch, cfg.train.max_steps, cfg.train.epochs)
    # before wrapping: its check runs a forward, which would leave FSDP's root unsharded
    loss_chunk = resolve_loss_chunk(cfg.train.loss_chunk, model.to(device), cfg.model.task)
    show_notice(loss_chunk)
    show_offload_notice(cfg, device)
    enable_tf32(device)
    wrapped = wrap_model(model, cfg, dist, device)
    raw_model = unwrap(wrapped)  # FSDP shards in place: the optimizer must see its parameters
    if cfg.model.compile:
        wrapped = torch.compile(wrapped)
    return Run(
        cfg=cfg,
        model=wrapped,
        raw_model=raw_model,
        optimizer=build_optimizer(cfg, raw_model),
        scaler=make_scaler(cfg.train.precision, device),
        spec=StepSpec.from_config(cfg, loss_chunk.tokens, device),
        train_store=train_store,
        eval_stores=by_split(eval_store),
        mixture=mixture,
        mixed=mixed,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        device=device,
        dist=dist,
        out=Path(cfg.run.output_dir),
        steps_per_epoch=steps_per_epoch(n, global_batch),
        total=total,
        peak_lr=effective_lr(cfg.optim, global_batch),
        warmup=resolve_warmup(cfg.optim, total),
        adalora=RankAllocation.attach(raw_model, total),
    )


def checkpoint_parts(run: Run, state: LoopState) -> dict[str, ckpt.Stateful]:
    """Every component whose state a checkpoint carries, each under its own key of state.pt
    (engine/checkpoint.py): a component with state is added here, nowhere else."""
    parts: dict[str, ckpt.Stateful] = {
        "scaler": run.scaler,
        "rng": ckpt.RngState(),
        "log_interval": state.log_interval,
    }
    if run.adalora is not None:
        parts[ADALORA_STATE] = run.adalora
    return parts


def find_start(out: Path, resume: str | None) -> ckpt.Checkpoint | None:
    """Fresh (None), a checkpoint to resume from, or a refusal: an output_dir with checkpoints
    is never trained over silently. Without `resume` this reads nothing (cheap to ask early)."""
    root = ckpt.checkpoint_dir(out)
    found = ckpt.find_resume(out, resume) if resume else None
    if found is None and ckpt.list_checkpoints(root):
        if resume:
            raise LLMTrainError(f"{root}: no checkpoint there could be read")
        raise LLMTrainError(
            f"{root}: holds checkpoints of an earlier run; continue it with --resume auto, or "
            "choose a new run.output_dir"
        )
    return found


def restore_or_start(run: Run, resume: str | None, micro: int, console: Console) -> LoopState:
    """Restore weights, optimizer, scaler and RNG from the checkpoint `find_start` picks, or
    start at step 0. A resume keeps the smaller of the two micro-batches (an OOM may have
    halved it) and refuses a changed global batch (the data order depends on it)."""
    found = find_start(run.out, resume)
    loop = LoopState(step=0, micro=micro)
    if found is None:
        return loop
    parts = checkpoint_parts(run, loop)
    train = ckpt.apply_checkpoint(
        found, model=run.raw_model, optimizer=run.optimizer, parts=parts, device=run.device
    )
    global_batch = run.cfg.batch.global_batch
    if train.global_batch is not None and train.global_batch != global_batch:
        raise LLMTrainError(
            f"{found.path}: written with batch.global_batch {train.global_batch}, the "
            f"config says {global_batch}; the data order and schedule of the run depend on it"
        )
    loop.step, loop.micro = train.step, min(micro, train.micro_batch)
    ckpt.check_total(run.total, loop.step, found.path)  # else it would end at once as "done"
    if run.dist.is_main:
        where = f"{found.path} at step {loop.step}"
        console.print(f"resumed from {where} (micro-batch {loop.micro})")
        truncate_after(run.out / layout.METRICS_FILE, loop.step)
    return loop


def window_at(run: Run, state: LoopState, step: int | None = None) -> np.ndarray:
    """The sequence indices of the optimizer step `step` (default `state.step`): a function
    of (seed, epoch) and the mixture (data/mixture.py)."""
    epoch, in_epoch = divmod(state.step if step is None else step, run.steps_per_epoch)
    if state.order is None or state.order[0] != epoch:
        state.order = (epoch, run.mixture.order(run.cfg.run.seed, epoch))
    return window_indices(state.order[1], in_epoch, run.cfg.batch.global_batch)


def schedule_lr(run: Run, step: int) -> float:
    o = run.cfg.optim
    lr = lr_at(
        step,
        peak=run.peak_lr,
        total=run.total,
        warmup=run.warmup,
        schedule=o.schedule,
        min_lr_ratio=o.min_lr_ratio,
    )
    set_lr(run.optimizer, lr)
    return lr


def backward_window(
    run: Run, state: LoopState, indices: np.ndarray, log: TrainLog
) -> tuple[Window, torch.Tensor]:
    """Forward/backward the window; on out-of-memory halve `state.micro` and redo the same
    window from zero gradients with the same N. Returns the window and its summed loss."""

    def cut(n_total: float | None = None) -> Window:
        return cut_window(run, indices, state.micro, n_total)

    prefetched = run.prefetch.take(state.step, state.micro) if run.prefetch else None
    win = prefetched or cut()
    prefetch_next(run, state)
    while True:
        try:
            args = (run.model, run.optimizer, run.scaler, win, run.spec)
            return win, forward_backward(*args, device=run.device, dist=run.dist)
        except torch.OutOfMemoryError as e:
            in_sync = isinstance(e, OOMInGradientSync)
        # Outside the except block: its traceback would keep the failed window's tensors alive.
        drop_failed_backward(run.device)
        run.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        unrecoverable(run, state, in_sync)
        log.event(
            "oom", state.step + 1, micro_batch_from=state.micro, micro_batch_to=state.micro // 2
        )
        state.micro //= 2
        win = cut(n_total=win.n_total)
        prefetch_next(run, state)  # the one in flight was cut at the old micro-batch


def unrecoverable(run: Run, state: LoopState, in_sync: bool) -> None:
    """Raise the one-line error for an out-of-memory error that halving the micro-batch cannot
    recover from; return when it can. `in_sync`: it struck inside DDP's gradient all-reduce."""
    at, rank = state.step + 1, run.dist.rank
    smaller = (
        "reduce data.chunk.seq_len or the model, or enable model.gradient_checkpointing"
        if state.micro == 1
        else f"set batch.micro_batch: {state.micro // 2} (k doubles; the update is the same)"
    )
    if is_fsdp(run.raw_model):  # the other ranks wait inside an all-gather
        raise LLMTrainError(
            f"out of memory at step {at} on rank {rank} under train.parallel: fsdp "
            f"(no recovery there); {smaller}"
        )
    if in_sync:  # engine/step.py, OOMInGradientSync
        raise LLMTrainError(
            f"out of memory at step {at} on rank {rank} inside the window's last backward, "
            "while DDP was all-reducing gradients across ranks (no recovery there: the other "
            f"ranks wait inside that all-reduce); {smaller}"
        )
    if state.micro == 1:
        raise LLMTrainError(f"out of memory at step {at} with micro-batch 1; {smaller}")


def cut_window(run: Run, indices: np.ndarray, micro: int, n_total: float | None = None) -> Window:
    """`make_window` of this run's store for `indices` at micro-batch `micro`."""
    return make_window(
        run.train_store,
        indices,
        run.spec,
        micro=micro,
        pad_id=run.pad_id,
        dist=run.dist,
        device=run.device,
        n_total=n_total,
    )


def prefetch_next(run: Run, state: LoopState) -> None:
    """Start cutting the next step's window in the background (engine/prefetch.py); its
    indices are computed here, on the loop's thread, so the data order is the loop's."""
    step = state.step + 1
    if run.prefetch is None or step >= run.total:
        return
    indices, micro = window_at(run, state, step), state.micro
    run.prefetch.schedule(step, micro, lambda n: cut_window(run, indices, micro, n))


def take_step(
    run: Run, state: LoopState, win: Window, loss_sum: torch.Tensor, log: TrainLog
) -> tuple[str, float, float]:
    """The exact window loss, then the update. Returns (outcome, loss, grad_norm), outcome
    one of `stepped`, `skipped` (non-finite loss under nan_policy: skip) or `retry` (fp16
    overflow: the same window again at a lower loss scale; the step does not advance)."""
    loss = (all_reduce_sum(loss_sum) / max(win.n_total, 1.0)).item()
    if run.dist.enabled:  # an OOM may have halved one rank's micro: all continue with the least
        state.micro = int(all_reduce_min(torch.tensor(state.micro, device=run.device)).item())
    at = state.step + 1
    if not math.isfinite(loss):
        if run.cfg.train.nan_policy == "stop":
            last = ckpt.list_checkpoints(ckpt.checkpoint_dir(run.out))
            where = (
                f"the last checkpoint ({last[-1]}) is intact"
                if last
                else "no checkpoint was written yet"
            )
            raise LLMTrainError(
                f"non-finite loss ({loss}) at step {at}; {where}. Lower optim.lr, check the "
                "data, or set train.nan_policy: skip"
            )
        run.optimizer.zero_grad(set_to_none=True)
        log.event("nonfinite_loss_skipped", at, loss=str(loss))
        return "skipped", loss, float("nan")
    allocate = (lambda: run.adalora.step(state.step)) if run.adalora is not None else None
    outcome = optimizer_step(run.raw_model, run.optimizer, run.scaler, run.spec, allocate)
    if outcome.stepped:
        state.fp16_retries = 0
        return "stepped", loss, outcome.grad_norm
    log.event("fp16_overflow_skip", at, scale=run.scaler.get_scale())
    state.fp16_retries += 1
    if state.fp16_retries > FP16_MAX_RETRIES:
        raise LLMTrainError(
            f"fp16 gradients overflow at step {at} even at loss scale "
            f"{run.scaler.get_scale():g}; use train.precision: bf16 or fp32"
        )
    return "retry", loss, outcome.grad_norm


def rank_budget(run: Run, step: int) -> dict[str, int]:
    """AdaLoRA: the total rank budget of optimizer step `step` (0-based), for the train
    record (`report` plots it); nothing for other runs."""
    return {} if run.adalora is None else {"rank_budget": run.adalora.budget(step)}


def save(run: Run, state: LoopState) -> None:
    """Checkpoint the step just finished. Under FSDP every rank takes part in gathering the
    full weights and optimizer state to rank 0, which writes the single-process format."""
    barrier()  # every rank has finished the step before rank 0 writes it
    sharded = is_fsdp(run.raw_model)
    # a PEFT checkpoint is the trainable tensors alone: the frozen base is never gathered
    peft = is_peft(run.raw_model)
    model_state = full_model_state(run.raw_model, trainable_only=peft) if sharded else None
    optimizer_state = full_optimizer_state(run.raw_model, run.optimizer) if sharded else None
    if run.dist.is_main:
        step, spe = state.step, run.steps_per_epoch
        train = ckpt.TrainState(
            step=step,
            micro_batch=state.micro,
            epoch=step // spe,
            step_in_epoch=step % spe,
            total_steps=run.total,
            global_batch=run.cfg.batch.global_batch,
            world_size=run.dist.world_size,
        )
        ckpt.save_checkpoint(
            run.out,
            step,
            model=run.raw_model,
            optimizer=run.optimizer,
            train_state=train,
            parts=checkpoint_parts(run, state),
            model_state=model_state,
            optimizer_state=optimizer_state,
            keep=run.cfg.train.keep_checkpoints,
        )
    barrier()  # no rank reads a checkpoint that is still being written


def eval_now(run: Run, state: LoopState, log: TrainLog) -> None:
    """fit's eval of the weights at `state.step` on every eval set, each its own record (split
    `eval`, or `eval/<name>` for a named set)."""
    for split, store in run.eval_stores.items():
        if len(store) == 0:
            continue
        scores = eval_scores(run, state, store)
        state.last_evals[split] = scores
        if state.last_eval is None or split == next(iter(run.eval_stores)):
            state.last_eval = scores
        log.evaluated(state.step, scores, split=split)


def eval_scores(run: Run, state: LoopState, store: SequenceSource) -> dict[str, float]:
    cfg = run.cfg
    return evaluate(
        run.raw_model,  # eval needs no DDP: each rank runs its shard, sums are all-reduced
        store,
        run.spec,
        micro=state.micro,
        pad_id=run.pad_id,
        device=run.device,
        aggregate=cfg.data.chunk.aggregate,
        max_batches=cfg.train.eval_max_batches,
        dist=run.dist,
    )


def after_step(run: Run, state: LoopState, log: TrainLog) -> None:
    """Eval, checkpoint and the kill point of the step just counted — whether it stepped or
    was skipped, so the last step always ends with a final eval and checkpoint."""
    step, t = state.step, run.cfg.train
    if (t.eval_every and step % t.eval_every == 0) or step == run.total:
        eval_now(run, state, log)
    saved = bool(t.save_every and step % t.save_every == 0) or step == run.total
    if saved:
        save(run, state)
    kill_point(f"step_end:{step}")
    # SIGTERM: this step is done; save it and stop (exit 143). At the last step: just finish.
    if step < run.total and stop_requested(run):
        if not saved:
            save(run, state)
        raise signals.Preempted(step, ckpt.checkpoint_path(run.out, step))


def stop_requested(run: Run) -> bool:
    """Whether a SIGTERM arrived (engine/signals.py); under torchrun one all-reduce, so that
    a signal on any rank stops every rank after the same step."""
    if not signals.active():
        return False
    flag = torch.tensor(float(signals.requested()), device=run.device)
    return all_reduce_sum(flag).item() > 0


def report_skipped(run: Run, state: LoopState, steps_run: int, log: TrainLog) -> None:
    """nan_policy: skip ends with a summary of what it skipped: a `nonfinite_summary` event
    in metrics.jsonl and a warning on stderr, louder when more than half the steps were
    skipped (the model in final/ then barely trained). The exit stays 0: the run did what
    nan_policy: skip asks, and its checkpoints and final/ are there to inspect."""
    n = len(state.skipped)
    if n == 0:
        return
    log.event("nonfinite_summary", state.step, skipped=n, steps=steps_run)
    shown = ", ".join(map(str, state.skipped[:5])) + (", ..." if n > 5 else "")
    summary = f"train.nan_policy: skip skipped {n} of {steps_run} steps (non-finite loss: {shown})"
    if 2 * n > steps_run:
        summary = (
            f"{summary}: MOST OF THE RUN DID NOT TRAIN, final/ holds a barely trained model; "
            "lower optim.lr or check the data"
        )
    say(f"warning: {summary}")


def save_final(run: Run, tokenizer: Any) -> Path | None:
    """`final/`: the model (save_pretrained, loadable with AutoModel*.from_pretrained) and
    the tokenizer beside it and `checksums.json` of every file (verified by `open_run`),
    written atomically by rank 0; None on the other ranks. A PEFT
    model also writes `adapter/` and is then merged into its base for `final/` (in place)."""
    raw = run.raw_model
    # FSDP: all ranks gather the full weights for rank 0's save_pretrained; with PEFT the
    # adapters alone, which rank 0 puts into an unsharded copy (rebuild_on_host)
    peft = is_peft(raw)
    state = full_model_state(raw, drop_tied=False, trainable_only=peft) if is_fsdp(raw) else None
    final = None
    if run.dist.is_main and state is not None and peft:
        raw, state = rebuild_on_host(run.cfg, tokenizer, raw, state), None
    if run.dist.is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own output only
        final = confined(run.out, run.out / layout.FINAL_DIR)
        check_replaceable(final, "final", (ckpt.MANIFEST, "config.json"))
        if run.adalora is not None:
            run.adalora.finish()
        if peft:
            raw = save_adapter_then_merge(raw, run.out / layout.ADAPTER_DIR, tokenizer)
        if hasattr(raw.config, "use_cache"):
            raw.config.use_cache = True  # off while training; on for whoever generates
        limit = model_positions(raw.config)
        if limit is not None and hasattr(tokenizer, "model_max_length"):
            tokenizer.model_max_length = limit  # else ~1e30: nothing would warn of a long input
        with atomic_dir(final) as tmp:
            save_pretrained_full(raw, tmp, state)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
            ckpt.write_manifest(tmp, sorted(f.name for f in tmp.iterdir() if f.is_file()))
            mark(tmp, "final")
    barrier()
    return final


def job_peak(run: Run) -> float | None:
    """Peak FLOP/s of the whole job for MFU: one device's (engine/flops.py) × world size."""
    peak = flops.device_peak(run.device, run.cfg.run.peak_flops)
    return None if peak is None else peak * run.dist.world_size


def open_log(
    run: Run,
    state: LoopState,
    console: Console,
    changes: dict[str, list] | None = None,
    data_changes: dict[str, list] | None = None,
) -> TrainLog:
    """metrics.jsonl (appended to on resume, after `restore_or_start` cut it back) and the
    progress display; rank 0 alone writes. `changes`: the safe config changes of a resume
    (rundir/provenance.py), recorded as a `config_changed` event at the resumed step;
    `data_changes`: the data changes it accepted (rundir/data_record.py), `data_changed`."""
    cfg, is_main = run.cfg, run.dist.is_main
    fresh = state.step == 0
    metrics = MetricsWriter(
        run.out / layout.METRICS_FILE,
        enabled=is_main,
        jsonl=cfg.log.jsonl,
        tensorboard=cfg.log.tensorboard,
        fresh=fresh,
        trackers=Trackers.open(cfg, run.out, fresh=fresh) if is_main else None,
    )
    log = TrainLog(
        metrics,
        console,
        total=run.total,
        start=state.step,
        log_every=cfg.train.log_every,
        is_main=is_main,
        show_progress=cfg.log.progress,
        device=run.device,
        interval=state.log_interval,
        flops_per_token=flops.flops_per_token(run.raw_model),
        peak_flops=job_peak(run),
    )
    if changes and state.step > 0:
        log.event("config_changed", state.step, changes=changes)
    if data_changes and state.step > 0:
        log.event("data_changed", state.step, changes=data_changes, accepted=True)
    return log


def log_trained(
    run: Run,
    state: LoopState,
    log: TrainLog,
    win: Window,
    indices: np.ndarray,
    **step: float | None,
) -> None:
    """The train record of the step just taken (`step`: its loss, lr and grad_norm)."""
    log.trained(
        state.step,
        **step,
        tokens=win.tokens,
        sequences=win.sequences,
        micro_batch=state.micro,
        grad_accum=grad_accum(run.cfg.batch.global_batch, state.micro, run.dist.world_size),
        sources=run.mixture.count(indices) if run.mixed else None,
        **rank_budget(run, state.step - 1),
    )


def train(
    cfg: Config,
    model: torch.nn.Module,
    tokenizer: Any,
    train_store: SequenceSource,
    eval_store: EvalStores,
    *,
    micro_batch: int,
    device: torch.device,
    dist: DistInfo | None = None,
    resume: str | None = None,
    console: Console | None = None,
    changes: dict[str, list] | None = None,
    mixture: Mixture | None = None,
    data_changes: dict[str, list] | None = None,
) -> TrainResult:
    """Train `model` on `train_store` as `cfg` says; writes the run directory
    (docs/architecture.md, "Run directory"). `eval_store`: one store, or {split: store} for
    named eval sets. `changes`, `data_changes`: see `open_log`; `mixture`: see `setup_run`."""
    dist, console = dist or DistInfo(), console or default_console
    run = setup_run(
        cfg, model, tokenizer, train_store, eval_store, device=device, dist=dist, mixture=mixture
    )
    state = restore_or_start(run, resume, micro_batch, console)
    signals.defer_to_step_end()  # a SIGTERM from now on ends the current step with a checkpoint
    start = state.step
    with (
        open_log(run, state, console, changes, data_changes) as log,
        Prefetcher(run.spec, device) as pre,
    ):
        run.prefetch = pre
        while state.step < run.total:
            log.step_started()
            indices = window_at(run, state)
            lr = schedule_lr(run, state.step)
            torch.manual_seed(step_seed(cfg.run.seed, state.step, dist.rank))
            win, loss_sum = backward_window(run, state, indices, log)
            outcome, loss, grad_norm = take_step(run, state, win, loss_sum, log)
            if outcome == "retry":
                continue
            state.step += 1
            if outcome == "stepped":
                state.last_loss = loss
                log_trained(run, state, log, win, indices, loss=loss, lr=lr, grad_norm=grad_norm)
            else:
                state.skipped.append(state.step)
                log.skipped(state.step)
            after_step(run, state, log)
        report_skipped(run, state, state.step - start, log)
    final_dir = save_final(run, tokenizer)
    return finished(state, final_dir, log.events)


def finished(state: LoopState, final_dir: Path | None, events: list[dict]) -> TrainResult:
    """What `train` reports back from its final state."""
    return TrainResult(
        state.step,
        state.micro,
        state.last_loss,
        state.last_eval,
        final_dir,
        events,
        state.last_evals,
    )
