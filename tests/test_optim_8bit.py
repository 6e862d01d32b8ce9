"""optim.name: adamw8bit (bitsandbytes): exact resume, a pickle-free checkpoint, the state
estimate the banner shows, and the validation refusals."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from fit_helpers import make_cfg, params, random_store, run_train
from run_helpers import lm_config, refused_by_validate, write_config

from llmtrain.engine.checkpoint import list_checkpoints, load_plain
from llmtrain.engine.faults import SimulatedKill
from llmtrain.engine.optim import build_optimizer, optimizer_state_bytes

pytest.importorskip("bitsandbytes")

# n_embd 32: the MLP matrices (32 × 128 = 4096 elements) reach bitsandbytes' 8-bit threshold,
# the rest keeps fp32 moments: both kinds of state go through the checkpoint.
GPT2_8BIT = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}


def _cfg(out):
    return make_cfg(
        out,
        steps=5,
        precision="fp32",
        dropout=True,
        micro=3,
        model={"config": GPT2_8BIT},
        optim={"name": "adamw8bit", "schedule": "cosine", "warmup_steps": 1},
        train={"save_every": 2, "keep_checkpoints": 3},
    )


def test_adamw8bit_resume_is_bit_exact(tmp_path, monkeypatch):
    store, ev = random_store(30, seed=4), random_store(6, seed=5)
    ref_model, _ = run_train(_cfg(tmp_path / "ref"), store, ev)

    out = tmp_path / "killed"
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:3")  # after step 3; checkpoint at 2
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_cfg(out), store, ev)
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    (ckpt,) = list_checkpoints(out / "checkpoints")
    # load_plain is torch.load(weights_only=True): the 8-bit state needs no pickled objects
    state = load_plain(ckpt / "optimizer.pt")["state"]
    dtypes = {
        v.dtype
        for s in state.values()
        for q in s.values()
        if isinstance(q, dict)
        for v in q.values()
    }
    assert torch.uint8 in dtypes  # the 8-bit moments really were checkpointed

    model, result = run_train(_cfg(out), store, ev, resume="auto")
    assert result.step == 5
    pa, pb = params(ref_model), params(model)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_state_estimate_matches_the_real_state(tmp_path):
    cfg = _cfg(tmp_path)
    from fit_helpers import FakeTokenizer

    from llmtrain.engine.model import build_model

    model = build_model(cfg, FakeTokenizer(), None)
    opt = build_optimizer(cfg, model)
    loss = sum(p.float().square().sum() for p in model.parameters())
    loss.backward()
    opt.step()
    real = 0
    for s in opt.state.values():
        for k, v in s.items():
            # bitsandbytes keeps its 256-entry quantization maps per tensor: not state that
            # grows with the model, left out of the estimate
            if torch.is_tensor(v) and not k.startswith("qmap") and k != "step":
                real += v.numel() * v.element_size()
    est = optimizer_state_bytes("adamw8bit", model)
    assert est == real
    assert est < optimizer_state_bytes("adamw", model)


def test_paged_on_cpu_is_refused(tmp_path):
    cfg = lm_config(tmp_path)
    cfg["optim"]["name"] = "paged_adamw8bit"
    out = refused_by_validate(write_config(tmp_path / "c.yaml", cfg))
    assert "optim.name" in out and "CUDA" in out and "adamw8bit" in out


def test_missing_bitsandbytes_gets_the_install_hint(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    cfg = lm_config(tmp_path)
    cfg["optim"]["name"] = "adamw8bit"
    out = refused_by_validate(write_config(tmp_path / "c.yaml", cfg))
    assert "optim.name" in out and "pip install 'llmtrain[qlora]'" in out


def test_dry_run_shows_the_optimizer_state_and_the_loss_path(tmp_path):
    from typer.testing import CliRunner

    from llmtrain.cli import app

    cfg = lm_config(tmp_path)
    cfg["optim"]["name"] = "adamw8bit"  # fp32 (lm_config): torch's chunked loss runs
    res = CliRunner().invoke(app, ["fit", str(write_config(tmp_path / "c.yaml", cfg)), "--dry-run"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.replace("│", " ").split())
    assert "adamw8bit, state ≈" in text and "estimated" in text
    assert "torch's F.linear_cross_entropy" in text


def test_8bit_with_fsdp_is_refused(tmp_path):
    cfg = lm_config(tmp_path)
    cfg["optim"]["name"] = "adamw8bit"
    cfg["train"]["parallel"] = "fsdp"
    out = refused_by_validate(write_config(tmp_path / "c.yaml", cfg))
    assert "optim.name" in out and "fsdp" in out
