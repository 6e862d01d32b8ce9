"""`llmtrain fit`: the plan as a table before training, one line when it is done."""

from __future__ import annotations

from rich.table import Table

from llmtrain.config import Config
from llmtrain.console import console
from llmtrain.data.batching import grad_accum, steps_per_epoch, total_steps
from llmtrain.engine.model import count_parameters, total_parameters
from llmtrain.engine.optim import effective_lr, resolve_warmup
from llmtrain.pipeline import Plan, fit


def trainable_text(plan: Plan) -> str:
    """Trainable against total parameters, and the PEFT method when one is set."""
    trainable, total = count_parameters(plan.model), total_parameters(plan.model)
    text = f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M ({100 * trainable / max(total, 1):.2f}%)"
    p = plan.cfg.model.peft
    return text + (f", {p.method} r={p.r} on {p.target_modules}" if p is not None else "")


def banner(plan: Plan) -> Table:
    """The plan at a glance: what trains, where, with which batch and LR."""
    cfg, dist, micro = plan.cfg, plan.dist, plan.micro
    global_batch = cfg.batch.global_batch
    k = grad_accum(global_batch, micro, dist.world_size)
    steps = total_steps(plan.n_train, global_batch, cfg.train.max_steps, cfg.train.epochs)
    seq = cfg.data.chunk.seq_len
    lr_text = f"{effective_lr(cfg.optim, global_batch):.3g}"
    if cfg.optim.lr_scaling != "none":
        base = cfg.optim.base_batch
        lr_text += f" ({cfg.optim.lr:.3g} × {cfg.optim.lr_scaling}({global_batch}/{base}))"
    device = f"{plan.device} × {dist.world_size}" if dist.enabled else str(plan.device)
    per_epoch = steps_per_epoch(plan.n_train, global_batch)
    rows = [
        ("run", f"{cfg.run.name} → {cfg.run.output_dir}"),
        (
            "model",
            f"{cfg.model.arch or cfg.model.pretrained} ({cfg.model.task}), "
            f"{total_parameters(plan.model) / 1e6:.2f}M parameters",
        ),
        ("trainable", trainable_text(plan)),
        ("device", device),
        *host_rows(plan),
        ("precision", cfg.train.precision),
        (
            "batch",
            f"micro {micro} × k {k} × world {dist.world_size} → global {global_batch} sequences",
        ),
        ("tokens / step", f"≤ {global_batch * seq:,} (seq_len {seq}, {cfg.data.chunk.mode})"),
        ("data", f"{plan.n_train:,} train sequences, {per_epoch} steps/epoch"),
        ("steps", f"{steps:,} ({cfg.optim.schedule}, {_warmup_text(cfg, steps)})"),
        ("effective LR", lr_text),
    ]
    table = Table(title="llmtrain fit", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def host_rows(plan: Plan) -> list[tuple[str, str]]:
    """CPU threads and allocator policy (host/threads.py, host/allocator.py)."""
    rows = []
    if plan.threads is not None:
        rows.append(("threads", plan.threads.describe()))
    if plan.allocator is not None and plan.device.type == "cpu":
        rows.append(("cpu allocator", plan.allocator.describe()))
    return rows


def _warmup_text(cfg: Config, steps: int) -> str:
    """'warmup 20', or for the default 'warmup 1 (default: 5% of 20 steps)'."""
    text = f"warmup {resolve_warmup(cfg.optim, steps)}"
    return text if cfg.optim.warmup_steps is not None else f"{text} (default: 5% of {steps} steps)"


def execute(
    cfg: Config,
    *,
    resume: str | None,
    dry_run: bool,
    overwrite: bool = False,
    accept_data_change: bool = False,
) -> None:
    """Entry point of `llmtrain fit` (called by llmtrain.cli after validation); the plan and
    the closing line are printed by rank 0 alone."""

    def show(plan: Plan) -> None:
        console.print(banner(plan))
        if dry_run:
            console.print(
                "dry run: tokenizer, stores, model and micro-batch resolved; not training"
            )

    result = fit(
        cfg,
        resume=resume,
        dry_run=dry_run,
        overwrite=overwrite,
        accept_data_change=accept_data_change,
        on_plan=show,
    )
    if result is not None and result.final_dir is not None:
        console.print(f"done: step {result.step}, final model in {result.final_dir}")
