"""`llmtrain fit`, stage by stage (docs/architecture.md, "Pipeline"):

    tokenizer → token stores → model → micro-batch → train → run directory

Each stage is a plain function in llmtrain.data, llmtrain.probe and llmtrain.engine; this
module only puts them in order and handles the process group under torchrun. What a person
sees of the plan is the caller's business (`on_plan`: llmtrain.commands.fit prints a banner).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmtrain.config import Config, dump_config
from llmtrain.console import console as default_console
from llmtrain.data.store_cache import ensure_stores
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.engine.distributed import DistInfo, barrier, resolve_device, setup, teardown
from llmtrain.engine.loop import TrainResult, find_start, is_isolated, train
from llmtrain.engine.model import build_model, check_document_isolation
from llmtrain.errors import LLMTrainError
from llmtrain.probe.plan import resolve_micro_batch
from llmtrain.util.atomic import atomic_write


@dataclass
class Plan:
    """What `fit` resolved before training: shown by `on_plan`, then trained."""

    cfg: Config
    model: torch.nn.Module
    device: torch.device
    micro: int
    n_train: int
    dist: DistInfo


def resolve_micro(cfg: Config, model: Any, device: Any, dist: DistInfo) -> int:
    """The micro-batch: the configured integer, or the probe's measured answer for `auto`.
    Never more than this rank's largest share of a window (extra room would be unused)."""
    per_rank = math.ceil(cfg.batch.global_batch / dist.world_size)
    micro = int(resolve_micro_batch(cfg, model, device=device, dist=dist))
    return max(1, min(micro, per_rank))


def write_resolved_config(cfg: Config, out: Path) -> None:
    """<output_dir>/config.resolved.yaml: the config exactly as this run used it."""
    atomic_write(out / "config.resolved.yaml", dump_config(cfg))


def prepare(cfg: Config, dist: DistInfo, device: torch.device) -> tuple[Any, Any, Any, Plan]:
    """Tokenizer, token stores, model and micro-batch. Rank 0 trains the tokenizer and builds
    the stores while the other ranks wait, then they open what it wrote."""
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
    micro = resolve_micro(cfg, model, device, dist)
    plan = Plan(cfg, model, device, micro, len(train_store), dist)
    return tokenizer, train_store, eval_store, plan


def fit(
    cfg: Config,
    *,
    resume: str | None = None,
    dry_run: bool = False,
    console: Console | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> TrainResult | None:
    """Run every stage of `fit`; returns the TrainResult (None for a dry run)."""
    console = console or default_console
    out = Path(cfg.run.output_dir)
    if resume is None and not dry_run:
        find_start(out, None)  # refuse an earlier run's directory before any work is done
    device = resolve_device(cfg.run.device)
    dist = setup(device)
    if dist.enabled:
        device = resolve_device(cfg.run.device, dist.local_rank)
    try:
        tokenizer, train_store, eval_store, plan = prepare(cfg, dist, device)
        if dist.is_main and on_plan is not None:
            on_plan(plan)
        if dry_run:
            return None
        if dist.is_main:
            write_resolved_config(cfg, out)
        result = train(
            cfg,
            plan.model,
            tokenizer,
            train_store,
            eval_store,
            micro_batch=plan.micro,
            device=device,
            dist=dist,
            resume=resume,
            console=console,
        )
    finally:
        teardown()
    return result
