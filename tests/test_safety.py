"""A run directory is safe (docs/architecture.md, "Run directory"): checkpoints are read
without running code and verified against their checksums, with a fall back to the previous
good one; one writer per directory; a changed config is compared with the run's; a full disk
is one clear line and leaves no temporary behind. The CLI cases (SIGTERM, two `fit`s,
--overwrite, provenance through `fit`) are in tests/test_safety_cli.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_helpers import FakeTokenizer, make_cfg, params, random_store, run_train

from llmtrain.engine import checkpoint as ckpt
from llmtrain.engine.faults import SimulatedKill
from llmtrain.engine.model import build_model
from llmtrain.errors import ConfigError, LLMTrainError
from llmtrain.rundir import provenance
from llmtrain.util import atomic
from llmtrain.util.locks import hold_run_dir, lock_path

HERE = Path(__file__).parent


def _cfg(out, **train):
    # dropout on: a resume must restore the RNG too
    t = {"save_every": 2, "keep_checkpoints": 3, **train}
    return make_cfg(out, steps=6, precision="fp32", dropout=True, micro=4, train=t)


def _stores():
    return random_store(24, seed=7), None


@pytest.fixture(scope="module")
def reference():
    """An uninterrupted run's final parameters."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model, result = run_train(_cfg(d), *_stores())
    assert result.step == 6
    return params(model)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A run killed after step 5: checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("crashed")
    os.environ.update(LLMTRAIN_FAULT_KILL="step_end:5", LLMTRAIN_FAULT_KILL_MODE="raise")
    try:
        with pytest.raises(SimulatedKill):
            run_train(_cfg(out), *_stores())
    finally:
        del os.environ["LLMTRAIN_FAULT_KILL"], os.environ["LLMTRAIN_FAULT_KILL_MODE"]
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["step-00000002", "step-00000004"]
    return out


@pytest.fixture
def run_dir(crashed, tmp_path):
    """A private copy of the crashed run."""
    out = tmp_path / "run"
    shutil.copytree(crashed, out)
    return out


def _resume(out):
    model, result = run_train(_cfg(out), *_stores(), resume="auto")
    assert result.step == 6
    return params(model)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def _reseal(directory: Path) -> None:
    """What an attacker who can write the directory can do: recompute checksums.json."""
    ckpt.write_manifest(directory)


