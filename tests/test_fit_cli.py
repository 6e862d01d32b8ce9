"""`llmtrain fit` end to end through the CLI: corpus → trained tokenizer → store → model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_lm_config, write_corpus
from typer.testing import CliRunner

from llmtrain.cli import app

torch.set_num_threads(1)  # tiny models; threads only contend on a shared CPU


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", lines=300)


def _config(tmp_path: Path, corpus: Path, **train) -> Path:
    train = {"max_steps": 8, "eval_every": 4, "save_every": 4, "log_every": 1, **train}
    cfg = tiny_lm_config(tmp_path / "run", corpus, name="cli", eval_fraction=0.2, **train)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return path


def _fit(*args: str):
    return CliRunner().invoke(app, ["fit", *args])


def test_fit_end_to_end(tmp_path, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _config(tmp_path, corpus)
    res = _fit(str(config))
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert [r["step"] for r in evals] == [4, 8] and evals[1]["loss"] < evals[0]["loss"]
    assert set(train[0]) == {
        "split",
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "sequences",
        "micro_batch",
        "grad_accum",
        "tokens_per_s",
        "elapsed_s",
    }
    assert (run / "config.resolved.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.vocab_size == len(tok)

    # a second fresh start into the same run directory is refused ...
    res = _fit(str(config))
    assert res.exit_code == 1 and "--resume auto" in res.output
    # ... and --resume auto continues (here: to a longer max_steps)
    res = _fit(str(config), "--resume", "auto", "--set", "train.max_steps=9")
    assert res.exit_code == 0, res.output
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 9


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, corpus):
    config = _config(tmp_path, corpus, save_every=1, max_steps=6)
    res = _fit(str(config), "--set", "optim.lr=1e30", "--set", "optim.grad_clip=null")
    assert res.exit_code == 1, res.output
    assert "non-finite loss" in res.output and "is intact" in res.output
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    bad_step = int(res.output.split("at step ")[1].split(";")[0])
    assert ckpts[-1] == f"step-{bad_step - 1:08d}"


def test_dry_run_trains_nothing(tmp_path, corpus):
    res = _fit(str(_config(tmp_path, corpus)), "--dry-run")
    assert res.exit_code == 0, res.output
    assert "micro 4 × k 2" in res.output and "dry run" in res.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tensorboard_without_the_package_warns_and_trains(tmp_path, corpus):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    config = _config(tmp_path, corpus, max_steps=1)
    res = _fit(str(config), "--set", "log.tensorboard=true")
    assert res.exit_code == 0, res.output
    assert "tensorboard package is not installed" in res.output.replace("\n", " ")


def test_the_readme_quickstart_config_learns_and_its_final_model_loads(tmp_path, monkeypatch):
    """configs/quickstart.yaml itself (shipped corpus, trained BPE, pack mode), shortened with
    --set: the loss falls from the first logged step to the last, and final/ loads."""
    from transformers import AutoModelForCausalLM

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the config's paths are relative to the repository root
    run = tmp_path / "quickstart"
    sets = [
        f"run.output_dir={run}",
        "run.device=cpu",
        "model.config.n_layer=1",
        "train.max_steps=30",
        "train.eval_every=30",
        "train.save_every=30",
        "optim.warmup_steps=5",
        "log.progress=false",
    ]
    args = ["fit", "configs/quickstart.yaml"] + [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    train = [
        r for r in map(json.loads, (run / "metrics.jsonl").open()) if r.get("split") == "train"
    ]
    assert train[0]["step"] == 1 and train[-1]["step"] == 30
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.n_layer == 1
