"""Data parallelism under torchrun: wrap the model, control gradient sync, and gather full
state for checkpoints — DDP or FSDP2, with the same calls for both (docs/architecture.md,
"Scale-out").

- `ddp`: `DistributedDataParallel` — every rank holds the whole model; gradients are averaged
  by an all-reduce in the backward of the last micro-batch of a window (`no_sync` before it).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer block (the model's
  `_no_split_modules`) and then the root — parameters, gradients and optimizer state are
  sharded (DTensors); gradient reduce-scatter is skipped inside the window with
  `set_requires_gradient_sync(False)`. Both average gradients over ranks, so the loop's
  `world / N` loss scale gives the exact global mean either way.

Checkpoints keep one format whatever the world size or wrapper: the full model in
`model.safetensors` (tied weights stored once, as `safetensors.torch.save_model` writes it)
and `optimizer.state_dict()`'s integer-keyed layout. Under FSDP the full state is gathered to
rank 0 (on CPU) with `torch.distributed.checkpoint.state_dict`, and a full state read from
disk is sharded back with the same module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from llmtrain.config import Config
from llmtrain.engine.distributed import DistInfo
from llmtrain.errors import LLMTrainError


def is_fsdp(model: torch.nn.Module) -> bool:
    """True for a module that `fully_shard` converted (FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(model, FSDPModule)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / torch.compile wrappers (FSDP2 converts in place, so
    an FSDP model is its own unwrapped model)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one: modules whose class transformers marks as
    `_no_split_modules` (GPT2Block, LlamaDecoderLayer, BertLayer ...). A peft model's blocks
    are its base's, adapters inside: each block's frozen weights and adapters shard together,
    so one all-gather per block serves both."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if m is not model and type(m).__name__ in names]


def wrap_model(
    model: torch.nn.Module, cfg: Config, dist: DistInfo, device: torch.device
) -> torch.nn.Module:
    """Move `model` to `device` and wrap it for `train.parallel` when the world is > 1.

    Build the optimizer *after* this call, on `unwrap(result)`: FSDP replaces the parameters
    with sharded DTensors.
    """
    model = model.to(device)
    if not dist.enabled:
        return model
    if cfg.train.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if cfg.train.precision == "fp16":
            raise LLMTrainError(
                "train.parallel: fsdp with train.precision: fp16 is not supported (the loss "
                "scaler would check for overflow per shard, and ranks could disagree); use bf16"
            )
        mesh = init_device_mesh(device.type, (dist.world_size,))  # the device actually used
        units = shard_units(model)
        if not units:
            raise LLMTrainError(
                f"train.parallel: fsdp needs the model's transformer blocks, but "
                f"{type(model).__name__} declares no _no_split_modules; use train.parallel: ddp"
            )
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, head (ties kept)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _ddp(model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper of `model` (also under torch.compile(DDP(model))), or None."""
    while hasattr(model, "_orig_mod"):
        model = model._orig_mod
    return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None


def reduces_in_backward(model: torch.nn.Module, last: bool) -> bool:
    """Whether this micro-batch's backward all-reduces gradients across ranks as it runs: the
    window's `last` one under DDP (bucket by bucket, overlapping the backward)."""
    return last and _ddp(model) is not None


@contextlib.contextmanager
def no_sync_context(model: torch.nn.Module, last: bool) -> Iterator[None]:
    """Around one micro-batch's forward+backward: gradients are reduced over ranks only on the
    window's `last` micro-batch; before it they just accumulate locally."""
    if last:
        yield
        return
    ddp = _ddp(model)
    if ddp is not None:
        with ddp.no_sync():
            yield
        return
    inner = unwrap(model)
    if is_fsdp(inner):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
        return
    yield  # a plain module: nothing is reduced anyway


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> float:
    """Clip the gradient to `max_norm` (None: only measure) and return the global norm.

    With FSDP the gradients are shards (DTensors): the norm torch computes from them is a
    DTensor whose `full_tensor()` is the norm over *all* shards, and the clip coefficient is
    applied with that global norm — the same value a single process computes.
    """
    params = [p for p in unwrap(model).parameters() if p.grad is not None]
    if not params:
        return 0.0
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


# ------------------------------------------------------------------------- full state I/O
def _full_options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def tied_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """kept name → the names sharing its tensor that `safetensors.torch.save_model` drops
    (e.g. GPT-2's transformer.wte.weight, tied to lm_head.weight). Found from parameter
    identity, which FSDP preserves (its DTensor shards have no shared storage to compare);
    the kept name is save_model's choice, the first in sorted order."""
    groups: dict[int, list[str]] = {}
    inner = unwrap(model)
    for name, p in inner.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for name, b in inner.named_buffers(remove_duplicate=False):
        groups.setdefault(id(b), []).append(name)
    tied = (sorted(names) for names in groups.values() if len(names) > 1)
    return {names[0]: names[1:] for names in tied}


def trainable_names(model: torch.nn.Module) -> set[str]:
    """The names of the parameters that train (a PEFT model's adapters and head)."""
    return {n for n, p in unwrap(model).named_parameters() if p.requires_grad}


def full_model_state(
    model: torch.nn.Module, drop_tied: bool = True, trainable_only: bool = False
) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU; with `drop_tied`, tied aliases dropped — exactly what
    `safetensors.torch.save_model` would store; with `trainable_only`, the trainable tensors
    alone (a PEFT checkpoint: the frozen base is never gathered). Under FSDP a collective:
    every rank must call it; rank 0 gets the weights, the others an empty dict."""
    inner = unwrap(model)
    if is_fsdp(inner):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        options = _full_options(cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(inner, options=options)
    else:
        state = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    if trainable_only:  # buffers too are left to the rebuilt base
        keep = trainable_names(inner)
        state = {k: v for k, v in state.items() if k in keep}
    if state and drop_tied:
        for group in tied_aliases(inner).values():
            for alias in group:
                state.pop(alias, None)
    return {k: v.contiguous() for k, v in state.items()}


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the order `optimizer.state_dict()` numbers them (0, 1, ...)."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` of the whole model (integer-keyed, as one process writes it).
    Under FSDP a collective that gathers the sharded state to rank 0 (others get {})."""
    inner = unwrap(model)
    if not is_fsdp(inner):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(inner, optimizer, options=_full_options(cpu_offload=True))
    if not full:
        return {}
    ids = {name: i for i, name in enumerate(_param_names(inner, optimizer))}
    groups = [{**g, "params": [ids[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {ids[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    trainable_only: bool = False,
) -> None:
    """Load a full (checkpoint-format) state into an FSDP model and its optimizer; every rank
    passes the same full state and keeps its own shard. Plain/DDP models: load_state_dict.
    `trainable_only`: the state holds the trainable tensors alone (a PEFT checkpoint, whose
    names the caller checked); the frozen base stays as built. Otherwise loading is strict."""
    inner = unwrap(model)
    state = dict(model_state)
    for kept, group in tied_aliases(inner).items():
        for alias in group:
            if kept in state:
                state.setdefault(alias, state[kept])
    if not is_fsdp(inner):
        inner.load_state_dict(state, strict=not trainable_only)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(inner, state, options=_full_options(strict=not trainable_only))
    if optimizer is None or optimizer_state is None:
        return
    names = _param_names(inner, optimizer)
    by_name = {
        "state": {names[i]: s for i, s in optimizer_state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]}
            for g in optimizer_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(inner, optimizer, by_name, options=_full_options())


def original_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2 swaps in a subclass (FSDP<Name>) that must not reach a
    saved config.json's `architectures`."""
    cls = type(unwrap(model))
    if is_fsdp(model):
        from torch.distributed.fsdp import FSDPModule

        return next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


def save_pretrained_full(
    model: torch.nn.Module, path: Any, state: dict[str, torch.Tensor] | None = None
) -> None:
    """`save_pretrained` of the unwrapped model; under FSDP with the gathered full `state`
    (from `full_model_state(model, drop_tied=False)`), and the original class name."""
    inner = unwrap(model)
    if state is None:
        inner.save_pretrained(path)
        return
    inner.save_pretrained(path, state_dict=state)
    inner.config.architectures = [original_class(inner).__name__]
    inner.config.save_pretrained(path)
