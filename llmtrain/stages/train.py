"""The training loop: exact k-step accumulation, precision, schedule, eval, checkpoints.

Read it top to bottom like nanoGPT's train.py. One optimizer step ("window") is:

  1. the window's sequences: `global_batch` entries of the epoch's (seed, epoch) permutation;
     this rank's contiguous share of them, cut into micro-batches of at most `micro` (a rank
     with fewer than the busiest adds zero-weight stand-ins: all ranks join the same
     collectives);
  2. N = the supervised count of the WHOLE window (all ranks), known before any backward;
  3. each micro-batch backpropagates sum(per-token losses) / N × world (DDP and FSDP average
     gradients over ranks, so × world makes the result the global sum / N); no gradient sync
     (`no_sync_context`) on all but the last micro-batch;
  4. non-finite loss check, unscale, clip the true global gradient, optimizer step.

An out-of-memory error inside a window halves the micro-batch and re-runs the same window
from zero gradients with the same N — the update is identical (DESIGN §8).
"""

from __future__ import annotations

import contextlib
import gc
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from llmtrain.config import Config
from llmtrain.console import console as default_console
from llmtrain.data.batching import (
    SequenceSource,
    collate,
    epoch_order,
    grad_accum,
    micro_steps,
    rank_share,
    split_micro,
    steps_per_epoch,
    supervised_count,
    total_steps,
    window_indices,
)
from llmtrain.errors import LLMTrainError
from llmtrain.stages.evaluate import evaluate
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.distributed import DistInfo, all_reduce_min, all_reduce_sum, barrier
from llmtrain.train.faults import kill_point, maybe_fault_oom
from llmtrain.train.loss import summed_loss
from llmtrain.train.metrics import MetricsWriter, truncate_after
from llmtrain.train.optim import build_optimizer, effective_lr, lr_at, set_lr
from llmtrain.train.parallel import (
    clip_grad_norm,
    full_model_state,
    full_optimizer_state,
    is_fsdp,
    no_sync_context,
    save_pretrained_full,
    unwrap,
    wrap_model,
)
from llmtrain.train.precision import autocast_context, make_scaler

FP16_MAX_RETRIES = 30  # consecutive overflow-skipped attempts of one step before giving up


@dataclass
class TrainResult:
    """What a finished (or dry) run reports back to the pipeline and to tests."""

    step: int
    micro_batch: int
    last_loss: float | None = None
    last_eval: dict[str, float] | None = None
    final_dir: Path | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Window:
    """One optimizer step's data on this rank, already collated into micro-batches."""

    batches: list[dict[str, torch.Tensor]]
    n_total: float  # supervised count of the whole window, all ranks
    sequences: int  # whole window
    tokens: int  # non-pad tokens of the whole window
    padding: int = 0  # the last `padding` batches are zero-weight stand-ins (see micro_steps)


def is_isolated(cfg: Config) -> bool:
    """Pack mode with attention kept inside documents."""
    chunk = cfg.data.chunk
    return chunk.mode == "pack" and not chunk.cross_doc_attention


def make_window(
    cfg: Config,
    store: SequenceSource,
    window: np.ndarray,
    *,
    micro: int,
    pad_id: int,
    dist: DistInfo,
    device: torch.device,
    n_total: float | None = None,
) -> Window:
    """Collate this rank's share of `window` and count N over all ranks (one all-reduce;
    none when `n_total` is already known — re-cutting after an OOM on this rank alone, while
    the other ranks wait in the gradient all-reduce)."""
    share = rank_share(window, dist.rank, dist.world_size)
    task, norm = cfg.model.task, cfg.train.loss_normalization
    batches = [
        collate(store, idx, pad_id=pad_id, task=task, isolate_docs=is_isolated(cfg))
        for idx in split_micro(share, micro)
    ]
    if n_total is None:
        n_local = sum(supervised_count(b, task, norm) for b in batches)
        n = torch.tensor(float(n_local), dtype=torch.float64, device=device)
        n_total = float(all_reduce_sum(n).item())
    tokens = int(np.asarray(store.lengths)[window].sum())
    # Every rank runs the same number of micro-batches (the busiest rank's); the others
    # repeat the window's first sequence with weight zero, joining the collectives only.
    padding = max(0, micro_steps(len(window), micro, dist.world_size) - len(batches))
    if padding:
        stand_in = collate(
            store, window[:1], pad_id=pad_id, task=task, isolate_docs=is_isolated(cfg)
        )
        batches += [stand_in] * padding
    return Window(batches, n_total, len(window), tokens, padding)


