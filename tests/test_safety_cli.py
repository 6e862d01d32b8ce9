"""A run directory is safe, through `llmtrain fit` itself (docs/architecture.md, "Run
directory"): SIGTERM saves and exits 143 and the resumed run is bit-identical; a second `fit`
on a directory in use is refused at once while the first finishes intact; a resume with a
changed config is refused or recorded; `--overwrite` lists, asks, and starts over."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_lm_config, write_corpus
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmtrain import cli
from llmtrain.cli import app
from llmtrain.util.locks import lock_path

torch.set_num_threads(1)  # the subprocesses run with OMP_NUM_THREADS=1: the same arithmetic


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """`fit` sets intra-op threads from OMP_NUM_THREADS (else the cores): in-process runs must
    compute exactly as the subprocesses do, and leave this process at one thread."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def _config(where: Path, corpus: Path, **train) -> Path:
    """A tiny run writing to <where>/run; the config file is <where>/config.yaml."""
    train = {"max_steps": 8, "save_every": 4, "log_every": 1, **train}
    cfg = tiny_lm_config(where / "run", corpus, name="safe", **train)
    where.mkdir(parents=True, exist_ok=True)
    (where / "config.yaml").write_text(json.dumps(cfg), encoding="utf-8")
    return where / "config.yaml"


def _fit(*args: str):
    return CliRunner().invoke(app, ["fit", *args])


def _records(run: Path) -> list[dict]:
    found = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written
            found.append(json.loads(line))
    return found


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in _records(run) if r.get("split") == "train"]


