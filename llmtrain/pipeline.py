"""`llmtrain fit`, stage by stage (the picture in DESIGN §1):

    tokenizer → token stores → model → micro-batch → train → run directory

Each stage is a plain function in llmtrain.stages / llmtrain.train; this module only puts
them in order, prints the plan, and handles the process group under torchrun.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from llmtrain.config import Config
from llmtrain.console import console as default_console
from llmtrain.data.batching import grad_accum, steps_per_epoch, total_steps
from llmtrain.errors import LLMTrainError
from llmtrain.stages.train import TrainResult, is_isolated, train
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.distributed import DistInfo, barrier, resolve_device, setup, teardown
from llmtrain.train.model import build_model, check_document_isolation, count_parameters
from llmtrain.train.optim import effective_lr


def resolve_micro(cfg: Config, model: Any, store: Any, device: Any, dist: DistInfo) -> int:
    """The micro-batch: the configured integer, or the probe's measured answer for `auto`.

    Never more than this rank's largest share of a window (extra room would be unused).
    """
    per_rank = math.ceil(cfg.batch.global_batch / dist.world_size)
    micro = cfg.batch.micro_batch
    if micro == "auto":
        try:
            from llmtrain.stages.probe import resolve_micro_batch
        except ImportError:
            raise LLMTrainError(
                "batch.micro_batch: auto needs the probe stage, which this build lacks; "
                "set batch.micro_batch to an integer"
            ) from None
        micro = int(resolve_micro_batch(cfg, model, device=device, dist=dist))
    return max(1, min(int(micro), per_rank))


def write_resolved_config(cfg: Config, out: Path) -> None:
    """<output_dir>/config.resolved.yaml: the config exactly as this run used it."""
    try:
        from llmtrain.config import dump_config

        text = dump_config(cfg)
    except ImportError:
        text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.resolved.yaml").write_text(text, encoding="utf-8")


def banner(
    cfg: Config, *, model: Any, device: Any, micro: int, n_train: int, dist: DistInfo
) -> Table:
    """The plan at a glance: what trains, where, with which batch and LR."""
    G = cfg.batch.global_batch
    k = grad_accum(G, micro, dist.world_size)
    steps = total_steps(n_train, G, cfg.train.max_steps, cfg.train.epochs)
    seq = cfg.data.chunk.seq_len
    lr = effective_lr(cfg.optim, G)
    lr_text = f"{lr:.3g}"
    if cfg.optim.lr_scaling != "none":
        lr_text += (
            f" ({cfg.optim.lr:.3g} × {cfg.optim.lr_scaling}({G}/{cfg.optim.base_batch or G}))"
        )
    rows = [
        ("run", f"{cfg.run.name} → {cfg.run.output_dir}"),
        (
            "model",
            f"{cfg.model.arch or cfg.model.pretrained} ({cfg.model.task}), "
            f"{count_parameters(model) / 1e6:.2f}M parameters",
        ),
        ("device", f"{device} × {dist.world_size}" if dist.enabled else str(device)),
        ("precision", cfg.train.precision),
        ("batch", f"micro {micro} × k {k} × world {dist.world_size} → global {G} sequences"),
        ("tokens / step", f"≤ {G * seq:,} (seq_len {seq}, {cfg.data.chunk.mode})"),
        ("data", f"{n_train:,} train sequences, {steps_per_epoch(n_train, G)} steps/epoch"),
        ("steps", f"{steps:,} ({cfg.optim.schedule}, warmup {cfg.optim.warmup_steps})"),
        ("effective LR", lr_text),
    ]
    table = Table(title="llmtrain fit", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def fit(
    cfg: Config,
    *,
    resume: str | None = None,
    dry_run: bool = False,
    console: Console | None = None,
) -> TrainResult | None:
    """Run every stage of `fit`; returns the TrainResult (None for a dry run)."""
    console = console or default_console
    from llmtrain.stages.chunk import ensure_stores
    from llmtrain.stages.tokenize import load_tokenizer

    out = Path(cfg.run.output_dir)
    if resume is None and not dry_run and ckpt.list_checkpoints(ckpt.checkpoint_dir(out)):
        raise LLMTrainError(
            f"{ckpt.checkpoint_dir(out)}: holds checkpoints of an earlier run; continue it with "
            "--resume auto, or choose a new run.output_dir"
        )
    device = resolve_device(cfg.run.device)
    dist = setup(device)
    if dist.enabled:
        device = resolve_device(cfg.run.device, dist.local_rank)
    try:
        # Rank 0 trains the tokenizer and builds the stores; the others wait, then reuse them.
        if not dist.is_main:
            barrier()
        tokenizer = load_tokenizer(cfg)
        report = ensure_stores(cfg, tokenizer, progress=dist.is_main and cfg.log.progress)
        if dist.is_main:
            barrier()
        train_store, eval_store = report.stores["train"], report.stores.get("eval")
        label_names = train_store.label_names
        if cfg.model.task == "sequence-classification" and label_names is None:
            raise LLMTrainError(
                f"data.train: no labels in the corpus (label_field {cfg.data.train.label_field!r});"
                " sequence-classification needs one label per document"
            )
        num_labels = cfg.model.num_labels or (len(label_names) if label_names else None)
        model = build_model(cfg, tokenizer, num_labels, label_names)
        if is_isolated(cfg):
            check_document_isolation(model, torch.device("cpu"))
        micro = resolve_micro(cfg, model, train_store, device, dist)
        if dist.is_main:
            console.print(
                banner(
                    cfg,
                    model=model,
                    device=device,
                    micro=micro,
                    n_train=len(train_store),
                    dist=dist,
                )
            )
        if dry_run:
            if dist.is_main:
                console.print(
                    "dry run: tokenizer, stores, model and micro-batch resolved; not training"
                )
            return None
        if dist.is_main:
            write_resolved_config(cfg, out)
        result = train(
            cfg,
            model,
            tokenizer,
            train_store,
            eval_store,
            micro_batch=micro,
            device=device,
            dist=dist,
            resume=resume,
            console=console,
        )
    finally:
        teardown()
    if dist.is_main:
        console.print(f"done: step {result.step}, final model in {result.final_dir}")
    return result


def cli_fit(cfg: Config, *, resume: str | None, dry_run: bool) -> None:
    """Entry point of `llmtrain fit` (called by llmtrain.cli after validation)."""
    fit(cfg, resume=resume, dry_run=dry_run)