class Payload:
    """A pickle that, when loaded with weights_only=False, creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# --------------------------------------------------------------- no code from disk (item 1)
@pytest.mark.parametrize("name", ["optimizer.pt", "state.pt"])
def test_a_pickle_payload_in_a_checkpoint_never_runs(run_dir, reference, tmp_path, capsys, name):
    marker = tmp_path / "payload-ran"
    latest = run_dir / "checkpoints" / "step-00000004"
    torch.save({"state": {0: Payload(marker)}, "param_groups": []}, latest / name)
    _reseal(latest)  # checksums match: the loader itself must refuse the file
    resumed = _resume(run_dir)
    assert not marker.exists()
    err = capsys.readouterr().err
    assert f"{latest / name}: unreadable checkpoint" in err
    assert "nothing in it was run" in err
    assert _same(resumed, reference)  # resumed from step 2, exactly


def test_a_payload_in_the_only_checkpoint_stops_clearly(run_dir, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    shutil.rmtree(run_dir / "checkpoints" / "step-00000002")
    only = run_dir / "checkpoints" / "step-00000004"
    torch.save(Payload(marker), only / "optimizer.pt")
    _reseal(only)
    with pytest.raises(LLMTrainError, match="no checkpoint there could be read"):
        run_train(_cfg(run_dir), *_stores(), resume="auto")
    assert not marker.exists()
    assert "optimizer.pt" in capsys.readouterr().err


def test_an_explicit_path_to_a_payload_is_refused_without_fallback(run_dir, tmp_path):
    marker = tmp_path / "payload-ran"
    latest = run_dir / "checkpoints" / "step-00000004"
    torch.save(Payload(marker), latest / "state.pt")
    _reseal(latest)
    with pytest.raises(LLMTrainError, match=r"state\.pt: unreadable checkpoint"):
        ckpt.find_resume(run_dir, str(latest))
    assert not marker.exists()


# ------------------------------------------------------------------ checksums (item 4)
def test_a_bit_flip_in_the_weights_falls_back_to_the_previous_checkpoint(
    run_dir, reference, capsys
):
    weights = run_dir / "checkpoints" / "step-00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # one bit of one weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    resumed = _resume(run_dir)
    err = capsys.readouterr().err
    assert f"{weights}: unreadable checkpoint (sha256 differs" in err
    assert "trying the previous checkpoint" in err
    assert _same(resumed, reference)


def test_a_replaced_file_fails_its_checksum_before_it_is_loaded(run_dir, tmp_path):
    latest = run_dir / "checkpoints" / "step-00000004"
    torch.save(Payload(tmp_path / "m"), latest / "optimizer.pt")  # checksums.json not resealed
    with pytest.raises(LLMTrainError) as e:
        ckpt.read_checkpoint(latest)
    assert str(e.value).startswith(f"{latest / 'optimizer.pt'}: unreadable checkpoint")
    assert "checksums.json" in str(e.value)


def test_a_crafted_state_without_rng_names_the_file_and_falls_back(run_dir, reference, capsys):
    latest = run_dir / "checkpoints" / "step-00000004"
    state = torch.load(latest / "state.pt", weights_only=True)
    del state["rng"]
    torch.save(state, latest / "state.pt")
    _reseal(latest)
    resumed = _resume(run_dir)
    err = capsys.readouterr().err
    assert f"{latest / 'state.pt'}: unreadable checkpoint (missing or malformed: rng)" in err
    assert _same(resumed, reference)


def test_every_checkpoint_file_is_plain_data(run_dir):
    """The format itself loads under weights_only=True (no allow-list)."""
    latest = run_dir / "checkpoints" / "step-00000004"
    for name in ("optimizer.pt", "state.pt"):
        torch.load(latest / name, weights_only=True)
    manifest = json.loads((latest / "checksums.json").read_text())
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.pt", "state.pt"]


def test_a_checkpoint_of_the_previous_format_still_resumes(run_dir, reference, capsys):
    """Format 1 pickled numpy's RNG tuple and wrote no checksums: read, with a warning."""
    for path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        state = torch.load(path / "state.pt", weights_only=True)
        state["rng"]["numpy"] = np.random.RandomState(3).get_state()  # numpy arrays inside
        del state["format"]
        torch.save(state, path / "state.pt")
        (path / "checksums.json").unlink()
    found = ckpt.find_resume(run_dir, "auto")
    assert found is not None and found.train.step == 4
    assert "no checksums.json" in capsys.readouterr().err
    ckpt.set_rng_state(found.parts["rng"])
    assert np.array_equal(np.random.get_state()[1], np.random.RandomState(3).get_state()[1])


def test_a_changed_architecture_is_one_line_naming_the_weights(run_dir):
    cfg = make_cfg(run_dir, steps=6, precision="fp32", dropout=True, micro=4)
    cfg = cfg.model_copy(deep=True)
    cfg.model.config = {**cfg.model.config, "n_embd": 32}
    with pytest.raises(LLMTrainError) as e:
        run_train(cfg, *_stores(), resume="auto")
    assert "\n" not in str(e.value)
    assert "model.safetensors: does not fit this model" in str(e.value)


# --------------------------------------------------------------------- one writer (item 2)
HOLDER = textwrap.dedent(
    """
    import sys, time
    from llmtrain.util.locks import hold_run_dir
    with hold_run_dir(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
    """
)


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(LLMTrainError) as e, hold_run_dir(out):
            pass
        line = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in line
        assert "in use by another llmtrain process" in line and "\n" not in line
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean exit: the lock file stays
        holder.wait()
    assert lock_path(out).is_file()
    notices = []
    with hold_run_dir(out, notice=notices.append):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert len(notices) == 1 and f"pid {holder.pid}" in notices[0]
    assert "is no longer running" in notices[0]
    assert not lock_path(out).exists()  # released: removed


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    refused = pytest.raises(LLMTrainError, match=r"pid 1 on host elsewhere.*delete .*\.lock")
    with refused, hold_run_dir(out):
        pass
    assert json.loads(lock_path(out).read_text())["host"] == "elsewhere"


def test_other_ranks_do_not_take_the_lock(tmp_path):
    out = tmp_path / "run"
    with hold_run_dir(out), hold_run_dir(out, enabled=False):  # rank 0, then rank 1
        pass


