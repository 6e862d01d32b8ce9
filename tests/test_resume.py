"""An interrupted run continues exactly: same weights, same metrics records
(docs/architecture.md, "Run directory")."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fit_helpers import make_cfg, params, random_store, run_train

from llmtrain.engine.checkpoint import list_checkpoints
from llmtrain.engine.faults import SimulatedKill
from llmtrain.engine.metrics import TIMING_FIELDS, read_metrics
from llmtrain.errors import LLMTrainError

HERE = Path(__file__).parent


def _cfg(out):
    # Dropout on and fp32: resume must restore the RNG as well as weights and optimizer.
    return make_cfg(
        out,
        steps=6,
        precision="fp32",
        dropout=True,
        micro=3,
        optim={"schedule": "cosine", "warmup_steps": 2},
        train={"save_every": 2, "eval_every": 3, "keep_checkpoints": 2},
    )


def _records(out):
    return [
        {k: v for k, v in r.items() if k not in TIMING_FIELDS}
        for r in read_metrics(out / "metrics.jsonl")
    ]


def _assert_same_run(a_model, a_out, b_model, b_out):
    pa, pb = params(a_model), params(b_model)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert _records(a_out) == _records(b_out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    store, ev = random_store(30, seed=4), random_store(6, seed=5)
    model, result = run_train(_cfg(out), store, ev)
    assert result.step == 6
    return out, model, store, ev


def test_resume_after_a_crash_is_exact(tmp_path, monkeypatch, reference):
    ref_out, ref_model, store, ev = reference
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:5")  # after step 5's records, ckpt at 4
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_cfg(tmp_path), store, ev)
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) == 5
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step-00000002",
        "step-00000004",
    ]
    with pytest.raises(LLMTrainError, match="--resume auto"):
        run_train(_cfg(tmp_path), store, ev)  # a fresh start would overwrite: refused
    model, result = run_train(_cfg(tmp_path), store, ev, resume="auto")
    assert result.step == 6
    _assert_same_run(ref_model, ref_out, model, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step-00000004",
        "step-00000006",
    ]  # keep_checkpoints: 2


def test_corrupt_latest_checkpoint_is_skipped(tmp_path, monkeypatch, reference):
    ref_out, ref_model, store, ev = reference
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:5")
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_cfg(tmp_path), store, ev)
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    weights = tmp_path / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated on disk
    with pytest.raises(LLMTrainError, match="unreadable checkpoint"):
        run_train(_cfg(tmp_path), store, ev, resume=str(weights.parent))  # named: no fallback
    model, _ = run_train(_cfg(tmp_path), store, ev, resume="auto")  # resumes from step 2
    _assert_same_run(ref_model, ref_out, model, tmp_path)


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {here!r})
    from fit_helpers import random_store, run_train
    from test_resume import _cfg
    run_train(_cfg({out!r}), random_store(30, seed=4), random_store(6, seed=5))
    """
)


def test_kill_during_checkpoint_write(tmp_path, reference):
    ref_out, ref_model, store, ev = reference
    env = {**os.environ, "LLMTRAIN_FAULT_KILL": "ckpt_after_model:4", "OMP_NUM_THREADS": "1"}
    code = SCRIPT.format(here=str(HERE), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000002"]
    # the half-write, named for its (now dead) writer's pid
    (half,) = ckpts.glob(".tmp-step-00000004-*")
    assert (half / "model.safetensors").is_file()
    model, _ = run_train(_cfg(tmp_path), store, ev, resume="auto")
    assert not half.exists()  # cleaned
    _assert_same_run(ref_model, ref_out, model, tmp_path)


def test_atomic_dir_replaces_whole_or_keeps_the_old(tmp_path):
    """final/ is written like a checkpoint: a failure mid-write leaves the previous one."""
    from llmtrain.util.atomic import atomic_dir

    target = tmp_path / "final"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError), atomic_dir(target) as d:
        (d / "a.txt").write_text("two, half written")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]

    with atomic_dir(target) as d:
        (d / "b.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


class Counter:
    """A component with state of its own, as a later one (an allocator, a tracker) has."""

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n, "seen": torch.arange(self.n)}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state["n"])


def test_a_component_rides_in_checkpoints_by_its_own_key(tmp_path):
    """Checkpoint state is typed (TrainState) and each Stateful component contributes its own
    part under its own key: a new one is one registration, saved and restored without the
    checkpoint code knowing it; a checkpoint that lacks its key leaves it as built."""
    from llmtrain.engine import checkpoint as ckpt

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train = ckpt.TrainState(step=3, micro_batch=2, epoch=1, step_in_epoch=1, global_batch=8)
    parts = {"scaler": scaler, "rng": ckpt.RngState(), "counter": Counter(5)}
    args = {"model": model, "optimizer": optimizer, "train_state": train, "keep": 2}
    ckpt.save_checkpoint(tmp_path, 3, parts=parts, **args)
    found = ckpt.find_resume(tmp_path, "auto")
    assert found is not None and found.train == train and set(found.parts) >= set(parts)
    fresh = Counter()
    restored = ckpt.apply_checkpoint(
        found,
        model=model,
        optimizer=optimizer,
        parts={"counter": fresh},
        device=torch.device("cpu"),
    )
    assert restored == train and fresh.n == 5
    ckpt.save_checkpoint(tmp_path, 4, parts={"rng": ckpt.RngState()}, **args)
    older = Counter(7)
    ckpt.apply_checkpoint(
        ckpt.find_resume(tmp_path, "auto"),
        model=model,
        optimizer=optimizer,
        parts={"counter": older},
        device=torch.device("cpu"),
    )
    assert older.n == 7
