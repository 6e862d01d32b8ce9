"""Optimizer, parameter groups and the learning-rate schedule (counted in optimizer steps).

The schedule is a closed-form function of the optimizer step, so resuming needs only the step
number and the logged LR can be checked against the formula at every step.
"""

from __future__ import annotations

import math

import torch

from llmtrain.config import Config, OptimConfig
from llmtrain.engine.quantize import import_bitsandbytes
from llmtrain.errors import LLMTrainError

# The default warmup (optim.warmup_steps: null) as a share of the run: long enough to settle
# Adam's moment estimates, short enough that a 20-step run still reaches its peak LR.
WARMUP_FRACTION = 0.05


def resolve_warmup(optim: OptimConfig, total: int) -> int:
    """The warmup the schedule uses: the configured steps, or (null) ceil(5% of `total`).

    An explicit warmup longer than the run is an error whatever set the length (the config
    rule sees only train.max_steps; with train.epochs the length is known here).
    """
    if optim.warmup_steps is None:
        return math.ceil(WARMUP_FRACTION * total)
    if optim.warmup_steps > total:
        raise LLMTrainError(
            f"optim.warmup_steps: {optim.warmup_steps} is longer than the run's {total} "
            f"optimizer steps, so the LR would never reach its peak; set at most {total}, or "
            "null for 5% of the run"
        )
    return optim.warmup_steps


def effective_lr(optim: OptimConfig, global_batch: int) -> float:
    """Peak LR after `lr_scaling`: lr × f(global_batch / base_batch), f = 1 | x | sqrt(x)."""
    if optim.lr_scaling == "none":
        return optim.lr
    assert optim.base_batch is not None  # the lr_scaling rule requires it
    ratio = global_batch / optim.base_batch
    return optim.lr * (ratio if optim.lr_scaling == "linear" else math.sqrt(ratio))


def lr_at(
    step: int,
    *,
    peak: float,
    total: int,
    warmup: int,
    schedule: str,
    min_lr_ratio: float,
) -> float:
    """LR used by optimizer step `step` (0-based).

    Warmup: peak × (step+1)/warmup for step < warmup (the first update is not wasted at 0).
    Then constant, or linear/cosine decay from peak at step `warmup` to min_lr_ratio × peak at
    the last step (`total - 1`).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    floor = peak * min_lr_ratio
    span = total - 1 - warmup
    progress = min(1.0, (step - warmup) / span) if span > 0 else 1.0
    if schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr_ratio: float | None = None
) -> list[dict]:
    """Decay matrices only: biases, norm weights and other 1-D parameters are not decayed
    (GPT-2/nanoGPT practice); tied weights appear once (named_parameters deduplicates).
    `lr_ratio` (LoRA+, Hayou et al. 2024): the adapters' B matrices form their own group whose
    `lr_scale` makes `set_lr` give them ratio × the LR."""
    decay, no_decay, fast = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if lr_ratio is not None and is_lora_b(name):
            fast.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fast:
        groups.append({"params": fast, "weight_decay": weight_decay, "lr_scale": lr_ratio})
    return groups


def is_lora_b(name: str) -> bool:
    """A LoRA B matrix (the up-projection LoRA+ speeds up), by peft's parameter name."""
    return ".lora_B." in name or ".lora_embedding_B." in name


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over `param_groups`; the LR is set by the loop each step."""
    o = cfg.optim
    peft = cfg.model.peft
    groups = param_groups(model, o.weight_decay, peft.lr_ratio if peft is not None else None)
    lr = effective_lr(o, cfg.batch.global_batch)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
    if o.name.endswith("adamw8bit"):
        return _bnb_adamw8bit(o, groups, lr, model)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    # The fused kernel updates every tensor in one pass (CPU and CUDA): the per-tensor loop
    # costs ~5x more per step on CPU. Same math, so exactness between runs is unaffected.
    return cls(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, fused=_fused_ok(model))


def _bnb_adamw8bit(
    o: OptimConfig, groups: list[dict], lr: float, model: torch.nn.Module
) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit / PagedAdamW8bit. Tensors under MIN_8BIT_SIZE elements keep
    fp32 moments (bitsandbytes' rule: block-wise quantization gains nothing on them). Its
    state_dict is tensors and ints only, so checkpoints stay `weights_only` loadable."""
    paged = o.name == "paged_adamw8bit"
    if paged and not any(p.device.type == "cuda" for g in groups for p in g["params"]):
        raise LLMTrainError(
            "optim.name: paged_adamw8bit needs the model on CUDA (it pages optimizer state "
            "between GPU and host memory); use optim.name: adamw8bit on CPU"
        )
    bnb = import_bitsandbytes("optim.name: " + o.name)
    cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    return cls(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, min_8bit_size=MIN_8BIT_SIZE)


# bitsandbytes' default: smaller tensors keep 32-bit moments.
MIN_8BIT_SIZE = 4096
# bitsandbytes' block size for 8-bit optimizer state: one fp32 absmax per block per moment.
_BNB_BLOCK = 256


def optimizer_state_bytes(name: str, model: torch.nn.Module, momentum: float = 0.0) -> int:
    """An estimate of the optimizer's state over the model's trainable parameters (tied
    weights once): `state_bytes` of each."""
    return sum(
        state_bytes(name, p.numel(), p.element_size(), momentum)
        for p in model.parameters()
        if p.requires_grad
    )


def state_bytes(name: str, numel: int, element_size: int, momentum: float = 0.0) -> int:
    """The optimizer's state for one trainable tensor of `numel` elements (under FSDP: the
    rank's shard), from its kind: Adam(W) two moments in the parameter's dtype, adamw8bit one
    byte per moment plus one fp32 scale per 256-element block (fp32 under MIN_8BIT_SIZE), SGD a
    momentum buffer when momentum > 0. Step counters and quantization maps are left out."""
    if name == "sgd":
        return numel * element_size if momentum > 0 else 0
    if not name.endswith("adamw8bit"):  # adamw, adam
        return 2 * numel * element_size
    if numel >= MIN_8BIT_SIZE:
        return 2 * (numel + 4 * math.ceil(numel / _BNB_BLOCK))
    return 2 * numel * 4


def _fused_ok(model: torch.nn.Module) -> bool:
    """Fused Adam(W) needs floating-point parameters on CPU or CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR on every group, times the group's `lr_scale` (LoRA+'s B matrices)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
