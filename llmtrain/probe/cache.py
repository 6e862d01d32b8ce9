"""The probe cache: `<run.output_dir>/probe-cache.json` (docs/architecture.md, "Probing").

One entry per setup key (a hash of the model's HF config, parameter count, the config's whole
`model` section, seq_len, precision, gradient checkpointing, optimizer, task, loss
normalization, parallel mode, device name and capacity setting, the CPU allocator policy, world
size, margin, cap, torch version). Kept in the run directory because it is visible, deleted
with the run, and never shared by runs that might differ in ways the key does not see.
`fit` with `micro_batch: auto` and `probe-batch` reuse a matching entry unless
`batch.probe.cache` is false (or `probe-batch --force`); a measurement refreshes the entry, so
a following `fit` reuses what was just shown.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from llmtrain import layout
from llmtrain.config import Config
from llmtrain.engine.parallel import unwrap
from llmtrain.host import allocator
from llmtrain.probe.memory import device_name, device_total_bytes
from llmtrain.probe.result import ProbeResult
from llmtrain.util.atomic import atomic_write

CACHE_FILE = layout.PROBE_CACHE_FILE
# 2: trials collate with document isolation (its mask costs memory); 3: the whole `model`
# section, the parallel mode and the CPU allocator are in the key
CACHE_VERSION = 3


def cache_key(
    cfg: Config,
    model: torch.nn.Module,
    device: torch.device,
    world_size: int,
    *,
    memory_limit: int | None,
) -> dict:
    """What a probe result depends on. Two setups with equal keys need the same memory.
    `memory_limit` is the parsed `batch.probe.memory_limit` (None: the device's own size)."""
    real = unwrap(model)
    hf = getattr(real, "config", None)
    hf_dict = hf.to_dict() if hf is not None else {}
    for noise in ("_name_or_path", "transformers_version", "id2label", "label2id"):
        hf_dict.pop(noise, None)
    b = cfg.batch
    return {
        "version": CACHE_VERSION,
        "model_class": type(real).__name__,
        "model_config": hf_dict,
        "parameters": sum(p.numel() for p in real.parameters()),
        "gradient_checkpointing": _checkpointing(real),
        # everything the model section says: attention implementation, compile, adapter
        # dropout, quantization, frozen dtype, ... each changes what a sequence costs
        "model_section": cfg.model.model_dump(mode="json"),
        "parallel": cfg.train.parallel,
        "seq_len": cfg.data.chunk.seq_len,
        "precision": cfg.train.precision,
        "optimizer": cfg.optim.name,
        "task": cfg.model.task,
        "loss_normalization": cfg.train.loss_normalization,
        "isolate_docs": cfg.data.is_isolated,
        "device": device_name(device),
        # on CPU the heap is part of the peak: a `system` measurement does not hold for `retain`
        "cpu_allocator": _allocator(device),
        "capacity": (
            memory_limit if memory_limit is not None else f"total:{device_total_bytes(device)}"
        ),
        "world_size": world_size,
        "margin": b.probe.margin,
        "cap": min(b.probe.max_micro, math.ceil(b.global_batch / world_size)),
        "torch": torch.__version__,
    }


def _allocator(device: torch.device) -> str | None:
    """The CPU allocator policy the trials run under (host/allocator.py); None off the CPU."""
    if device.type != "cpu":
        return None
    policy = allocator.current()
    return policy.describe() if policy is not None else "none applied"


def _checkpointing(model: torch.nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _key_hash(key: dict) -> str:
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_path(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged cache is only a cache: probe again and rewrite it
    return data.get("entries", {}) if isinstance(data, dict) else {}


def load_cached(cfg: Config, key: dict) -> ProbeResult | None:
    """The stored result for `key`, marked `cached`; None when there is none or it is damaged."""
    entry = _read_cache(cache_path(cfg)).get(_key_hash(key))
    if not entry:
        return None
    try:
        result = ProbeResult.from_dict(entry["result"])
    except (KeyError, TypeError):
        return None
    result.cached = True
    return result


def store_cached(cfg: Config, key: dict, result: ProbeResult) -> None:
    """Add or replace this setup's entry; the file is replaced whole (atomic_write)."""
    path = cache_path(cfg)
    entries = _read_cache(path)
    entries[_key_hash(key)] = {"key": key, "result": {**result.to_dict(), "cached": False}}
    text = json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, default=str)
    atomic_write(path, text)
