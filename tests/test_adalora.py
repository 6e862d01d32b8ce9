"""AdaLoRA (docs/training.md, "AdaLoRA"): the rank allocator follows optimizer steps, the
orthogonal regularizer enters the exact objective once per step, and both survive accumulation,
DDP, a kill and resume; adapter/ keeps the final rank pattern and final/ is merged.

Schedules are tiny so that ranks are reallocated inside the tested steps: total 6 steps,
tinit 1, tfinal 1 → the budget shrinks at steps 2-4 (0-based) and is fixed at step 5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import run_function
from fit_helpers import FakeTokenizer, random_store, run_train
from peft_helpers import (
    adapter_weights,
    max_rel,
    peft_cfg,
    save_base,
    train_one_rank,
    validate_model,
)
from safetensors.torch import load_file

from llmtrain import plot
from llmtrain.commands import report as report_cmd
from llmtrain.engine import step as step_module
from llmtrain.engine.adalora import STATE_KEY
from llmtrain.engine.checkpoint import list_checkpoints
from llmtrain.engine.distributed import DistInfo
from llmtrain.engine.faults import SimulatedKill
from llmtrain.engine.metrics import TIMING_FIELDS, read_metrics
from llmtrain.engine.model import build_model
from llmtrain.engine.step import StepSpec, forward_backward, make_window
from llmtrain.errors import LLMTrainError

# fp64 throughout: the two accumulations differ only in the order of additions (~1e-16
# relative per operation); 1e-9 leaves room for 6 Adam steps amplifying it, and is far below
# what a regularizer counted k times, or a reallocation on other scores, would change.
TOL = 1e-9
ADALORA = {
    "method": "adalora",
    "init_r": 4,
    "target_r": 2,
    "tinit": 1,
    "tfinal": 1,
    "delta_t": 1,
    "orth_reg_weight": 0.3,
}
STEPS = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("bases"), "gpt2")


def _cfg(out: Path, base: Path, **kw):
    peft = {**ADALORA, **kw.pop("peft", {})}
    kw.setdefault("steps", STEPS)
    kw.setdefault("optim", {"lr": 3e-2})
    return peft_cfg(out, base, peft=peft, **kw)


def _last_state(out: Path, at: int = -1) -> tuple[dict, dict]:
    """(trainable tensors, allocator state) of the run's last (or `at`-th) checkpoint."""
    ckpt = list_checkpoints(out / "checkpoints")[at]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    return load_file(str(ckpt / "model.safetensors")), state[STATE_KEY]


def _rank_pattern(out: Path) -> dict[str, list[bool]]:
    return json.loads((out / "adapter" / "adapter_config.json").read_text())["rank_pattern"]


def _scores(state: dict) -> dict[str, torch.Tensor]:
    keys = ("ipt", "exp_avg_ipt", "exp_avg_unc")
    return {f"{k}/{n}": t for k in keys for n, t in state[k].items()}


# ----------------------------------------------------------------------- the objective
def _window_grads(cfg, store, micro: int) -> dict[str, torch.Tensor]:
    """Gradients of one window of 8 sequences, accumulated at `micro` by llmtrain."""
    model = build_model(cfg, FakeTokenizer(), None)
    spec = StepSpec.from_config(cfg)
    win = make_window(
        store, torch.arange(8).numpy(), spec, micro=micro, pad_id=0, dist=DistInfo(),
        device=torch.device("cpu"),
    )  # fmt: skip
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    forward_backward(model, opt, scaler, win, spec, device=torch.device("cpu"), dist=DistInfo())
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _fp64_mean_loss(logits, labels, vocab_size, **kwargs):
    """transformers' ForCausalLMLoss (mean over supervised tokens = sum / N), without its cast
    of the logits to fp32, so the reference stays fp64."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    return torch.nn.functional.cross_entropy(logits.view(-1, vocab_size), targets.reshape(-1))


def _peft_reference_grads(cfg, store) -> dict[str, torch.Tensor]:
    """peft's own AdaLoRA objective on the whole window: AdaLoraModel.forward adds w·R to the
    model's mean token loss (= sum / N) when given labels."""
    model = build_model(cfg, FakeTokenizer(), None)
    model.base_model.model.loss_function = _fp64_mean_loss
    spec = StepSpec.from_config(cfg)
    batch = make_window(
        store, torch.arange(8).numpy(), spec, micro=8, pad_id=0, dist=DistInfo(),
        device=torch.device("cpu"),
    ).batches[0]  # fmt: skip
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_window_objective_is_peft_s_own_with_r_once(tmp_path, base, monkeypatch):
    """(micro 2, k 4) gradients equal peft's one-batch loss + w·R, in fp64; left out, R's
    absence shows far beyond the tolerance (the second half fails if R is dropped)."""
    cfg = _cfg(tmp_path, base)
    store = random_store(8, seed=3)
    ref = _peft_reference_grads(cfg, store)
    ours = _window_grads(cfg, store, micro=2)
    assert max_rel(ref, ours) < TOL
    monkeypatch.setattr(step_module, "window_regularizer", lambda model, w: 0.0)
    assert max_rel(ref, _window_grads(cfg, store, micro=2)) > 1e-3


