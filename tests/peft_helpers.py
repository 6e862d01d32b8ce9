"""Helpers for the PEFT tests: a tiny "pretrained" model saved to disk, configs that fine-tune
it with `model.peft`, and the adapter weights a run wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fit_helpers import FakeTokenizer, make_cfg
from run_helpers import refused_by_validate
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


def validate_model(tmp_path: Path, model: str, *, steps: int = 2, train_extra: str = "") -> str:
    """`llmtrain validate` on a config with this `model:` section (its lines start at line 3
    of c.yaml); returns what it printed."""
    (tmp_path / "corpus.txt").write_text("hello world\n" * 20)
    (tmp_path / "c.yaml").write_text(
        f"run: {{output_dir: {tmp_path / 'out'}, device: cpu}}\n"
        f"model:\n{model}"
        f"tokenizer: {{train: {{vocab_size: 300}}}}\n"
        f"data: {{train: {{path: {tmp_path / 'corpus.txt'}}}, chunk: {{seq_len: 16}}}}\n"
        f"train: {{max_steps: {steps}{train_extra}}}\n"
    )
    return refused_by_validate(tmp_path / "c.yaml")


def train_one_rank(cfg: Config, store: Any, micro: int) -> None:
    """One gloo rank of a DDP run of `cfg` on `store` (run by dist_helpers.run_function)."""
    from llmtrain.engine.distributed import setup, teardown
    from llmtrain.engine.loop import train

    torch.set_num_threads(1)
    dist = setup(torch.device("cpu"))
    try:
        tok = FakeTokenizer()
        model = build_model(cfg, tok, None)
        device = torch.device("cpu")
        train(cfg, model, tok, store, None, micro_batch=micro, device=device, dist=dist)
    finally:
        teardown()


def probe_copying_nothing(cfg: Config, model: torch.nn.Module, monkeypatch: Any) -> Any:
    """`probe_for_config` on `model`, failing if it deep-copies a module, and checking that
    every tensor of the model is bit-identical afterwards; returns the probe's result."""
    import copy

    from llmtrain.probe import probe_for_config

    before = {k: v.clone() for k, v in model.state_dict().items()}
    real_deepcopy = copy.deepcopy

    def guarded(obj: Any, memo: Any = None) -> Any:
        assert not isinstance(obj, torch.nn.Module), "the probe copied a module"
        return real_deepcopy(obj, memo)

    monkeypatch.setattr(copy, "deepcopy", guarded)
    result = probe_for_config(cfg, model, torch.device("cpu"), use_cache=False)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(before[k], after[k]) for k in before)
    return result