def _fit_process(config: Path) -> subprocess.Popen:
    """A real `llmtrain fit CONFIG` process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "llmtrain", "fit", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"fit ended (rc {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


# --------------------------------------------------------------------------- SIGTERM (5)
def test_sigterm_saves_the_step_exits_143_and_resumes_bit_identical(tmp_path, corpus):
    config = _config(tmp_path / "a", corpus, max_steps=40, save_every=None)
    run = tmp_path / "a" / "run"
    proc = _fit_process(config)
    _wait_for(
        lambda: (run / "metrics.jsonl").is_file() and len(_train_steps(run)) >= 2, proc, "step 2"
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err
    stopped = _train_steps(run)[-1]
    assert 2 <= stopped < 40
    checkpoint = run / "checkpoints" / f"step-{stopped:08d}"
    assert f"stopped by SIGTERM after step {stopped}; checkpoint {checkpoint} written" in err
    assert f"resume with: llmtrain fit {config} --resume auto" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [checkpoint.name]
    assert not lock_path(run).exists()  # released on the way out

    res = _fit(str(config), "--resume", "auto")
    assert res.exit_code == 0, res.output
    assert _train_steps(run) == list(range(1, 41))
    reference = _config(tmp_path / "b", corpus, max_steps=40, save_every=None)
    res = _fit(str(reference))
    assert res.exit_code == 0, res.output
    a, b = _weights(run), _weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------- one writer (2)
def test_a_second_fit_is_refused_at_once_while_the_first_finishes_intact(tmp_path, corpus):
    config = _config(tmp_path, corpus, max_steps=10, save_every=5)
    run = tmp_path / "run"
    first = _fit_process(config)
    _wait_for(lambda: lock_path(run).is_file(), first, "the lock")
    for extra in ([], ["--overwrite", "--yes"], ["--resume", "auto"]):
        res = _fit(str(config), *extra)
        assert first.poll() is None  # refused while the first one runs, not after it
        assert res.exit_code == 1, res.output
        assert f"in use by another llmtrain process (pid {first.pid} on host" in res.output
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert _train_steps(run) == list(range(1, 11))  # one writer: each record once
    assert "max_steps: 10" in (run / "config.resolved.yaml").read_text()
    assert (run / "final" / "model.safetensors").is_file()
    assert not lock_path(run).exists()


# -------------------------------------------------------------------------- provenance (3)
@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus) -> Path:
    """A run of 8 steps with checkpoints at 4 and 8."""
    root = tmp_path_factory.mktemp("finished")
    res = _fit(str(_config(root, corpus)))
    assert res.exit_code == 0, res.output
    return root / "run"


@pytest.fixture
def copy(finished, tmp_path, corpus) -> Path:
    """A private copy of the finished run and its config (run.output_dir moves with it)."""
    shutil.copytree(finished, tmp_path / "run")
    return _config(tmp_path, corpus)


def test_a_resume_that_changes_the_run_is_refused_one_line_per_key(copy):
    run = copy.parent / "run"
    before = {p: p.read_bytes() for p in (run / "config.resolved.yaml", run / "metrics.jsonl")}
    store_meta = next((run / "store").rglob("meta.json"))
    stamp = store_meta.stat().st_mtime_ns
    sets = [
        "optim.lr=0.02",
        "run.seed=1",
        "data.chunk.seq_len=16",
        "model.config.n_embd=16",
        "optim.name=sgd",
        "train.precision=fp64",
    ]
    res = _fit(str(copy), "--resume", "auto", *[x for s in sets for x in ("--set", s)])
    assert res.exit_code == 2, res.output
    lines = res.output.splitlines()
    for change in [
        "optim.lr: 0.01 → 0.02",
        "run.seed: 0 → 1",
        "data.chunk.seq_len: 32 → 16",
        "model.config.n_embd: 32 → 16",
        'optim.name: "adamw" → "sgd"',
        'train.precision: "fp32" → "fp64"',
    ]:
        assert sum(change in line for line in lines) == 1, (change, res.output)
    assert "Traceback" not in res.output and "KeyError" not in res.output
    assert {p: p.read_bytes() for p in before} == before  # the run's record is untouched
    assert store_meta.stat().st_mtime_ns == stamp  # and its store was not rebuilt


def test_a_resume_with_safe_changes_lists_and_records_them(copy):
    run = copy.parent / "run"
    sets = ["train.max_steps=10", "train.log_every=2", "batch.micro_batch=2"]
    res = _fit(str(copy), "--resume", "auto", *[x for s in sets for x in ("--set", s)])
    assert res.exit_code == 0, res.output
    assert "resuming with changed settings" in res.output
    (event,) = [r for r in _records(run) if r.get("event") == "config_changed"]
    assert event["step"] == 8
    changes = event["changes"]
    assert changes["train.max_steps"] == [8, 10] and changes["train.log_every"] == [1, 2]
    assert changes["batch.micro_batch"] == [4, 2] and "run.output_dir" in changes
    assert "max_steps: 10" in (run / "config.resolved.yaml").read_text()
    assert _train_steps(run)[-1] == 10


def test_a_resume_to_fewer_steps_than_done_is_refused(copy):
    res = _fit(str(copy), "--resume", "auto", "--set", "train.max_steps=3")
    assert res.exit_code == 2, res.output
    assert "train.max_steps: 8 → 3 (below the checkpoint's step 8" in " ".join(res.output.split())


# --------------------------------------------------------------------------- --overwrite
def test_overwrite_lists_asks_and_refuses_without_a_terminal(copy, monkeypatch):
    run = copy.parent / "run"
    res = _fit(str(copy), "--overwrite")
    assert res.exit_code == 2, res.output
    assert "--overwrite deletes from" in res.output and "2 checkpoints" in res.output
    assert "add --yes" in res.output
    res = _fit(str(copy), "--overwrite", "--resume", "auto")
    assert res.exit_code == 2 and "use one" in res.output
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    res = CliRunner().invoke(app, ["fit", str(copy), "--overwrite"], input="n\n")
    assert res.exit_code == 1 and "nothing deleted" in res.output
    assert len(list((run / "checkpoints").iterdir())) == 2


def test_overwrite_yes_starts_over_and_keeps_the_store(copy):
    run = copy.parent / "run"
    store_meta = next((run / "store").rglob("meta.json"))
    stamp = store_meta.stat().st_mtime_ns
    (run / "checkpoints" / "step-00000008" / "model.safetensors").write_bytes(b"junk")
    res = _fit(str(copy), "--overwrite", "--yes", "--set", "train.max_steps=4")
    assert res.exit_code == 0, res.output
    assert f"--overwrite: removed {run / 'checkpoints'}" in " ".join(res.output.split())
    assert _train_steps(run) == [1, 2, 3, 4]  # a fresh run, not a continuation
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000004"]
    assert store_meta.stat().st_mtime_ns == stamp
