"""`llmtrain fit`, stage by stage (docs/architecture.md, "Pipeline"):

    tokenizer → token stores → model → micro-batch → train → run directory

Each stage is a plain function in llmtrain.data, llmtrain.probe and llmtrain.engine; this
module only puts them in order and handles the process group under torchrun. What a person
sees of the plan is the caller's business (`on_plan`: llmtrain.commands.fit prints a banner).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmtrain import host, layout
from llmtrain.config import Config, dump_config
from llmtrain.console import console as default_console
from llmtrain.console import is_rank_zero, say
from llmtrain.data.batching import total_steps
from llmtrain.data.mixture import Mixture, open_mixture
from llmtrain.data.store_cache import ensure_stores
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.engine.checkpoint import check_total
from llmtrain.engine.distributed import DistInfo, barrier, resolve_device, setup, teardown
from llmtrain.engine.loop import TrainResult, find_start, train
from llmtrain.engine.model import build_model, check_document_isolation, model_device
from llmtrain.engine.signals import sigterm_guard
from llmtrain.errors import LLMTrainError
from llmtrain.host import allocator, threads
from llmtrain.probe.plan import resolve_micro_batch
from llmtrain.rundir import data_record
from llmtrain.rundir.outputs import check_corpus_outside_run
from llmtrain.rundir.provenance import Resume, check_resume, claim_run_dir, clear_run
from llmtrain.rundir.shared_fs import check_shared_run_dir
from llmtrain.util.atomic import atomic_write, remove_stale_temps
from llmtrain.util.locks import hold_run_dir


@dataclass
class Plan:
    """What `fit` resolved before training: shown by `on_plan`, then trained."""

    cfg: Config
    model: torch.nn.Module
    device: torch.device
    micro: int
    n_train: int  # sequences per epoch
    dist: DistInfo
    threads: threads.Threads | None = None  # intra-op threads set for the run (and why)
    allocator: allocator.Policy | None = None  # the CPU allocator policy applied
    mixture: Mixture | None = None  # data.train as a list of sources: what an epoch draws
    stores: dict[str, Any] = field(default_factory=dict)  # every split's store, by split


def resolve_micro(cfg: Config, model: Any, device: Any, dist: DistInfo) -> int:
    """The micro-batch: the configured integer, or the probe's measured answer for `auto`.
    Never more than this rank's largest share of a window (extra room would be unused)."""
    per_rank = math.ceil(cfg.batch.global_batch / dist.world_size)
    micro = int(resolve_micro_batch(cfg, model, device=device, dist=dist))
    return max(1, min(micro, per_rank))


def write_resolved_config(cfg: Config, out: Path) -> None:
    """<output_dir>/config.resolved.yaml: the config exactly as this run used it."""
    atomic_write(out / layout.CONFIG_FILE, dump_config(cfg))


def train_data(cfg: Config, stores: dict[str, Any]) -> tuple[Any, Mixture | None]:
    """The training store, and for a mixture how an epoch draws from its sources' stores
    (data/mixture.py); (store/train, None) for a single source."""
    parts = cfg.data.train_parts
    if not cfg.data.is_mixture:
        return stores[parts[0].store], None
    return open_mixture(
        [p.name or p.store for p in parts],
        [stores[p.store] for p in parts],
        [getattr(p.source, "weight", None) for p in parts],
    )


def prepare(cfg: Config, dist: DistInfo, device: torch.device) -> tuple[Any, Any, Any, Plan]:
    """Tokenizer, token stores, model and micro-batch. Rank 0 trains the tokenizer and builds
    the stores while the other ranks wait, then they open what it wrote. Threads and the CPU
    allocator policy are set first: the probe measures what training will run with."""
    host_threads, policy = host.apply(cfg.run)
    if not dist.is_main:
        barrier()
    tokenizer = load_tokenizer(cfg)
    report = ensure_stores(cfg, tokenizer, progress=dist.is_main and cfg.log.progress)
    if dist.is_main:
        barrier()
    train_store, mixture = train_data(cfg, report.stores)
    eval_store = {split: s for split, s in report.stores.items() if split.startswith("eval")}
    label_names = train_store.label_names
    if cfg.model.task == "sequence-classification" and label_names is None:
        field = cfg.data.train_parts[0].source.label_field
        raise LLMTrainError(
            f"data.train: no labels in the corpus (label_field {field!r});"
            " sequence-classification needs one label per document"
        )
    num_labels = cfg.model.num_labels or (len(label_names) if label_names else None)
    with allocator.loading():  # loading's transient copies are handed back as they are freed
        model = build_model(cfg, tokenizer, num_labels, label_names, device)
    if cfg.data.is_isolated:
        check_document_isolation(model, model_device(model))
    micro = resolve_micro(cfg, model, device, dist)
    n = mixture.epoch_size if mixture is not None else len(train_store)
    plan = Plan(cfg, model, device, micro, n, dist, host_threads, policy, mixture, report.stores)
    return tokenizer, train_store, eval_store, plan


