"""W&B and MLflow (engine/trackers.py): every record of metrics.jsonl reaches both, against the
optimizer step; the config as parameters; report.png and the final eval attached; a resumed
run continues the same tracker runs with no step sent twice; a missing package, an
unreachable service or a tracker raising mid-run costs one warning, never the run.

Offline only: W&B in `mode: offline` (its files parsed by tests/tracker_helpers.py), MLflow
on a `file:` store read back with its own client.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from fit_helpers import make_cfg, random_store, run_train
from tracker_helpers import by_step, wandb_files, wandb_merged, wandb_run_info, wandb_runs

from llmtrain.engine.faults import SimulatedKill
from llmtrain.engine.metrics import TIMING_FIELDS, MetricsWriter, read_metrics
from llmtrain.engine.trackers import STATE_FILE, MlflowTracker, WandbTracker

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """W&B and MLflow confined to tmp_path, never the network, nothing on the terminal."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # absent, so that the tracker's own settings are what is tested (restored afterwards)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_API_KEY"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _cfg(out, mlruns, **log):
    trackers = {
        "wandb": {"project": "tests", "mode": "offline", "tags": ["t"]},
        "mlflow": {"tracking_uri": f"file:{mlruns}", "experiment": "tests"},
    }
    return make_cfg(
        out,
        steps=6,
        precision="fp32",
        micro=3,
        train={"save_every": 2, "eval_every": 3, "log_every": 1},
        log={"progress": False, **trackers, **log},
    )


def _stores():
    return random_store(30, seed=4), random_store(6, seed=5)


def _expected(out):
    """{(step, "<split>/<key>"): value} of metrics.jsonl's train and eval records."""
    found = {}
    for r in read_metrics(out / "metrics.jsonl"):
        if "split" not in r:
            continue
        for k, v in r.items():
            if k not in ("split", "step") and isinstance(v, (int, float)):
                found[(r["step"], f"{r['split']}/{k}")] = float(v)
    return found


def _wandb_sent(out):
    """[(step, key, value)] of the run's history as W&B keeps it, over every offline run
    file of the run (a resume adds one)."""
    rows = wandb_merged(wandb_runs(out / "wandb"))
    keys = {k for r in rows for k in r if not k.startswith("_")}
    return [(s, k, float(v)) for k in keys for s, v in by_step(rows, k)]


def _mlflow_sent(mlruns, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{mlruns}")
    keys = client.get_run(run_id).data.metrics
    return [(m.step, k, m.value) for k in keys for m in client.get_metric_history(run_id, k)]


def _same_as_metrics_jsonl(sent, expected):
    """Every record's every number reached the tracker once, at its step, with its value
    (timing fields differ between a record and its remake after a resume: only their
    presence is compared)."""
    pairs = [(s, k) for s, k, _ in sent]
    assert len(pairs) == len(set(pairs)), "a step was sent twice"
    assert set(pairs) == set(expected)
    for s, k, v in sent:
        if k.rsplit("/", 1)[-1] not in TIMING_FIELDS:
            assert v == pytest.approx(expected[(s, k)], rel=1e-12, abs=0), (s, k)


def test_both_trackers_get_every_record_params_and_attachments(tmp_path, capfd):
    out, mlruns = tmp_path / "run", tmp_path / "mlruns"
    run_train(_cfg(out, mlruns), *_stores())
    captured = capfd.readouterr()
    assert "wandb" not in (captured.out + captured.err).lower()  # third-party noise stays off
    expected = _expected(out)
    state = json.loads((out / STATE_FILE).read_text())

    (path,) = wandb_runs(out / "wandb")
    run_id, config = wandb_run_info(path)
    assert run_id == state["wandb"]["id"]
    assert config["train.max_steps"] == 6 and config["log.wandb.mode"] == "offline"
    _same_as_metrics_jsonl(_wandb_sent(out), expected)
    assert {"report.png", "final_eval.json"} <= set(wandb_files(path))
    files = path.parent / "files"
    assert (files / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last_eval = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "eval"][-1]
    assert json.loads((files / "final_eval.json").read_text()) == {"eval": last_eval}

    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"file:{mlruns}")
    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert [r.info.run_id for r in runs] == [state["mlflow"]["id"]]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.max_steps"] == "6"
    assert runs[0].data.params["optim.betas"] == "[0.9, 0.95]"
    _same_as_metrics_jsonl(_mlflow_sent(mlruns, runs[0].info.run_id), expected)
    client = MlflowClient(tracking_uri=f"file:{mlruns}")
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert artifacts == {"report.png", "final_eval.json"}


def test_resume_continues_the_same_runs_and_sends_no_step_twice(tmp_path, monkeypatch):
    out, mlruns = tmp_path / "run", tmp_path / "mlruns"
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:5")  # records to 5, checkpoint at 4
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_cfg(out, mlruns), *_stores())
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    before = json.loads((out / STATE_FILE).read_text())
    assert before["wandb"]["step"] == 5  # step 5 was sent; metrics.jsonl will drop and redo it
    _, result = run_train(_cfg(out, mlruns), *_stores(), resume="auto")
    assert result.step == 6
    state = json.loads((out / STATE_FILE).read_text())
    assert {k: v["id"] for k, v in state.items()} == {k: v["id"] for k, v in before.items()}
    expected = _expected(out)

    paths = wandb_runs(out / "wandb")
    assert len(paths) == 2  # offline: one folder per process, the same run id
    assert {wandb_run_info(p)[0] for p in paths} == {state["wandb"]["id"]}
    _same_as_metrics_jsonl(_wandb_sent(out), expected)

    import mlflow

    mlflow.set_tracking_uri(f"file:{mlruns}")
    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert [r.info.run_id for r in runs] == [state["mlflow"]["id"]]
    assert runs[0].info.status == "FINISHED"
    _same_as_metrics_jsonl(_mlflow_sent(mlruns, state["mlflow"]["id"]), expected)


def test_a_tracker_raising_mid_run_is_one_warning_and_the_run_finishes(
    tmp_path, monkeypatch, capsys
):
    out, mlruns = tmp_path / "run", tmp_path / "mlruns"
    real = WandbTracker.log

    def flaky(self, metrics, step):
        if step == 3:
            raise RuntimeError("connection reset by peer")
        real(self, metrics, step)

    monkeypatch.setattr(WandbTracker, "log", flaky)
    _, result = run_train(_cfg(out, mlruns), *_stores())
    assert result.step == 6
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "log.wandb failed (RuntimeError: connection reset by peer)" in warnings[0]
    assert {s for s, _, _ in _wandb_sent(out)} == {1, 2}  # off from step 3 on
    mlflow_id = json.loads((out / STATE_FILE).read_text())["mlflow"]["id"]
    _same_as_metrics_jsonl(_mlflow_sent(mlruns, mlflow_id), _expected(out))  # unaffected
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 6


def test_missing_packages_are_one_line_each_and_training_goes_on(tmp_path, monkeypatch, capsys):
    for name in ("wandb", "mlflow", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    out = tmp_path / "run"
    _, result = run_train(_cfg(out, tmp_path / "mlruns"), *_stores())
    assert result.step == 6
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2, err
    assert "log.wandb is set but the wandb package is not installed" in err[0]
    assert "pip install 'llmtrain[wandb]'" in err[0]
    assert "pip install 'llmtrain[mlflow]'" in err[1]
    assert not (out / "wandb").exists()
    assert len(read_metrics(out / "metrics.jsonl")) == len(_expected_records(out))


def _expected_records(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "split" in r]


def test_an_unreachable_mlflow_server_is_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # the test need not wait
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = _cfg(tmp_path / "run", tmp_path / "mlruns", mlflow={"tracking_uri": "http://127.0.0.1:9"})
    _, result = run_train(cfg, *_stores())
    assert result.step == 6
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "log.mlflow: could not start" in warnings[0], warnings
    assert wandb_runs(tmp_path / "run" / "wandb")  # the other tracker is unaffected


def test_wandb_online_without_credentials_is_one_warning(tmp_path, monkeypatch, capsys):
    """No API key (and no terminal to ask for one): W&B refuses before any network call."""
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    cfg = _cfg(tmp_path / "run", tmp_path / "mlruns", wandb={"project": "p", "mode": "online"})
    _, result = run_train(cfg, *_stores())
    assert result.step == 6
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "log.wandb: could not start (UsageError" in warnings[0]


def test_only_the_writing_rank_feeds_trackers(tmp_path):
    class Refuse:
        def write(self, record):
            raise AssertionError("a rank other than 0 sent a record")

        def close(self, ok):
            raise AssertionError("a rank other than 0 closed a tracker")

    writer = MetricsWriter(
        tmp_path / "metrics.jsonl",
        enabled=False,  # what open_log passes on every rank but 0
        jsonl=True,
        tensorboard=False,
        fresh=True,
        trackers=Refuse(),  # type: ignore[arg-type]
    )
    writer.write({"split": "train", "step": 1, "loss": 1.0})
    writer.close()


def test_mlflow_params_are_logged_once_in_batches(tmp_path):
    """More than MLflow's 100 params per call, values longer than its limit cut."""
    from mlflow.tracking import MlflowClient

    from llmtrain.config.schema import MlflowConfig

    tracker = MlflowTracker(MlflowConfig(tracking_uri=f"file:{tmp_path}", experiment="x"), "r")
    params = {f"k{i}": i for i in range(250)} | {"long": "y" * 7000, "odd:key": None}
    run_id = tracker.start(params, None)
    logged = MlflowClient(tracking_uri=f"file:{tmp_path}").get_run(run_id).data.params
    assert len(logged) == 252 and logged["k249"] == "249" and len(logged["long"]) == 6000
    assert logged["odd_key"] == "null"


@pytest.mark.slow
def test_a_hard_kill_loses_nothing_on_resume(tmp_path, monkeypatch):
    """`kill -9` semantics (os._exit): W&B had not flushed its buffer to the offline file, so
    the resumed run sends metrics.jsonl again; MLflow had every record and gets none twice."""
    import subprocess
    import textwrap

    out, mlruns = tmp_path / "run", tmp_path / "mlruns"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from fit_helpers import random_store, run_train
        from test_trackers import _cfg
        run_train(_cfg({str(out)!r}, {str(mlruns)!r}), random_store(30, seed=4),
                  random_store(6, seed=5), resume=sys.argv[1] or None)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMTRAIN_FAULT_KILL": "step_end:5"}
    # each process its own wandb-core, as from a shell: an inherited one (this test process
    # started it for the tests before) would outlive the kill and flush what it holds
    env.pop("WANDB_SERVICE", None)
    killed = subprocess.run([sys.executable, "-c", script, ""], env=env, capture_output=True)
    assert killed.returncode == 137, killed.stderr.decode()[-2000:]
    env.pop("LLMTRAIN_FAULT_KILL")
    done = subprocess.run([sys.executable, "-c", script, "auto"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    state = json.loads((out / STATE_FILE).read_text())
    expected = _expected(out)
    first, resumed = wandb_runs(out / "wandb")
    # W&B flushes its file every 15 s: the killed process's file usually holds the header
    # only (7 bytes), whatever it holds the merged history below must be complete
    assert first.name == resumed.name == f"run-{state['wandb']['id']}.wandb"
    assert wandb_run_info(resumed)[0] == state["wandb"]["id"]
    _same_as_metrics_jsonl(_wandb_sent(out), expected)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's reader
    _same_as_metrics_jsonl(_mlflow_sent(mlruns, state["mlflow"]["id"]), expected)


def test_a_tracker_that_cannot_start_on_resume_keeps_its_run_for_the_next(tmp_path, monkeypatch):
    out, mlruns = tmp_path / "run", tmp_path / "mlruns"
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:3")
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_cfg(out, mlruns), *_stores())
    before = json.loads((out / STATE_FILE).read_text())
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:5")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "mlflow", None)
        m.setitem(sys.modules, "mlflow.tracking", None)
        with pytest.raises(SimulatedKill):
            run_train(_cfg(out, mlruns), *_stores(), resume="auto")
    assert json.loads((out / STATE_FILE).read_text())["mlflow"] == before["mlflow"]
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    run_train(_cfg(out, mlruns), *_stores(), resume="auto")
    state = json.loads((out / STATE_FILE).read_text())
    assert state["mlflow"]["id"] == before["mlflow"]["id"]
    sent = _mlflow_sent(mlruns, state["mlflow"]["id"])
    # steps 4 and 5 were trained while MLflow was away; from the checkpoint at 4 on it is back
    assert {s for s, _, _ in sent} == {1, 2, 3, 5, 6}


def test_a_tracker_first_set_on_resume_gets_the_run_so_far(tmp_path, monkeypatch):
    out, mlruns = tmp_path / "run", tmp_path / "mlruns"
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:5")
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_cfg(out, mlruns, mlflow=None), *_stores())
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    run_train(_cfg(out, mlruns), *_stores(), resume="auto")  # log.mlflow is a safe change
    state = json.loads((out / STATE_FILE).read_text())
    _same_as_metrics_jsonl(_mlflow_sent(mlruns, state["mlflow"]["id"]), _expected(out))


def test_tensorboard_still_gets_every_record_beside_the_trackers(tmp_path, monkeypatch):
    """TensorBoard's writer (a stand-in: tensorboard need not be installed) is fed as before."""
    import types

    scalars = []

    class SummaryWriter:
        def __init__(self, logdir):
            assert logdir == str(tmp_path / "run" / "tensorboard")

        def add_scalar(self, tag, value, step):
            scalars.append((step, tag, float(value)))

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    out, mlruns = tmp_path / "run", tmp_path / "mlruns"
    run_train(_cfg(out, mlruns, tensorboard=True), *_stores())
    _same_as_metrics_jsonl(scalars, _expected(out))
    _same_as_metrics_jsonl(_wandb_sent(out), _expected(out))
