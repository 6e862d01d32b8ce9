"""Helpers for the PEFT tests: a tiny "pretrained" model saved to disk, configs that fine-tune
it with `model.peft`, and the adapter weights a run wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fit_helpers import FakeTokenizer, make_cfg
from safetensors.torch import load_file

from llmtrain.config import Config
from llmtrain.engine.model import build_model

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def save_base(root: Path, arch: str = "gpt2") -> Path:
    """A tiny model standing in for a pretrained one: gpt2 with its LM head, or a bare BERT
    encoder (like MiniLM, so a classification head is created fresh when it is loaded)."""
    task = "causal-lm" if arch == "gpt2" else "sequence-classification"
    model = build_model(make_cfg(root / "scratch", arch=arch, task=task), FakeTokenizer(), 3)
    path = root / f"base-{arch}"
    (model if arch == "gpt2" else model.bert).save_pretrained(path)
    return path


def peft_cfg(out: Path, base: Path, *, peft: dict[str, Any] | None = None, **kw: Any) -> Config:
    """`make_cfg` with `model.pretrained: base` and `model.peft` instead of arch/config."""
    arch = "gpt2" if "gpt2" in base.name else "bert"
    kw.setdefault("task", "causal-lm" if arch == "gpt2" else "sequence-classification")
    data = make_cfg(out, arch=arch, **kw).model_dump()
    data["model"].update(arch=None, config={}, pretrained=str(base), peft={**LORA, **(peft or {})})
    return Config.model_validate(data)


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    """The tensors of `<out>/adapter/adapter_model.safetensors`."""
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over every tensor, relative to max |a| (same key sets and shapes required;
    empty tensors, e.g. an AdaLoRA matrix pruned to rank 0, compare by shape alone)."""
    assert sorted(a) == sorted(b)
    assert all(a[k].shape == b[k].shape for k in a)
    keys = [k for k in a if a[k].numel()]
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)
    return diff / max(float(a[k].abs().max()) for k in keys)
