"""Train records average their interval: `loss` and `grad_norm` are the means, `tokens` and
`sequences` the sums, over the steps since the previous record — also across a resume from
a checkpoint that is not on a log boundary."""

from __future__ import annotations

import pytest
from fit_helpers import make_cfg, random_store, run_train

from llmtrain.engine.faults import SimulatedKill
from llmtrain.engine.metrics import TIMING_FIELDS, MetricsWriter, read_metrics


def _cfg(out, log_every, **train):
    return make_cfg(
        out,
        steps=8,
        precision="fp64",
        micro=3,
        train={"log_every": log_every, "save_every": 3, "eval_every": None, **train},
    )


def _train(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "train"]


def test_a_record_is_the_mean_of_its_interval(tmp_path):
    store = random_store(40, seed=2)
    run_train(_cfg(tmp_path / "every", 1), store)
    run_train(_cfg(tmp_path / "third", 3), store)
    steps = {r["step"]: r for r in _train(tmp_path / "every")}
    logged = _train(tmp_path / "third")
    assert [r["step"] for r in logged] == [1, 3, 6, 8]  # the first, every 3rd, the last
    previous = 0
    for r in logged:
        interval = [steps[s] for s in range(previous + 1, r["step"] + 1)]
        n = len(interval)
        assert r["loss"] == sum(x["loss"] for x in interval) / n
        assert r["grad_norm"] == sum(x["grad_norm"] for x in interval) / n
        assert r["tokens"] == sum(x["tokens"] for x in interval)
        assert r["sequences"] == sum(x["sequences"] for x in interval)
        assert r["lr"] == steps[r["step"]]["lr"]
        previous = r["step"]
    assert logged[2]["loss"] != steps[6]["loss"]  # a mean, not the step's own value


def _records(out):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in _train(out)]


def test_resume_in_mid_interval_writes_the_same_means(tmp_path, monkeypatch):
    """log_every 4, checkpoints every 3: the run dies after step 5 and resumes from step 3,
    inside the interval (0, 4], then passes step 6's checkpoint inside (4, 8]."""
    store = random_store(40, seed=2)
    run_train(_cfg(tmp_path / "whole", 4), store)
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:5")
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_cfg(tmp_path / "cut", 4), store)
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    run_train(_cfg(tmp_path / "cut", 4), store, resume="auto")
    assert [r["step"] for r in _records(tmp_path / "whole")] == [1, 4, 8]
    assert _records(tmp_path / "cut") == _records(tmp_path / "whole")


def test_tensorboard_hint_shows_the_install_command(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    MetricsWriter(tmp_path / "m.jsonl", enabled=True, jsonl=True, tensorboard=True, fresh=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "pip install tensorboard" in err and "'.[tensorboard]'" in err
