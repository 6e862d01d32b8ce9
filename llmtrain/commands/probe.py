"""`llmtrain probe-batch`: build the run's model, measure (or reuse this setup's entry of
probe-cache.json, as `fit` does, unless --force or batch.probe.cache: false), print a table (or
one JSON object on stdout), and refresh the cache entry `fit` will reuse
(docs/architecture.md, "Probing")."""

from __future__ import annotations

import json
import math
import os
import sys

from rich.console import Console
from rich.table import Table

from llmtrain import host
from llmtrain.config import Config
from llmtrain.console import human_console
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.engine.distributed import DistInfo, barrier, resolve_device, setup, teardown
from llmtrain.engine.model import build_model
from llmtrain.host import allocator
from llmtrain.probe.cache import cache_path
from llmtrain.probe.memory import fmt_bytes
from llmtrain.probe.plan import probe_for_config
from llmtrain.probe.result import ProbeResult
from llmtrain.probe.trial import PROBE_NUM_LABELS
from llmtrain.rundir.shared_fs import check_shared_run_dir


def render_table(result: ProbeResult) -> Table:
    """One row per trial, in the order the search ran them."""
    table = Table(title=f"probe-batch · {result.device} · seq_len {result.seq_len}")
    for col in ("micro", "result", "peak", "% capacity", "tokens/s", "seconds"):
        table.add_column(col, justify="right")
    for t in result.trials:
        verdict = "[green]ok[/]" if t.ok else "[red]OOM[/]"
        if t.predicted:  # not run: the measured peaks put it over the budget
            verdict = "[yellow]over (predicted)[/]"
        share = f"{100 * t.peak_bytes / result.capacity_bytes:.1f}%" if t.peak_bytes else "-"
        tps = f"{t.tokens_per_s:,.0f}" if t.tokens_per_s else "-"
        seconds = "-" if t.predicted else f"{t.seconds:.2f}"
        table.add_row(str(t.micro_batch), verdict, fmt_bytes(t.peak_bytes), share, tps, seconds)
    return table


def capped_by(cfg: Config, result: ProbeResult) -> str | None:
    """Which limit, not memory, set the answer: "global_batch" when the micro-batch is this
    rank's whole share of the global batch, "max_micro" when it is batch.probe.max_micro; the
    device may then hold more. None when memory decided."""
    share = math.ceil(result.global_batch / result.world_size)
    if result.micro_batch >= share:
        return "global_batch"
    if result.micro_batch >= (result.max_micro or cfg.batch.probe.max_micro):
        return "max_micro"
    return None


def _cap_line(cfg: Config, result: ProbeResult, cap: str) -> str:
    if cap == "global_batch":
        per_rank = f" / {result.world_size} ranks" if result.world_size > 1 else ""
        return (
            f"capped by batch.global_batch={result.global_batch}{per_rank}, not by memory: "
            "the device may fit more (raise batch.global_batch to probe higher)"
        )
    return (
        f"capped by batch.probe.max_micro={result.max_micro or cfg.batch.probe.max_micro}, "
        "not by memory: "
        "the device may fit more"
    )


def _measure(cfg: Config, use_cache: bool) -> tuple[DistInfo, ProbeResult]:
    """Build the model on this rank's device and probe it (or take this setup's cached
    result when `use_cache`)."""
    # under torchrun each rank probes its own GPU; setup() binds the process to it
    device = resolve_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))
    # as `fit` does before its probe (pipeline.prepare): the CPU peaks depend on both, and the
    # answer is for training with them (under `retain` the heap holds far more per sequence)
    host.apply(cfg.run)
    dist = setup(device)
    try:
        check_shared_run_dir(cfg.run.output_dir, dist)  # the tokenizer and cache live there
        # Rank 0 trains (or loads) the cached tokenizer first; the others then open it.
        if not dist.is_main:
            barrier()
        tokenizer = load_tokenizer(cfg)
        if dist.is_main:
            barrier()
        num_labels = None
        if cfg.model.task == "sequence-classification":
            num_labels = cfg.model.num_labels or PROBE_NUM_LABELS
        with allocator.loading():
            model = build_model(cfg, tokenizer, num_labels, device=device)
        return dist, probe_for_config(cfg, model, device, dist=dist, use_cache=use_cache)
    finally:
        teardown()


def _count(result: ProbeResult) -> str:
    """The trial count: "5 trials", or "4 trials and 1 predicted" when one was not run."""
    predicted = sum(t.predicted for t in result.trials)
    ran = f"{len(result.trials) - predicted} trials"
    return f"{ran} and {predicted} predicted" if predicted else ran


def _print_summary(out: Console, cfg: Config, result: ProbeResult) -> None:
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
    source = (
        f"cached result from {cache_path(cfg)}, measured earlier; --force measures again"
        if result.cached
        else f"{_count(result)}, {result.seconds:.1f}s; cached in {cache_path(cfg)}"
    )
    out.print(
        f"[bold]micro_batch {result.micro_batch}[/], grad_accum {result.grad_accum}, "
        f"global batch {result.global_batch}"
        + (f" over {result.world_size} ranks" if result.world_size > 1 else "")
        + f"  ({source})",
        highlight=False,
    )
    cap = capped_by(cfg, result)
    if cap is not None:
        out.print(_cap_line(cfg, result, cap), highlight=False)


def execute(cfg: Config, *, as_json: bool, force: bool = False) -> None:
    """`llmtrain probe-batch`: on rank 0, the table and summary — or, with --json, exactly
    one JSON object (ProbeResult.to_dict, plus `capped_by`) on stdout and nothing else there.
    A matching cache entry is shown instead of measuring unless `force`."""
    out = human_console(as_json)
    dist, result = _measure(cfg, use_cache=cfg.batch.probe.cache and not force)
    if not dist.is_main:
        return
    if as_json:
        payload = {**result.to_dict(), "capped_by": capped_by(cfg, result)}
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()
        return
    _print_summary(out, cfg, result)
