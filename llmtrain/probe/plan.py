"""The probe for a config: what `fit` (micro_batch: auto) and `probe-batch` call
(docs/architecture.md, "Probing").

The only probe module that reads a Config: it turns one into a TrialSetup and a memory
backend, consults the cache, and makes every rank take the same branch.
"""

from __future__ import annotations

import torch

from llmtrain.config import Config, parse_bytes
from llmtrain.console import err_console
from llmtrain.data.batching import grad_accum
from llmtrain.engine.distributed import DistInfo, all_reduce_min
from llmtrain.engine.loss import resolve_loss_chunk, show_notice
from llmtrain.engine.optim import build_optimizer
from llmtrain.engine.step import StepSpec, offloads
from llmtrain.errors import LLMTrainError
from llmtrain.probe.cache import cache_key, load_cached, store_cached
from llmtrain.probe.memory import backend_for
from llmtrain.probe.result import MicroBatchPlan, ProbeResult
from llmtrain.probe.search import probe_micro_batch
from llmtrain.probe.trial import TrialSetup


def memory_limit(cfg: Config) -> int | None:
    """`batch.probe.memory_limit` in bytes; None when unset (the device's own capacity)."""
    limit = cfg.batch.probe.memory_limit
    if limit is None:
        return None
    try:
        return parse_bytes(limit)
    except ValueError as e:
        raise LLMTrainError(f"batch.probe.memory_limit: {e} (got {limit!r})") from e


def setup_from_config(
    cfg: Config,
    model: torch.nn.Module,
    device: torch.device,
    *,
    rank: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrialSetup:
    """A TrialSetup that trains exactly as `fit` would: the run's optimizer factory, precision,
    loss normalization, (chunked) loss, clipping and seq_len. The CPU snapshot of the live
    state goes to the run's output directory (a disk, not a tmpfs that would hold it in RAM)."""
    loss_chunk = resolve_loss_chunk(cfg.train.loss_chunk, model, cfg.model.task)
    show_notice(loss_chunk)
    return TrialSetup(
        model=model,
        make_optimizer=lambda m: build_optimizer(cfg, m),
        seq_len=cfg.data.chunk.seq_len,
        device=device,
        spec=StepSpec.from_config(cfg, loss_chunk.tokens, device),
        optimizer=optimizer,
        rank=rank,
        seed=cfg.run.seed,
        scratch_dir=cfg.run.output_dir,
    )


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
    limit = memory_limit(cfg)
    key = cache_key(cfg, model, device, dist.world_size, memory_limit=limit)
    # the loss changes the memory; "live": trials on the live model (no shadow copy to discount)
    key.update(
        loss_chunk=cfg.train.loss_chunk, trial="live", activation_offload=offloads(cfg, device)
    )
    cached = load_cached(cfg, key) if use_cache else None
    # all ranks must take the same branch, or some would wait in the probe's collective
    hit = all_reduce_min(torch.tensor([int(cached is not None)], device=device))
    if cached is not None and int(hit.item()) == 1:
        return cached
    setup = setup_from_config(cfg, model, device, rank=dist.rank, optimizer=optimizer)
    result = probe_micro_batch(
        setup,
        backend_for(device, limit),
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
        return MicroBatchPlan(micro, grad_accum(b.global_batch, micro, world), None)
    result = probe_for_config(cfg, model, device, dist=dist, use_cache=b.probe.cache)
    if dist.is_main:
        source = "cached probe" if result.cached else f"probed in {result.seconds:.1f}s"
        err_console.print(
            f"micro_batch auto → [bold]{result.micro_batch}[/] ({source}), "
            f"grad_accum {result.grad_accum}, global batch {b.global_batch}"
            + (f" over {world} ranks" if world > 1 else "")
        )
    return MicroBatchPlan(result.micro_batch, result.grad_accum, result)
