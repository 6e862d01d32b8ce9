"""model.activation_offload: the saved activations go to host memory and come back unchanged,
so the gradients equal those of a run without it, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fit_helpers import FakeTokenizer, make_cfg, random_store

from llmtrain.engine import step as step_mod
from llmtrain.engine.distributed import DistInfo
from llmtrain.engine.model import build_model
from llmtrain.engine.step import StepSpec, forward_backward, make_window, offloads


def _grads(cfg, spec, store):
    torch.manual_seed(0)
    model = build_model(cfg, FakeTokenizer(), None)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")
    win = make_window(store, np.arange(8), spec, micro=4, pad_id=0, dist=DistInfo(), device=cpu)
    forward_backward(model, opt, scaler, win, spec, device=cpu, dist=DistInfo())
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [True, False])
def test_offloaded_gradients_equal_the_plain_ones(tmp_path, monkeypatch, checkpointing):
    cfg = make_cfg(tmp_path, model={"gradient_checkpointing": checkpointing})
    store = random_store(8, seed=3)
    plain = StepSpec.from_config(cfg)
    assert not plain.activation_offload
    # forced on: on CPU fit would not offload (nothing to gain), but the hooks run the same
    forced = StepSpec.from_config(cfg).__class__(**{**plain.__dict__, "activation_offload": True})
    packed = []
    real = torch.autograd.graph.save_on_cpu

    class Counting(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(t.numel()) or pack(t)

    monkeypatch.setattr(step_mod.torch.autograd.graph, "save_on_cpu", Counting)
    a, b = _grads(cfg, plain, store), _grads(cfg, forced, store)
    assert packed, "the offload hooks never ran"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offload_applies_on_cuda_only(tmp_path):
    cfg = make_cfg(tmp_path, model={"gradient_checkpointing": True, "activation_offload": True})
    assert not offloads(cfg, torch.device("cpu"))
    assert offloads(cfg, torch.device("cuda"))
    assert StepSpec.from_config(cfg, None, torch.device("cuda")).activation_offload


def test_offload_without_checkpointing_is_refused(tmp_path):
    from run_helpers import lm_config, refused_by_validate, write_config

    cfg = lm_config(tmp_path)
    cfg["model"]["activation_offload"] = True
    out = refused_by_validate(write_config(tmp_path / "c.yaml", cfg))
    assert "model.activation_offload" in out and "gradient_checkpointing" in out


def test_cpu_says_once_that_offload_does_nothing(tmp_path, capsys):
    from llmtrain.engine.loop import show_offload_notice

    cfg = make_cfg(tmp_path, model={"gradient_checkpointing": True, "activation_offload": True})
    show_offload_notice(cfg, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "model.activation_offload has no effect on cpu" in " ".join(err.split())
    show_offload_notice(cfg, torch.device("cuda"))  # applies there: silent
    assert capsys.readouterr().err == ""
