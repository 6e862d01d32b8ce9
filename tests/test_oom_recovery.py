"""An OOM inside a window halves the micro-batch and re-runs the same window
(docs/architecture.md, "Probing")."""

from __future__ import annotations

import pytest
import torch
from fit_helpers import make_cfg, max_rel_diff, params, random_store, run_train

from llmtrain.engine.checkpoint import list_checkpoints
from llmtrain.engine.faults import maybe_fault_oom
from llmtrain.engine.metrics import read_metrics
from llmtrain.errors import LLMTrainError


def test_fault_hook(monkeypatch):
    maybe_fault_oom(100)  # off: nothing
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "4")
    maybe_fault_oom(4)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        maybe_fault_oom(5)
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_RANK", "1")
    maybe_fault_oom(5, rank=0)  # another rank: untouched
    with pytest.raises(torch.OutOfMemoryError):
        maybe_fault_oom(5, rank=1)


def test_oom_halves_micro_and_keeps_the_update(tmp_path, monkeypatch):
    store = random_store(40, seed=6)
    kw = {"global_batch": 16, "steps": 3, "train": {"save_every": 2}}
    ref, _ = run_train(make_cfg(tmp_path / "ref", micro=4, **kw), store)
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "4")
    out = tmp_path / "oom"
    model, result = run_train(make_cfg(out, micro=16, **kw), store)
    assert result.micro_batch == 4
    assert max_rel_diff(params(ref), params(model)) < 1e-10
    records = read_metrics(out / "metrics.jsonl")
    ooms = [r for r in records if r.get("event") == "oom"]
    assert ooms == [
        {"event": "oom", "step": 1, "micro_batch_from": 16, "micro_batch_to": 8},
        {"event": "oom", "step": 1, "micro_batch_from": 8, "micro_batch_to": 4},
    ]
    train = [r for r in records if r.get("split") == "train"]
    assert [(r["micro_batch"], r["grad_accum"]) for r in train] == [(4, 4)] * 3
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    assert torch.load(ckpt / "state.pt", weights_only=False)["micro_batch"] == 4


def test_oom_at_micro_one_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "0")
    with pytest.raises(LLMTrainError, match="out of memory at step 1 with micro-batch 1"):
        run_train(make_cfg(tmp_path, micro=2), random_store(16, seed=0))


def test_nan_policy_skip_drops_the_update_and_goes_on(tmp_path):
    cfg = make_cfg(
        tmp_path,
        steps=4,
        precision="fp32",
        optim={"lr": 1e30, "grad_clip": None},
        train={"nan_policy": "skip"},
    )
    _, result = run_train(cfg, random_store(32, seed=0))
    skipped = [e["step"] for e in result.events if e["event"] == "nonfinite_loss_skipped"]
    assert result.step == 4 and skipped and skipped[-1] == 4
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "nonfinite_loss_skipped"] == skipped


def test_a_skipped_last_step_still_ends_with_the_final_eval_and_checkpoint(tmp_path):
    """nan_policy: skip on the very last step: that step still counts, so the run's final
    eval record and final checkpoint are written exactly as after a normal step."""
    cfg = make_cfg(
        tmp_path,
        steps=3,
        precision="fp32",
        optim={"lr": 1e30, "grad_clip": None},
        train={"nan_policy": "skip"},
    )
    _, result = run_train(cfg, random_store(32, seed=0), random_store(8, seed=1))
    skipped = [e["step"] for e in result.events if e["event"] == "nonfinite_loss_skipped"]
    assert skipped[-1] == 3, skipped
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("split") == "eval"] == [3]
    assert result.final_dir is not None and (result.final_dir / "config.json").is_file()
