"""The peft methods by name (docs/training.md, "PEFT methods"): IA3, LoHa, LoKr, OFT and VeRA
keep LoRA's guarantees — checkpoints hold only the trainable tensors, accumulation is exact in
fp64, a kill and resume is bit-identical, `final/` is merged and `adapter/` loads with peft.

On a tiny BERT classifier (nn.Linear layers: peft's LoHa, LoKr and OFT do not adapt GPT-2's
Conv1D). One test per method, four short runs each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fit_helpers import FakeTokenizer, random_store, run_train
from peft_helpers import (
    adapter_weights,
    max_rel,
    peft_cfg,
    probe_copying_nothing,
    save_base,
    validate_model,
)
from safetensors.torch import load_file

from llmtrain.engine.checkpoint import list_checkpoints
from llmtrain.engine.faults import SimulatedKill
from llmtrain.engine.metrics import TIMING_FIELDS, read_metrics
from llmtrain.engine.model import build_model
from llmtrain.engine.optim import build_optimizer, set_lr
from llmtrain.engine.peft import trainable_state

# fp64: the two accumulations differ in the order of additions only (~1e-16 per operation);
# 1e-9 leaves room for 3 Adam steps amplifying that, far below any real difference.
TOL = 1e-9
METHODS = {
    "ia3": {},
    "loha": {"r": 4, "alpha": 8},
    "lokr": {"r": 4, "alpha": 8},
    "oft": {"options": {"oft_block_size": 4}},
    "vera": {"r": 4, "dropout": 0.0},
}


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("bases"), "bert")


def _cfg(out: Path, base: Path, method: str, **kw):
    train = {"save_every": 1, "keep_checkpoints": 3}
    return peft_cfg(out, base, peft={"method": method, **METHODS[method]}, train=train, **kw)


def _store():
    return random_store(24, seed=1, n_labels=3)


def _records(out: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING_FIELDS}
        for r in read_metrics(out / "metrics.jsonl")
    ]


def _merged_equals_adapter(out: Path, base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification as Auto

    f64 = torch.float64
    merged = Auto.from_pretrained(out / "final", dtype=f64).eval()
    assert not hasattr(merged, "peft_config")
    plain = Auto.from_pretrained(base, num_labels=3, dtype=f64)
    adapted = PeftModel.from_pretrained(plain, out / "adapter").eval()
    ids = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
    assert float((a - b).abs().max()) < 1e-8  # fp64: merging only reorders the arithmetic


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_keeps_every_guarantee(tmp_path, bert, monkeypatch, method):
    store = _store()
    ref = tmp_path / "ref"
    run_train(_cfg(ref, bert, method, micro=8), store, num_labels=3)
    # checkpoints: the trainable tensors only, and they trained (not just the head)
    fresh = trainable_state(build_model(_cfg(ref, bert, method), FakeTokenizer(), 3))
    saved = load_file(str(list_checkpoints(ref / "checkpoints")[-1] / "model.safetensors"))
    assert sorted(saved) == sorted(fresh)
    adapters = [k for k in fresh if "classifier" not in k]
    assert adapters and max(float((saved[k] - fresh[k]).abs().max()) for k in adapters) > 1e-4
    # exact accumulation: (micro 2, k 4) = (micro 8, k 1)
    small = tmp_path / "micro2"
    run_train(_cfg(small, bert, method, micro=2), store, num_labels=3)
    assert max_rel(adapter_weights(ref), adapter_weights(small)) < TOL
    # kill after step 2, resume: bit-identical
    out = tmp_path / "killed"
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:2")
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_cfg(out, bert, method, micro=8), store, num_labels=3)
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    run_train(_cfg(out, bert, method, micro=8), store, num_labels=3, resume="auto")
    a, b = adapter_weights(ref), adapter_weights(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(ref) == _records(out)
    _merged_equals_adapter(ref, bert)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_probe_leaves_the_model_as_it_was_and_copies_no_module(tmp_path, bert, monkeypatch, method):
    """As for LoRA (test_peft.py): the probe trains the live model, never a copy, and puts
    every tensor back — so it costs no memory beyond training itself."""
    probe = {"max_micro": 4, "memory_limit": "64GiB", "cache": False}
    cfg = _cfg(tmp_path, bert, method, batch={"micro_batch": "auto", "probe": probe})
    model = build_model(cfg, FakeTokenizer(), 3)
    assert probe_copying_nothing(cfg, model, monkeypatch).micro_batch == 4


# ---------------------------------------------------------------------------- LoRA+ and init
def test_lora_plus_gives_the_b_matrices_ratio_times_the_lr(tmp_path, bert):
    cfg = peft_cfg(tmp_path, bert, peft={"lr_ratio": 16.0})
    model = build_model(cfg, FakeTokenizer(), 3)
    optimizer = build_optimizer(cfg, model)
    set_lr(optimizer, 1e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(lr_of) == sorted(id(p) for _, p in named)  # every trainable, once
    fast = {n for n, p in named if lr_of[id(p)] == pytest.approx(16e-3)}
    assert fast == {n for n, _ in named if ".lora_B." in n} and fast
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for n, p in named if n not in fast)


def test_pissa_starts_at_the_base_model(tmp_path, bert):
    """PiSSA moves the principal part of W into the adapters and leaves the residual in the
    base: before training the adapted model computes what the base does. peft splits W in
    fp32 (the model is built in fp32, then cast to the run's dtype), so W_res + BA equals W to
    fp32 rounding: 1e-6 relative."""
    from transformers import AutoModelForSequenceClassification as Auto

    torch.manual_seed(0)
    plain = Auto.from_pretrained(bert, num_labels=3, dtype=torch.float64).eval()
    cfg = peft_cfg(tmp_path, bert, peft={"init": "pissa"})
    model = build_model(cfg, FakeTokenizer(), 3).eval()
    residual = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer
    original = plain.bert.encoder.layer[0].attention.self.query
    assert float((residual.weight - original.weight).abs().max()) > 1e-3  # W was split
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert float(layer.lora_B["default"].weight.abs().max()) > 1e-3  # and B A is not zero
    ids = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.base_model.model.bert(input_ids=ids).last_hidden_state
        expected = plain.bert(input_ids=ids).last_hidden_state
    assert float((hidden - expected).abs().max()) < 1e-6 * float(expected.abs().max())


def test_pissa_rebuilds_the_same_residual_base(tmp_path, bert):
    """What resume rests on: the frozen residual base is rebuilt bit-identically from
    model.pretrained (a checkpoint holds only the trainable tensors)."""
    cfg = peft_cfg(tmp_path, bert, peft={"init": "pissa"})
    a, b = (build_model(cfg, FakeTokenizer(), 3).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_adapter_loads_on_the_original_base(tmp_path, bert, init):
    """Their training changes the base; adapter/ is converted to a LoRA of the original base
    (rank 2r), so base + adapter/ is the trained model, as final/ (merged) is."""
    import json

    run_train(peft_cfg(tmp_path, bert, peft={"init": init}), _store(), num_labels=3)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert not (tmp_path / "adapter" / "initial").exists()
    _merged_equals_adapter(tmp_path, bert)


# ----------------------------------------------------------------------------- validation
def _validate(tmp_path: Path, base: Path, peft: str) -> str:
    model = f"  pretrained: {base}\n  task: sequence-classification\n  peft:\n{peft}"
    return validate_model(tmp_path, model, steps=4)


def test_options_are_checked_against_peft_s_config_class(tmp_path, bert):
    peft = "    method: ia3\n    options:\n      feedforward_module: [dense]\n      task_type: x\n"
    out = _validate(tmp_path, bert, peft)
    assert "c.yaml:8" in out and "model.peft.options.feedforward_module: not a field of " in out
    assert "did you mean 'feedforward_modules'?" in out
    assert "c.yaml:9" in out and "model.peft.options.task_type: is set by model.task" in out


def test_common_keys_a_method_does_not_read_are_refused(tmp_path, bert):
    out = _validate(tmp_path, bert, "    method: ia3\n    r: 8\n    init: pissa\n")
    assert "model.peft.r: does not apply to method ia3" in out
    assert "model.peft.init: only applies to model.peft.method lora | dora" in out
