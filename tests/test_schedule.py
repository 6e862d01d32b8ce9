"""The LR schedule counts optimizer steps and the logged LR is the closed form at every step."""

from __future__ import annotations

import itertools
import math

import pytest
from fit_helpers import make_cfg, random_store, run_train

from llmtrain.config import OptimConfig
from llmtrain.engine.metrics import read_metrics
from llmtrain.engine.optim import effective_lr, lr_at


def test_closed_form_shapes():
    kw = {"peak": 1.0, "total": 10, "warmup": 4, "min_lr_ratio": 0.1}
    assert [lr_at(s, schedule="constant", **kw) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    lin = [lr_at(s, schedule="linear", **kw) for s in range(10)]
    assert lin[3] == lin[4] == 1.0 and lin[9] == pytest.approx(0.1)
    assert lin[6] == pytest.approx(1.0 - 0.9 * 2 / 5)
    cos = [lr_at(s, schedule="cosine", **kw) for s in range(10)]
    assert cos[3] == cos[4] == 1.0 and cos[9] == pytest.approx(0.1)
    assert cos[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 5)))
    assert all(a >= b for a, b in itertools.pairwise(cos[3:]))


def test_lr_scaling():
    o = OptimConfig(lr=1e-3, lr_scaling="linear", base_batch=32)
    assert effective_lr(o, 128) == pytest.approx(4e-3)
    o = OptimConfig(lr=1e-3, lr_scaling="sqrt", base_batch=32)
    assert effective_lr(o, 128) == pytest.approx(2e-3)
    assert effective_lr(OptimConfig(lr=1e-3), 128) == 1e-3


def test_logged_lr_follows_optimizer_steps(tmp_path):
    # micro 2, global 8 → k 4 micro-steps per optimizer step: warmup must count the latter.
    cfg = make_cfg(
        tmp_path,
        steps=7,
        micro=2,
        precision="fp32",
        optim={
            "lr": 1e-3,
            "schedule": "cosine",
            "warmup_steps": 3,
            "min_lr_ratio": 0.2,
            "lr_scaling": "sqrt",
            "base_batch": 2,
        },
    )
    run_train(cfg, random_store(24, seed=0))
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("split") == "train"]
    assert [r["step"] for r in train] == list(range(1, 8))
    peak = 1e-3 * 2.0  # sqrt(8 / 2)
    for r in train:
        expected = lr_at(
            r["step"] - 1, peak=peak, total=7, warmup=3, schedule="cosine", min_lr_ratio=0.2
        )
        assert r["lr"] == pytest.approx(expected, rel=1e-12)
        assert r["grad_accum"] == 4 and r["micro_batch"] == 2 and r["sequences"] == 8
    assert train[0]["lr"] == pytest.approx(peak / 3)
    assert train[-1]["lr"] == pytest.approx(0.2 * peak)


def test_fp16_overflow_skips_do_not_advance_the_schedule(tmp_path, monkeypatch):
    """A step the GradScaler skips is retried on the same window: no step, no LR is lost."""
    import torch

    import llmtrain.engine.loop as train_stage

    def huge_scaler(precision, device):
        return torch.amp.GradScaler("cpu", init_scale=2.0**40, enabled=precision == "fp16")

    monkeypatch.setattr(train_stage, "make_scaler", huge_scaler)
    cfg = make_cfg(tmp_path, steps=3, precision="fp16", optim={"warmup_steps": 3, "lr": 1e-3})
    _, result = run_train(cfg, random_store(24, seed=0))
    skips = [e for e in result.events if e["event"] == "fp16_overflow_skip"]
    assert skips and all(e["step"] == 1 for e in skips)
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("split") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["lr"] for r in train] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert all(math.isfinite(r["loss"]) for r in train)


def test_bf16_autocast_trains(tmp_path):
    import torch

    cfg = make_cfg(tmp_path, steps=2, precision="bf16")
    model, result = run_train(cfg, random_store(16, seed=0))
    assert result.step == 2 and math.isfinite(result.last_loss)
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights
