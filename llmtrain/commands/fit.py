"""`llmtrain fit`: the plan as a table before training, one line when it is done."""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table

from llmtrain.config import Config
from llmtrain.config.peft_methods import METHODS
from llmtrain.console import console
from llmtrain.data.batching import grad_accum, steps_per_epoch, total_steps
from llmtrain.data.mixture import Mixture
from llmtrain.engine.loss import describe_loss
from llmtrain.engine.model import (
    count_parameters,
    frozen_kinds,
    param_specs,
    total_parameters,
    weight_bytes,
)
from llmtrain.engine.optim import effective_lr, optimizer_state_bytes, resolve_warmup
from llmtrain.engine.placement import Placement, place, table_rows
from llmtrain.pipeline import Plan, fit
from llmtrain.probe.memory import fmt_bytes


def trainable_text(plan: Plan) -> str:
    """Trainable against total parameters, and the PEFT method when one is set."""
    trainable, total = count_parameters(plan.model), total_parameters(plan.model)
    text = f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M ({100 * trainable / max(total, 1):.2f}%)"
    p = plan.cfg.model.peft
    if p is None:
        return text
    rank = f" r={p.r}" if "r" in METHODS[p.method][1] else ""
    return text + f", {p.method}{rank} on {p.target_modules}"


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def weights_text(plan: Plan) -> str:
    """The bytes of the weights as stored, trainable (master dtype) and frozen (their kinds)."""
    trainable, frozen = weight_bytes(plan.model)
    master = "fp64" if plan.cfg.train.precision == "fp64" else "fp32"
    text = f"{_mib(trainable)} trainable ({master})"
    if frozen:
        text += f" + {_mib(frozen)} frozen ({', '.join(frozen_kinds(plan.model))})"
    return text


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
    t = cfg.train
    rows = [
        ("run", f"{cfg.run.name} → {cfg.run.output_dir}"),
        (
            "model",
            f"{cfg.model.arch or cfg.model.pretrained} ({cfg.model.task}), "
            f"{total_parameters(plan.model) / 1e6:.2f}M parameters",
        ),
        ("trainable", trainable_text(plan)),
        ("weights", weights_text(plan)),
        ("device", device),
        *parallel_rows(plan),
        *host_rows(plan),
        ("precision", cfg.train.precision),
        (
            "batch",
            f"micro {micro} × k {k} × world {dist.world_size} → global {global_batch} sequences",
        ),
        ("tokens / step", f"≤ {global_batch * seq:,} (seq_len {seq}, {cfg.data.chunk.mode})"),
        ("data", f"{plan.n_train:,} train sequences{per_epoch_of(plan)}, {per_epoch} steps/epoch"),
        ("steps", f"{steps:,} ({cfg.optim.schedule}, {_warmup_text(cfg, steps)})"),
        ("effective LR", lr_text),
        ("optimizer", optimizer_text(cfg, plan.model)),
        (
            "loss",
            describe_loss(
                t.loss_chunk, plan.model, cfg.model.task, t.precision, t.loss_normalization
            ),
        ),
        *adalora_rows(cfg, steps),
    ]
    table = Table(title="llmtrain fit", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def optimizer_text(cfg: Config, model) -> str:
    """The optimizer and its state's bytes for the whole model (an estimate from the kind and
    the trainable parameters: engine.optim.optimizer_state_bytes); under fsdp each rank holds
    a shard of it (the per-rank table)."""
    o = cfg.optim
    est = optimizer_state_bytes(o.name, model, o.momentum)
    text = f"{o.name}, state ≈ {fmt_bytes(est)} (estimated from the trainable parameters"
    return text + (", sharded over ranks)" if cfg.train.parallel == "fsdp" else ")")


# ---------------------------------------------------------------- several ranks (torchrun)
def parallel_rows(plan: Plan) -> list[tuple[str, str]]:
    """'world 4 = 2 nodes × 2 per node, fsdp (...)' when the job has several ranks."""
    d = plan.dist
    if not d.enabled:
        return []
    if d.nodes * d.per_node == d.world_size:
        nodes = f"{d.nodes} node{'s' if d.nodes > 1 else ''} × {d.per_node} per node"
    else:  # nodes started with different --nproc-per-node
        nodes = f"{d.nodes} nodes, {d.per_node} on rank 0's node"
    wrapper = {"ddp": "ddp (replicated)", "fsdp": "fsdp (FSDP2, sharded)"}
    return [("parallel", f"world {d.world_size} = {nodes}, {wrapper[plan.cfg.train.parallel]}")]


def placement_of(plan: Plan) -> Placement:
    """Every rank's weights, gradients and optimizer state under `train.parallel`, computed
    from the unwrapped model (engine/placement.py): the dry run shows it before wrapping."""
    o, d = plan.cfg.optim, plan.dist
    return place(param_specs(plan.model), d.world_size, plan.cfg.train.parallel, o.name, o.momentum)


def rank_table(placement: Placement) -> Table:
    """Bytes per rank: each rank, or each column's minimum and maximum for many ranks."""
    table = Table(title=f"per rank (world {placement.world})", title_justify="left")
    for col in ("rank", "weights", "gradients", "optimizer state", "total"):
        table.add_column(col, justify="left" if col == "rank" else "right")
    rows = table_rows(placement)
    if len(rows) < placement.world:
        table.caption = f"each column's minimum and maximum over the {placement.world} ranks"
    for label, b in rows:
        table.add_row(label, *map(fmt_bytes, (b.weights, b.gradients, b.optimizer, b.total)))
    return table


def sharding_text(placement: Placement, k: int) -> str:
    """What each rank holds of which parameters, and what the table leaves out."""
    n, world = placement.tensors, placement.world
    if not placement.sharded:
        return (
            f"replicated: every rank holds all {n} tensors ({placement.wrapper}); gradients "
            "count DDP's all-reduce buckets, a second copy"
        )
    text = f"sharded: all {n} tensors (dim 0) over {world} ranks"
    if placement.frozen:
        text += f", the {placement.frozen} frozen ones too"
    if placement.uneven:
        text += (
            f"; {len(placement.uneven)} with dim 0 not a multiple of {world}: each rank "
            f"allocates ceil(dim 0 / {world}) rows, the last ranks' optimizer state is smaller"
        )
    if k > 1:  # set_requires_gradient_sync(False) keeps FSDP2's unsharded gradients
        text += (
            f"\nk = {k}: a window's gradients accumulate unsharded until its last micro-batch "
            f"reduce-scatters them: {fmt_bytes(placement.full_gradients)} per rank meanwhile"
        )
    return text


def placement_view(plan: Plan) -> list[RenderableType]:
    """The per-rank table and the sharding line, for a job of several ranks."""
    if not plan.dist.enabled:
        return []
    placement = placement_of(plan)
    k = grad_accum(plan.cfg.batch.global_batch, plan.micro, plan.dist.world_size)
    return [rank_table(placement), sharding_text(placement, k)]


def adalora_rows(cfg: Config, steps: int) -> list[tuple[str, str]]:
    """AdaLoRA's schedule, with total_step resolved from the run (engine/adalora.py)."""
    p = cfg.model.peft
    if p is None or p.method != "adalora":
        return []
    text = (
        f"rank {p.init_r} → {p.target_r} per matrix, total_step {steps} (tinit {p.tinit}, "
        f"tfinal {p.tfinal}, every {p.delta_t} steps), orth_reg_weight {p.orth_reg_weight:g}"
    )
    return [("adalora", text)]


def per_epoch_of(plan: Plan) -> str:
    """' per epoch from 2 sources' for a mixture (its table follows the banner)."""
    m = plan.mixture
    return "" if m is None else f" per epoch from {len(m.names)} sources"


def mixture_table(mixture: Mixture) -> Table:
    """A mixture per source: sequences held, weight, drawn per epoch (its share of the
    epoch), and repeats: draws beyond what it holds (up-sampling)."""
    table = Table(title="data.train mixture (per epoch)", title_justify="left")
    for col in ("source", "held", "weight", "drawn", "share", "repeats"):
        table.add_column(col, justify="left" if col == "source" else "right")
    counts, size = mixture.counts, mixture.epoch_size
    for name, held, w, drawn, extra in zip(
        mixture.names, mixture.sizes, mixture.weights, counts, mixture.repeats, strict=True
    ):
        table.add_row(
            name,
            f"{held:,}",
            f"{w:g}",
            f"{drawn:,}",
            f"{100 * drawn / max(size, 1):.1f}%",
            f"{extra:,} (×{drawn / held:.2f})" if extra else "0",
        )
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
        for part in placement_view(plan):
            console.print(part)
        if plan.mixture is not None:
            console.print(mixture_table(plan.mixture))
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