def accumulate(
    cfg: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    win: Window,
    *,
    device: torch.device,
    dist: DistInfo,
) -> torch.Tensor:
    """Forward/backward every micro-batch of the window into zeroed grads; returns the
    window's summed loss (this rank, float64, detached)."""
    task, norm, precision = cfg.model.task, cfg.train.loss_normalization, cfg.train.precision
    optimizer.zero_grad(set_to_none=True)
    scale = dist.world_size / max(win.n_total, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    real = len(win.batches) - win.padding
    for i, batch in enumerate(win.batches):
        maybe_fault_oom(int(batch["input_ids"].shape[0]), dist.rank)
        weight = scale if i < real else 0.0  # a stand-in joins the collectives, adds nothing
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = inputs.pop("labels")
        with no_sync_context(model, last=i == len(win.batches) - 1):
            with autocast_context(precision, device):
                logits = model(**inputs).logits
            summed = summed_loss(logits, labels, task, norm)
            scaler.scale(summed * weight).backward()
        if i < real:
            loss_sum += summed.detach().double()
    return loss_sum


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimizer step on one rank: dropout masks are then a function of
    (seed, step, rank) only, so a resumed run — on any rank, any world size — draws exactly
    what the uninterrupted one drew, and ranks never share masks."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def free_memory(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Release what an interrupted window held before trying again with a smaller micro."""
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_text(device: torch.device) -> str:
    """Peak memory for the progress line: CUDA max allocated, else the process's peak RSS."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}GiB"


def train(
    cfg: Config,
    model: torch.nn.Module,
    tokenizer: Any,
    train_store: SequenceSource,
    eval_store: SequenceSource | None,
    *,
    micro_batch: int,
    device: torch.device,
    dist: DistInfo | None = None,
    resume: str | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Train `model` on `train_store` as `cfg` says; writes the run directory (DESIGN §5)."""
    dist = dist or DistInfo()
    console = console or default_console
    out = Path(cfg.run.output_dir)
    G, task = cfg.batch.global_batch, cfg.model.task
    n = len(train_store)
    if n == 0:
        raise LLMTrainError("data.train: the token store holds no sequences; nothing to train on")
    spe = steps_per_epoch(n, G)
    total = total_steps(n, G, cfg.train.max_steps, cfg.train.epochs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    micro = micro_batch
    peak = effective_lr(cfg.optim, G)

    # -- model, optimizer, scaler ------------------------------------------------------------
    model = wrap_model(model, cfg, dist, device)  # DDP or FSDP2 under torchrun (train.parallel)
    raw_model = unwrap(model)  # FSDP shards in place: the optimizer must see its parameters
    if cfg.model.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(cfg, raw_model)
    scaler = make_scaler(cfg.train.precision, device)

    # -- resume or start fresh -----------------------------------------------------------------
    step = 0
    found = ckpt.find_resume(out, resume) if resume else None
    if found is None and resume and ckpt.list_checkpoints(ckpt.checkpoint_dir(out)):
        raise LLMTrainError(f"{ckpt.checkpoint_dir(out)}: no checkpoint there could be read")
    if found is None and ckpt.list_checkpoints(ckpt.checkpoint_dir(out)):
        raise LLMTrainError(
            f"{ckpt.checkpoint_dir(out)}: holds checkpoints of an earlier run; continue it with "
            "--resume auto, or choose a new run.output_dir"
        )
    if found is not None:
        state = ckpt.apply_checkpoint(
            found, model=raw_model, optimizer=optimizer, scaler=scaler, device=device
        )
        step = int(state["step"])
        micro = min(micro, int(state.get("micro_batch", micro)))
        if int(state.get("global_batch", G)) != G:
            raise LLMTrainError(
                f"{found['path']}: written with batch.global_batch {state['global_batch']}, the "
                f"config says {G}; the data order and schedule of the run depend on it"
            )
        if dist.is_main:
            console.print(f"resumed from {found['path']} at step {step} (micro-batch {micro})")
            truncate_after(out / "metrics.jsonl", step)
    metrics = MetricsWriter(
        out / "metrics.jsonl",
        enabled=dist.is_main,
        jsonl=cfg.log.jsonl,
        tensorboard=cfg.log.tensorboard,
        fresh=found is None,
    )
    result = TrainResult(step=step, micro_batch=micro)

    def event(name: str, at: int, **fields: Any) -> None:
        record = {"event": name, "step": at, **fields}
        result.events.append(record)
        metrics.write(record)

    def run_eval(at: int) -> None:
        if eval_store is None or len(eval_store) == 0:
            return
        scores = evaluate(
            raw_model,  # eval needs no DDP: each rank runs its shard, sums are all-reduced
            eval_store,
            task=task,
            micro=micro,
            pad_id=pad_id,
            device=device,
            precision=cfg.train.precision,
            aggregate=cfg.data.chunk.aggregate,
            max_batches=cfg.train.eval_max_batches,
            isolate_docs=is_isolated(cfg),
            dist=dist,
        )
        result.last_eval = scores
        metrics.write({"split": "eval", "step": at, **scores})
        if dist.is_main:  # printed above the progress bar when there is one
            console.print(
                f"eval step {at}: " + "  ".join(f"{k} {v:.4g}" for k, v in scores.items())
            )

    def save(at: int) -> None:
        barrier()  # every rank has finished the step before rank 0 writes it
        # FSDP: every rank takes part in gathering the full weights and optimizer state to
        # rank 0, which writes the same checkpoint format as a single process.
        sharded = is_fsdp(raw_model)
        model_state = full_model_state(raw_model) if sharded else None
        optimizer_state = full_optimizer_state(raw_model, optimizer) if sharded else None
        if dist.is_main:
            ckpt.save_checkpoint(
                out,
                at,
                model=raw_model,
                optimizer=optimizer,
                scaler=scaler,
                model_state=model_state,
                optimizer_state=optimizer_state,
                train_state={
                    "epoch": (at // spe),
                    "step_in_epoch": at % spe,
                    "micro_batch": micro,
                    "total_steps": total,
                    "global_batch": G,
                    "world_size": dist.world_size,
                },
                keep=cfg.train.keep_checkpoints,
            )
        barrier()  # no rank reads a checkpoint that is still being written

    # -- progress display ----------------------------------------------------------------------
    show_bar = dist.is_main and cfg.log.progress and console.is_terminal
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not show_bar,
    )
    bar = progress.add_task("train", total=total, completed=step, info="")

    # -- the loop ------------------------------------------------------------------------------
    orders: dict[int, np.ndarray] = {}
    t_start = t_log = time.perf_counter()
    tokens_since_log = 0
    fp16_retries = 0
    with progress, contextlib.closing(metrics):
        while step < total:
            t_step = time.perf_counter()
            epoch, in_epoch = divmod(step, spe)
            if epoch not in orders:
                orders = {epoch: epoch_order(n, cfg.run.seed, epoch)}
            window = window_indices(orders[epoch], in_epoch, G)
            lr = lr_at(
                step,
                peak=peak,
                total=total,
                warmup=cfg.optim.warmup_steps,
                schedule=cfg.optim.schedule,
                min_lr_ratio=cfg.optim.min_lr_ratio,
            )
            set_lr(optimizer, lr)
            torch.manual_seed(step_seed(cfg.run.seed, step, dist.rank))

            # 1-3: the window's forward/backward passes, re-run with a halved micro on OOM.
            win = make_window(
                cfg, train_store, window, micro=micro, pad_id=pad_id, dist=dist, device=device
            )
            while True:
                try:
                    loss_sum = accumulate(
                        cfg, model, optimizer, scaler, win, device=device, dist=dist
                    )
                    break
                except torch.OutOfMemoryError:
                    free_memory(optimizer, device)
                    if is_fsdp(raw_model):  # the other ranks wait inside an all-gather
                        raise LLMTrainError(
                            f"out of memory at step {step + 1} on rank {dist.rank} under "
                            "train.parallel: fsdp (no recovery there); set a smaller "
                            "batch.micro_batch"
                        ) from None
                    if micro == 1:
                        raise LLMTrainError(
                            f"out of memory at step {step + 1} with micro-batch 1; reduce "
                            "data.chunk.seq_len or the model, or enable "
                            "model.gradient_checkpointing"
                        ) from None
                    event("oom", step + 1, micro_batch_from=micro, micro_batch_to=micro // 2)
                    micro //= 2
                    n_window = win.n_total  # same data, same N: re-cut into smaller micro-batches
                    win = make_window(
                        cfg,
                        train_store,
                        window,
                        micro=micro,
                        pad_id=pad_id,
                        dist=dist,
                        device=device,
                        n_total=n_window,
                    )

            # 4: the exact window loss, then the update. Under DDP an OOM may have halved the
            # micro-batch on one rank only: all ranks continue with the smallest.
            loss = (all_reduce_sum(loss_sum) / max(win.n_total, 1.0)).item()
            if dist.enabled:
                micro = int(all_reduce_min(torch.tensor(micro, device=device)).item())
            if not math.isfinite(loss):
                if cfg.train.nan_policy == "stop":
                    last = ckpt.list_checkpoints(ckpt.checkpoint_dir(out))
                    where = (
                        f"the last checkpoint ({last[-1]}) is intact"
                        if last
                        else "no checkpoint was written yet"
                    )
                    raise LLMTrainError(
                        f"non-finite loss ({loss}) at step {step + 1}; {where}. Lower optim.lr, "
                        "check the data, or set train.nan_policy: skip"
                    )
                optimizer.zero_grad(set_to_none=True)
                event("nonfinite_loss_skipped", step + 1, loss=str(loss))
                step += 1
                progress.update(bar, completed=step)
                continue
            scaler.unscale_(optimizer)
            grad_norm = clip_grad_norm(raw_model, cfg.optim.grad_clip)  # global, also sharded
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            if scale_before is not None and scaler.get_scale() < scale_before:
                # fp16 overflow: the scaler skipped the update; the step (and schedule) does
                # not advance and the same window is tried again at the lower scale.
                event("fp16_overflow_skip", step + 1, scale=scaler.get_scale())
                fp16_retries += 1
                if fp16_retries > FP16_MAX_RETRIES:
                    raise LLMTrainError(
                        f"fp16 gradients overflow at step {step + 1} even at loss scale "
                        f"{scaler.get_scale():g}; use train.precision: bf16 or fp32"
                    )
                continue
            fp16_retries = 0
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_since_log += win.tokens
            result.last_loss = loss

            # -- log, eval, checkpoint (all keyed on the step only, so a resumed run repeats
            # exactly the records of an uninterrupted one) ------------------------------------
            now = time.perf_counter()
            k = grad_accum(G, micro, dist.world_size)
            if step % cfg.train.log_every == 0 or step in (1, total):
                record = {
                    "split": "train",
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": win.tokens,
                    "sequences": win.sequences,
                    "micro_batch": micro,
                    "grad_accum": k,
                    "tokens_per_s": tokens_since_log / max(now - t_log, 1e-9),
                    "elapsed_s": now - t_start,
                }
                metrics.write(record)
                if dist.is_main and not show_bar:
                    console.print(
                        f"step {step}/{total}  loss {loss:.4f}  lr {lr:.3g}  "
                        f"grad_norm {grad_norm:.3g}  {record['tokens_per_s']:.0f} tok/s"
                    )
                t_log, tokens_since_log = now, 0
            rate = win.tokens / max(now - t_step, 1e-9)
            info = f"loss {loss:.4f}  lr {lr:.2e}  {rate:,.0f} tok/s  mem {memory_text(device)}"
            progress.update(bar, completed=step, info=info)
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total:
                run_eval(step)
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == total:
                save(step)
            kill_point(f"step_end:{step}")

    result.step, result.micro_batch = step, micro
    # FSDP: all ranks gather the full weights for rank 0's final save_pretrained
    final_state = full_model_state(raw_model, drop_tied=False) if is_fsdp(raw_model) else None
    if dist.is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own output only
        final = out / "final"
        if hasattr(raw_model.config, "use_cache"):
            raw_model.config.use_cache = True  # off while training; on for whoever generates
        with ckpt.atomic_dir(final) as tmp:
            save_pretrained_full(raw_model, tmp, final_state)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
        result.final_dir = final
    barrier()
    return result