# -------------------------------------------------------------------- exact accumulation
def test_accumulation_is_exact_through_reallocations(tmp_path, base):
    """Adapters and allocator state after 6 steps of (micro 2, k 4) equal (micro 8, k 1);
    the scores are compared at step 4 (mid-reallocation: the last step resets them)."""
    runs = {}
    for micro in (2, 8):
        out = tmp_path / str(micro)
        train = {"save_every": 2, "keep_checkpoints": 3}
        run_train(_cfg(out, base, micro=micro, train=train), random_store(48, seed=1))
        runs[micro] = out
    pattern = _rank_pattern(runs[8])
    assert pattern == _rank_pattern(runs[2])
    kept = [sum(v) for v in pattern.values()]
    assert sum(kept) == 2 * len(kept) and len(set(kept)) > 1  # reallocated, not uniform
    for at in (-2, -1):  # steps 4 and 6
        (w8, s8), (w2, s2) = _last_state(runs[8], at), _last_state(runs[2], at)
        assert s8["rank_pattern"] == s2["rank_pattern"]
        assert max_rel(w8, w2) < TOL
    (_, s8), (_, s2) = _last_state(runs[8], -2), _last_state(runs[2], -2)
    assert len(_scores(s8)) == 3 * len(w8)  # every adapter tensor's scores (the head has none)
    assert max_rel(_scores(s8), _scores(s2)) < TOL
    assert max_rel(adapter_weights(runs[8]), adapter_weights(runs[2])) < TOL
    budgets = [r["rank_budget"] for r in read_metrics(runs[8] / "metrics.jsonl")]
    assert budgets[0] == 4 * len(kept) and budgets[-1] == 2 * len(kept)
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) > 2
    # `report` plots it against the step
    shown = plot.panels(report_cmd.load_runs([str(runs[8])]))
    assert ("rank_budget", "AdaLoRA total rank budget") in shown
    assert report_cmd.execute([str(runs[8])]).stat().st_size > 0


# ------------------------------------------------------------------------- kill and resume
def _records(out: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING_FIELDS}
        for r in read_metrics(out / "metrics.jsonl")
    ]


@pytest.mark.parametrize("kill_at", [3, 5])
def test_kill_and_resume_across_a_reallocation_is_bit_identical(
    tmp_path, base, monkeypatch, kill_at
):
    """tinit 1, tfinal 2 of 6: killed after step 3 the resumed run reallocates from restored
    scores; after step 5 it masks with the restored final pattern (the scores were reset)."""
    # fp32 and dropout: the RNG, the optimizer and the allocator must all come back.
    peft = {"dropout": 0.1, "tfinal": 2}
    kw = {"precision": "fp32", "micro": 3, "train": {"save_every": 1, "keep_checkpoints": 2}}
    store = random_store(48, seed=4)
    ref = tmp_path / "ref"
    run_train(_cfg(ref, base, peft=peft, **kw), store)
    out = tmp_path / "killed"
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", f"step_end:{kill_at}")
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_cfg(out, base, peft=peft, **kw), store)
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    _, saved = _last_state(out)
    assert saved["rank_pattern"] and (kill_at == 5 or saved["exp_avg_unc"])
    run_train(_cfg(out, base, peft=peft, **kw), store, resume="auto")
    a, b = adapter_weights(ref), adapter_weights(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _rank_pattern(ref) == _rank_pattern(out)
    assert _records(ref) == _records(out)


def test_a_lora_checkpoint_is_refused_by_an_adalora_resume(tmp_path, base):
    store = random_store(48, seed=1)
    run_train(peft_cfg(tmp_path, base, steps=2, train={"save_every": 1}), store)
    with pytest.raises(LLMTrainError, match=r"another model\.peft"):
        run_train(_cfg(tmp_path, base), store, resume="auto")


# ---------------------------------------------------------------------- adapter/ and final/
def test_adapter_keeps_the_rank_pattern_and_final_is_merged(tmp_path, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_train(_cfg(tmp_path, base, precision="fp32"), random_store(48, seed=1))
    pattern = _rank_pattern(tmp_path)
    assert not all(all(v) for v in pattern.values())  # some ranks pruned
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["total_step"] == STEPS  # the run's length, not a number kept in sync by hand
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    ).eval()
    for name, keep in pattern.items():  # reloaded at the pruned ranks
        layer = adapted.get_submodule("base_model.model." + name.rsplit(".", 1)[0])
        assert layer.lora_A["default"].shape[0] == sum(keep)
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (merged, adapted, plain))
    assert float((a - b).abs().max()) < 1e-5
    assert float((a - c).abs().max()) > 1e-4  # the adapters changed the model


# ------------------------------------------------------------------------------------ DDP
def _ddp_ranks(root: str, base: str) -> None:
    """2 gloo ranks, micro 2 × k 2 × world 2 = global 8."""
    train_one_rank(_cfg(Path(root) / "ddp", Path(base), micro=2), random_store(48, seed=1), 2)


@pytest.mark.slow
def test_two_ranks_reach_the_rank_pattern_of_one_process(tmp_path, base):
    run_function("test_adalora:_ddp_ranks", str(tmp_path), str(base))
    single = tmp_path / "single"
    run_train(_cfg(single, base, micro=8), random_store(48, seed=1))
    assert _rank_pattern(tmp_path / "ddp") == _rank_pattern(single)
    assert max_rel(adapter_weights(single), adapter_weights(tmp_path / "ddp")) < TOL


# ----------------------------------------------------------------------------- validation
def _validate(tmp_path: Path, base: Path, peft: str, steps: int = 10) -> str:
    return validate_model(tmp_path, f"  pretrained: {base}\n  peft:\n{peft}", steps=steps)


def test_schedule_rules_name_the_line(tmp_path, base):
    peft = "    method: adalora\n    init_r: 4\n    target_r: 4\n    tinit: 6\n    tfinal: 4\n"
    out = _validate(tmp_path, base, peft)
    assert "c.yaml:7" in out and "model.peft.target_r: must be smaller than" in out
    assert "c.yaml:9" in out and "tinit + tfinal = 10 must be smaller than" in out


def test_keys_of_another_method_are_refused(tmp_path, base):
    out = _validate(tmp_path, base, "    method: adalora\n    r: 8\n    lr_ratio: 16\n")
    assert "model.peft.r: does not apply to method adalora (use init_r / target_r)" in out
    assert "model.peft.lr_ratio: only applies to model.peft.method lora | dora" in out


def test_a_run_too_short_for_the_schedule_is_refused(tmp_path, base):
    """With train.epochs the length is known only from the data: refused before step 1."""
    cfg = _cfg(tmp_path, base, peft={"tinit": 3, "tfinal": 3})
    with pytest.raises(LLMTrainError, match=r"tinit 3 \+ tfinal 3 leaves no step of the run's 6"):
        run_train(cfg, random_store(48, seed=1))


def test_banner_shows_the_resolved_total_step(tmp_path, base):
    from rich.console import Console

    from llmtrain.commands.fit import banner
    from llmtrain.pipeline import Plan

    cfg = _cfg(tmp_path, base)
    model = build_model(cfg, FakeTokenizer(), None)
    plan = Plan(cfg, model, torch.device("cpu"), 2, 48, DistInfo())
    console = Console(width=200, record=True)
    console.print(banner(plan))
    assert f"rank 4 → 2 per matrix, total_step {STEPS}" in console.export_text()
