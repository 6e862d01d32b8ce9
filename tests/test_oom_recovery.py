"""An OOM inside a window halves the micro-batch and re-runs the same window
(docs/architecture.md, "Probing")."""

from __future__ import annotations

import pytest
import torch
from fit_helpers import graph_tensors, make_cfg, max_rel_diff, params, random_store, run_train

from llmtrain.engine import loop
from llmtrain.engine.checkpoint import list_checkpoints
from llmtrain.engine.faults import fault_oom_phase, simulated_oom
from llmtrain.engine.metrics import read_metrics
from llmtrain.errors import LLMTrainError


def test_fault_hook(monkeypatch):
    assert simulated_oom(100) is None  # off
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "4")
    assert simulated_oom(4) is None
    assert isinstance(simulated_oom(5), torch.OutOfMemoryError)
    assert "simulated" in str(simulated_oom(5))
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_RANK", "1")
    assert simulated_oom(5, rank=0) is None  # another rank: untouched
    assert simulated_oom(5, rank=1) is not None
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_IN", "backwards")
    with pytest.raises(LLMTrainError, match="LLMTRAIN_FAULT_OOM_IN='backwards': expected"):
        fault_oom_phase()


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_oom_halves_micro_and_keeps_the_update(tmp_path, monkeypatch, phase):
    """Also when the OOM strikes inside the backward, with part of the window's gradients
    already accumulated: the retry starts from zero gradients."""
    store = random_store(40, seed=6)
    kw = {"global_batch": 16, "steps": 3, "train": {"save_every": 2}}
    ref, _ = run_train(make_cfg(tmp_path / "ref", micro=4, **kw), store)
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "4")
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_IN", phase)
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


def test_the_retry_after_an_oom_in_backward_does_not_run_beside_the_failed_graph(
    tmp_path, monkeypatch
):
    """torch's autograd engine keeps a backward that raised alive until the next backward:
    the retry at half the micro-batch would otherwise run with the failed window's activations
    still held, and on a GPU fail again for that reason alone."""
    alive: list[int] = []
    real = loop.forward_backward

    def spy(*args, **kwargs):
        alive.append(graph_tensors())
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "forward_backward", spy)
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "4")
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_IN", "backward")
    run_train(make_cfg(tmp_path, micro=8, global_batch=8, steps=1), random_store(16, seed=0))
    assert len(alive) == 2  # micro 8 failed in its backward, micro 4 trained
    assert alive[1] == alive[0], alive


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
