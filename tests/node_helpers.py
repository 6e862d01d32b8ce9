"""Shared by the several-nodes tests (test_multinode.py, test_slurm.py): a tiny fp64 run, a
free port, the weights a run ends with, and its one-process reference."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
from fit_helpers import NO_DROPOUT
from run_helpers import tiny_lm_config, write_corpus
from safetensors.torch import load_file
from typer.testing import CliRunner

# fp64 on 2 ranks against 1 process: the sums are taken in another order, so the weights
# differ by rounding (~1e-16), far below this; a wrong share, scale or resume is far above
# (test_ddp.py, which this follows).
TOL = 1e-10
STEPS = 6  # 2 ranks × micro 4 = global 8 per step; checkpoints at 2, 4, 6


def write_run_config(root: Path, output_dir: str | Path, **train) -> Path:
    """<root>/config.yaml: a 1-layer GPT-2 (no dropout) with its own BPE on <root>/corpus.txt,
    fp64, one thread, STEPS steps saved every 2; `output_dir` as given (it may be relative)."""
    corpus = write_corpus(root / "corpus.txt")
    train = {"max_steps": STEPS, "save_every": 2, "log_every": 1, **train}
    cfg = tiny_lm_config(Path("."), corpus, name="nodes", precision="fp64", **train)
    # no dropout: each rank draws its own masks, so with it 2 ranks cannot equal 1 process
    cfg["model"]["config_overrides"] = NO_DROPOUT["gpt2"]
    cfg["run"]["output_dir"] = str(output_dir)
    path = root / "config.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def one_process(config: Path) -> dict[str, torch.Tensor]:
    """The reference: the same config in this process, the whole global batch of 8 in one
    micro-batch (the run directory is config's with `-single` appended)."""
    from llmtrain.cli import app

    cfg = json.loads(config.read_text(encoding="utf-8"))
    out = Path(cfg["run"]["output_dir"] + "-single")
    sets = ["--set", "batch.micro_batch=8", "--set", f"run.output_dir={out}"]
    res = CliRunner().invoke(app, ["fit", str(config), *sets])
    assert res.exit_code == 0, res.output
    return weights(out)


def train_steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["step"] for r in map(json.loads, lines) if r.get("split") == "train"]