# ------------------------------------------------------------------- provenance (item 3)
def _resolved(tmp_path: Path, **sections) -> Path:
    from llmtrain.config import dump_config

    (tmp_path / "config.resolved.yaml").write_text(dump_config(make_cfg(tmp_path, **sections)))
    return tmp_path / "config.resolved.yaml"


def test_meaning_changes_are_refused_one_line_per_key(tmp_path):
    resolved = _resolved(tmp_path)
    new = make_cfg(
        tmp_path,
        precision="fp32",
        optim={"lr": 0.02, "schedule": "cosine"},
        run={"seed": 1},
        data={"chunk": {"seq_len": 8, "mode": "truncate"}, "train": {"path": "other.txt"}},
    )
    with pytest.raises(ConfigError) as e:
        provenance.compare(new, resolved, step=2)
    lines = e.value.messages
    for key, change in [
        ("run.seed", "0 → 1"),
        ("data.train.path", f'"{tmp_path}" → "other.txt"'),
        ("data.chunk.seq_len", "16 → 8"),
        ("optim.lr", "0.01 → 0.02"),
        ("optim.schedule", '"constant" → "cosine"'),
        ("train.precision", '"fp64" → "fp32"'),
    ]:
        assert sum(f"{resolved}: {key}: {change}" in line for line in lines) == 1, (key, lines)
    assert len(lines) == 7  # six keys and the way out
    assert "--overwrite" in lines[-1]


def test_safe_changes_are_returned_for_the_event(tmp_path):
    resolved = _resolved(tmp_path)
    new = make_cfg(tmp_path, steps=9, micro=4, train={"log_every": 3}, run={"device": "auto"})
    changes = provenance.compare(new, resolved, step=3)
    assert changes == {
        "run.device": ["cpu", "auto"],
        "batch.micro_batch": [2, 4],
        "train.max_steps": [3, 9],
        "train.log_every": [1, 3],
    }


def test_max_steps_below_the_checkpoint_and_fewer_epochs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train.max_steps: 3 → 2 \(below the checkpoint's"):
        provenance.compare(make_cfg(tmp_path, steps=2), _resolved(tmp_path), step=3)
    old = _resolved(tmp_path, train={"max_steps": None, "epochs": 3})
    fewer = make_cfg(tmp_path, train={"max_steps": None, "epochs": 2})
    with pytest.raises(ConfigError, match=r"train.epochs: 3.0 → 2.0 \(epochs can only grow"):
        provenance.compare(fewer, old, step=1)
    more = make_cfg(tmp_path, train={"max_steps": None, "epochs": 4})
    assert provenance.compare(more, old, step=1) == {"train.epochs": [3.0, 4.0]}
    with pytest.raises(ConfigError, match="at step 8, beyond this config's 6 steps"):
        ckpt.check_total(6, 8, tmp_path)


def test_a_key_the_old_run_did_not_know_is_unchanged_at_its_default(tmp_path):
    old = {"train": {"max_steps": 3}}
    assert provenance.diff(old, {"train": {"max_steps": 3, "keep_checkpoints": 3}}) == []
    (change,) = provenance.diff(old, {"train": {"max_steps": 3, "keep_checkpoints": 5}})
    assert change.text() == "train.keep_checkpoints: (absent) → 5"


def test_a_max_steps_below_the_checkpoint_is_refused_by_the_loop_too(run_dir):
    with pytest.raises(ConfigError, match="at step 4, beyond this config's 3 steps"):
        cfg = make_cfg(run_dir, steps=3, precision="fp32", dropout=True, micro=4)
        run_train(cfg, *_stores(), resume="auto")


# ---------------------------------------------------------------------- disk full (item 7)
def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(run_dir, monkeypatch):
    monkeypatch.setattr(atomic, "free_bytes", lambda d: 4096)
    with pytest.raises(LLMTrainError) as e:
        run_train(_cfg(run_dir), *_stores(), resume="auto")  # step 6 checkpoint
    line = str(e.value)
    assert line.startswith(f"{run_dir / 'checkpoints'}: no space left on the device")
    assert "checkpoint step 6: needs" in line and "4.0 KiB free" in line and "\n" not in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000004",
    ]