def fit(
    cfg: Config,
    *,
    resume: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    accept_data_change: bool = False,
    console: Console | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> TrainResult | None:
    """Run every stage of `fit` as the run directory's one writer (util/locks.py: rank 0
    holds it for the job; under torchrun every rank first joins the job and checks that it
    sees the run directory, `join`), SIGTERM handled (engine/signals.py), in a run directory
    of its own (claim_run_dir); `overwrite` first removes the outputs of an earlier run
    (rundir/provenance.py). `accept_data_change`: resume although the data changed
    (rundir/data_record.py). Returns the TrainResult (None for a dry run)."""
    out = Path(cfg.run.output_dir)
    main = is_rank_zero()
    caller_threads = torch.get_num_threads()  # the run sets its own (host/threads.py)
    try:
        with sigterm_guard():
            join(cfg)  # every rank sees the run directory, before any rank touches it
            if main:
                check_corpus_outside_run(cfg)  # before the lock creates the run directory
            with hold_run_dir(out, enabled=main, notice=say):
                if main:
                    claim_run_dir(out, write=not dry_run)
                if main and not dry_run:
                    sweep_run_dir(out)
                if overwrite and main and not dry_run:
                    for path in clear_run(out):
                        say(f"--overwrite: removed {path}")
                return run_stages(
                    cfg,
                    resume=resume,
                    dry_run=dry_run,
                    accept_data_change=accept_data_change,
                    console=console,
                    on_plan=on_plan,
                )
    finally:
        teardown()  # when a stage before run_stages failed (run_stages tears down its own)
        torch.set_num_threads(caller_threads)  # an in-process caller keeps its own setting


def join(cfg: Config) -> DistInfo:
    """Under torchrun: join the process group on this rank's own device (LOCAL_RANK: its GPU
    is current before NCCL's first collective), then check that every rank sees the run
    directory (rundir/shared_fs.py: on several machines it must be on a shared filesystem).
    A world of one otherwise, with nothing to check."""
    device = resolve_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = setup(device)
    check_shared_run_dir(cfg.run.output_dir, dist)
    return dist


def sweep_run_dir(out: Path) -> None:
    """What a killed run left in the run root and in checkpoints/ (`.tmp-*`/`.old-*` of a
    dead pid: a half-written final/, metrics.jsonl or checkpoint); the store's own are swept
    where the stores are opened."""
    swept = remove_stale_temps(out) + remove_stale_temps(out / layout.CHECKPOINTS_DIR)
    if swept:
        say(f"removed what a killed run left: {', '.join(str(p) for p in swept)}")


def check_data(
    cfg: Config, resumed: Resume | None, accept: bool, stores: dict[str, Any] | None = None
) -> dict[str, list[Any]]:
    """A resume's data against the run's record (rundir/data_record.py): the corpora before
    the stores are built, the stores (`stores`) once open. Returns the accepted changes."""
    if resumed is None:
        return {}
    run_dir = resumed.checkpoint.parent.parent
    recorded = data_record.read_record(run_dir)
    if recorded is None and stores is None:
        say(
            f"warning: {data_record.record_path(run_dir)} is missing (a run of an older "
            "llmtrain); the data cannot be compared with the run's"
        )
    now = data_record.store_record(stores) if stores else data_record.corpus_record(cfg)
    changed = data_record.compare_data(recorded, now, run_dir, accept)
    if changed:
        flag = data_record.ACCEPT_FLAG
        say(f"warning: resuming on changed data ({', '.join(changed)}), as {flag} asks")
    return changed


def check_provenance(cfg: Config, resume: str | None, console: Console) -> Resume | None:
    """Before any work: may this config continue the run (rundir/provenance.py)? The safe
    changes are shown here and recorded in metrics.jsonl by the loop."""
    if resume is None:
        return None
    found = check_resume(cfg, Path(cfg.run.output_dir), resume, say)
    if found is not None and found.changes:
        shown = "; ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in found.changes.items())
        say(f"resuming with changed settings (allowed: {shown})", out=console)
    return found


def run_stages(
    cfg: Config,
    *,
    resume: str | None = None,
    dry_run: bool = False,
    accept_data_change: bool = False,
    console: Console | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> TrainResult | None:
    """tokenizer → stores → model → micro-batch → train; returns the TrainResult."""
    console = console or default_console
    out = Path(cfg.run.output_dir)
    main = is_rank_zero()
    if resume is None and not dry_run and main:
        find_start(out, None)  # refuse an earlier run's directory before any work is done
    resumed = check_provenance(cfg, resume, console)  # before a store is rebuilt
    data_changes = check_data(cfg, resumed, accept_data_change)
    device = resolve_device(cfg.run.device)
    dist = setup(device)
    if dist.enabled:
        device = resolve_device(cfg.run.device, dist.local_rank)
    try:
        tokenizer, train_store, eval_store, plan = prepare(cfg, dist, device)
        data_changes |= check_data(cfg, resumed, accept_data_change, plan.stores)
        if dist.is_main and on_plan is not None:
            on_plan(plan)
        if resumed is not None:
            b, t = cfg.batch, cfg.train
            total = total_steps(plan.n_train, b.global_batch, t.max_steps, t.epochs)
            check_total(total, resumed.step, resumed.checkpoint)
        if dry_run:
            return None
        if dist.is_main:
            write_resolved_config(cfg, out)
            record = {**data_record.corpus_record(cfg), **data_record.store_record(plan.stores)}
            data_record.write_record(out, record)
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
            changes=resumed.changes if resumed is not None else None,
            mixture=plan.mixture,
            data_changes=data_changes,
        )
    finally:
        teardown()
    return result