def test_a_write_that_fails_half_way_leaves_no_temporary(run_dir, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # what torch's C++ writer raises on ENOSPC
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 512 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(LLMTrainError, match="no space left on the device to write checkpoint"):
        run_train(_cfg(run_dir), *_stores(), resume="auto")
    monkeypatch.setattr(torch, "save", real_save)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004"]  # no .tmp-step-00000006-<pid>


FULL_DISK = textwrap.dedent(
    """
    import json, os, subprocess, sys
    import torch
    from llmtrain.engine.checkpoint import TrainState, save_checkpoint
    from llmtrain.errors import LLMTrainError
    from llmtrain.util import atomic
    root = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", root], check=True)
    out = {}
    try:
        atomic.atomic_write(root + "/big.bin", b"x" * 200_000)
    except LLMTrainError as e:
        out["write"] = str(e)
    model = torch.nn.Linear(128, 128)  # 64 KiB of weights, 128 KiB of Adam state
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 128)).sum().backward()
    optimizer.step()
    args = dict(model=model, optimizer=optimizer, parts={"scaler": torch.amp.GradScaler("cpu")},
                train_state=TrainState(step=1, micro_batch=1), keep=2)
    for case in ("refused", "mid-write"):
        try:
            save_checkpoint(root + "/run", 1, **args)
        except LLMTrainError as e:
            out[case] = str(e)
        atomic.ensure_space = lambda *a: None  # now let it start, so the disk fills mid-way
    out["left"] = sorted(os.listdir(root)) + sorted(os.listdir(root + "/run/checkpoints"))
    print(json.dumps(out))
    """
)


def test_a_real_full_disk(tmp_path):
    """A 96 KiB tmpfs in a private mount namespace (skipped where namespaces are not allowed):
    refused before writing when the size is known to be too much, and a real ENOSPC half-way
    through torch's or safetensors' writer is the same one line, with nothing left behind."""
    root = tmp_path / "small"
    root.mkdir()
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user+mount namespaces here (unshare -rm)")
    proc = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", FULL_DISK, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["write"].startswith(f"{root}: no space left on the device to write big.bin")
    assert "needs 195.3 KiB, 96.0 KiB free" in out["write"]
    checkpoints = root / "run" / "checkpoints"
    for case in ("refused", "mid-write"):
        assert out[case].startswith(f"{checkpoints}: no space left on the device to write "), out
        assert "checkpoint step 1: needs" in out[case] and "\n" not in out[case]
    assert out["left"] == ["run"], out["left"]  # no .tmp-big.bin-*, no .tmp-step-*


# ------------------------------------------------------------------------- SIGTERM (item 5)
def test_sigterm_before_training_stops_at_once_and_during_training_at_the_step_end():
    from llmtrain.engine import signals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(signals.Preempted) as e, signals.sigterm_guard():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between two bytecodes of this thread
            pass
    assert e.value.checkpoint is None and e.value.exit_code == 143
    assert "before training started; nothing to save" in str(e.value)
    with signals.sigterm_guard():
        signals.defer_to_step_end()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
        assert signals.requested() and signals.active()  # noted; the loop acts on it
    assert not signals.requested() and not signals.active()
    assert signal.getsignal(signal.SIGTERM) is before


def _sigterm_on_rank_1(root: str) -> None:
    """The ranks' side: rank 1 alone gets SIGTERM at the end of step 2."""
    from llmtrain.engine import loop, signals
    from llmtrain.engine.distributed import setup, teardown

    torch.set_num_threads(1)
    dist = setup(torch.device("cpu"))
    real_kill_point = loop.kill_point

    def kill_point(name: str) -> None:
        if name == "step_end:2" and dist.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        real_kill_point(name)

    loop.kill_point = kill_point
    cfg = make_cfg(Path(root) / "run", steps=6, micro=2, global_batch=8)
    try:
        with signals.sigterm_guard():
            model = build_model(cfg, FakeTokenizer(), None)
            try:
                loop.train(
                    cfg,
                    model,
                    FakeTokenizer(),
                    random_store(40, seed=1),
                    None,
                    micro_batch=2,
                    device=torch.device("cpu"),
                    dist=dist,
                )
                outcome = "finished"
            except signals.Preempted as e:
                outcome = f"preempted {e.step} {e.checkpoint}"
        (Path(root) / f"rank{dist.rank}.txt").write_text(outcome)
    finally:
        teardown()


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    from dist_helpers import run_function

    run_function("test_safety:_sigterm_on_rank_1", str(tmp_path))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"preempted 2 {checkpoint}"
    assert [p.name for p in ckpt.list_checkpoints(checkpoint.parent)] == [checkpoint.name]
