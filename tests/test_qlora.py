"""QLoRA (docs/training.md, "Frozen and quantized weights"): `model.quantize` loads the base
through transformers' BitsAndBytesConfig (bitsandbytes runs nf4 forward and backward on CPU),
LoRA trains over it with the guarantees of any PEFT run — exact accumulation, bit-exact resume
(the base is rebuilt from model.pretrained: quantizing is deterministic), checkpoints of the
adapters only — and `final/` is the base dequantized with the adapters merged in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from fit_helpers import FakeTokenizer, random_store, run_train
from peft_helpers import adapter_weights
from qlora_helpers import NF4, llama_cfg, save_llama
from run_helpers import refused_by_validate, write_config, write_corpus
from safetensors import safe_open

from llmtrain.engine.checkpoint import list_checkpoints
from llmtrain.engine.faults import SimulatedKill
from llmtrain.engine.model import build_model, frozen_kinds, total_parameters, weight_bytes
from llmtrain.engine.quantize import is_quantized
from llmtrain.errors import LLMTrainError

pytest.importorskip("bitsandbytes")

SGD = {"name": "sgd", "lr": 0.5, "momentum": 0.9}  # each update linear in the gradient


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("qbase"))


def _store(n: int = 16, seed: int = 1):
    return random_store(n, seed=seed)


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max|a|: each adapter tensor against its own scale (B
    starts at zero, so its scale is the update; a global scale would hide B behind A)."""
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)


def test_the_base_is_4bit_and_only_adapters_train(tmp_path, base):
    import bitsandbytes as bnb

    cfg = llama_cfg(tmp_path, base, quantize=NF4, precision="bf16")
    model = build_model(cfg, FakeTokenizer(), None)
    assert is_quantized(model)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())  # fp32 master adapters
    assert frozen_kinds(model) == ["bfloat16", "nf4"]  # embeddings and norms stay bf16
    plain = build_model(llama_cfg(tmp_path, base, precision="bf16"), FakeTokenizer(), None)
    _, frozen_q = weight_bytes(model)
    _, frozen_bf16 = weight_bytes(plain)
    assert frozen_q < 0.75 * frozen_bf16  # the linear layers at ~4.1 bits instead of 16
    assert total_parameters(model) == total_parameters(plain)  # 4-bit weights count in full


def test_qlora_accumulation_is_exact_in_fp32(tmp_path, base):
    """(micro 2, k 4) against (micro 8, k 1) on a 4-bit base with fp32 compute. SGD, so each
    update is linear in the gradient. The runs differ only in how fp32 sums are grouped
    (per-micro-batch matmuls, then the accumulation), so each adapter tensor agrees to a few
    hundred fp32 ulps (unit roundoff 6e-8): bound 2e-5 relative. The mean-of-micro-means
    error this guards against is of order 1e-2 with these unequal lengths."""
    kw = {"quantize": NF4, "precision": "fp32", "steps": 3, "optim": SGD}
    run_train(llama_cfg(tmp_path / "m2", base, micro=2, **kw), _store())
    run_train(llama_cfg(tmp_path / "m8", base, micro=8, **kw), _store())
    a, b = adapter_weights(tmp_path / "m2"), adapter_weights(tmp_path / "m8")
    assert _rel(a, b) < 2e-5
    # and the same adapters over the mean of micro-batch means are far off (the bound bites)
    run_train(
        llama_cfg(tmp_path / "seq", base, micro=2, train={"loss_normalization": "sequences"}, **kw),
        _store(),
    )
    assert _rel(a, adapter_weights(tmp_path / "seq")) > 1e-3


def test_gradient_checkpointing_gives_the_same_qlora_adapters(tmp_path, base):
    """What the 8B recipe runs: checkpointed blocks over a 4-bit base still train the adapters
    inside them (peft turns the embeddings' input grads on), to fp32 rounding of the recompute
    (same bound and reason as the accumulation test)."""
    kw = {"quantize": NF4, "precision": "fp32", "steps": 2, "optim": SGD}
    run_train(llama_cfg(tmp_path / "plain", base, **kw), _store())
    ckpt = llama_cfg(tmp_path / "ckpt", base, model={"gradient_checkpointing": True}, **kw)
    run_train(ckpt, _store())
    assert _rel(adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "ckpt")) < 2e-5


def _resume_cfg(out, base):
    return llama_cfg(
        out,
        base,
        quantize=NF4,
        precision="bf16",
        peft={"dropout": 0.1},  # resume must restore the RNG as well
        micro=2,
        steps=4,
        train={"save_every": 2, "keep_checkpoints": 3},
    )


def test_checkpoints_hold_adapters_and_resume_is_bit_exact(tmp_path, base, monkeypatch):
    ref = tmp_path / "ref"
    run_train(_resume_cfg(ref, base), _store())
    ckpt = list_checkpoints(ref / "checkpoints")[-1]
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)  # no base weight, quantized or not
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(keys)

    out = tmp_path / "killed"
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:3")
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_resume_cfg(out, base), _store())
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    _, result = run_train(_resume_cfg(out, base), _store(), resume="auto")
    assert result.step == 4
    a, b = adapter_weights(ref), adapter_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_final_is_the_dequantized_base_with_adapters_merged(tmp_path, base):
    """final/ loads with plain from_pretrained (no quantization_config), in the compute dtype;
    in fp32 compute its logits equal adapter-on-4-bit within fp32 rounding of the merge
    (W + s·BA summed once instead of two matmuls): 1e-4 on logits of size ~1."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = llama_cfg(tmp_path, base, quantize=NF4, precision="fp32", optim={"lr": 5e-2})
    run_train(cfg, _store())
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(str(tmp_path / "final" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    quantized = build_model(
        llama_cfg(tmp_path / "q", base, quantize=NF4, precision="fp32"), FakeTokenizer(), None
    )
    adapted = PeftModel.from_pretrained(quantized.unload(), tmp_path / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (merged, adapted, plain))
    assert float((a - b).abs().max()) < 1e-4
    assert float((a - c).abs().max()) > 1e-2  # the adapters (and the nf4 rounding) show


def test_8bit_base_trains_on_cpu(tmp_path, base):
    import bitsandbytes as bnb

    cfg = llama_cfg(tmp_path, base, quantize={"bits": 8}, precision="fp32", steps=2)
    assert any(
        isinstance(m, bnb.nn.Linear8bitLt)
        for m in build_model(cfg, FakeTokenizer(), None).modules()
    )
    run_train(cfg, _store())
    assert any(
        float(t.abs().max()) > 0 for k, t in adapter_weights(tmp_path).items() if "lora_B" in k
    )


def _ddp_ranks(root: str, base: str) -> None:
    """2 gloo ranks, micro 2 x k 2 x world 2 = global 8, QLoRA in fp32 compute."""
    from llmtrain.engine.distributed import setup, teardown
    from llmtrain.engine.loop import train

    torch.set_num_threads(1)
    dist = setup(torch.device("cpu"))
    try:
        cfg = llama_cfg(Path(root) / "ddp", Path(base), quantize=NF4, precision="fp32",
                        micro=2, optim=SGD)  # fmt: skip
        tok = FakeTokenizer()
        model = build_model(cfg, tok, None)
        train(cfg, model, tok, _store(), None, micro_batch=2, device=torch.device("cpu"), dist=dist)
    finally:
        teardown()


@pytest.mark.slow
def test_qlora_under_ddp_equals_one_process(tmp_path, base):
    """The same bound as the accumulation test: only the grouping of fp32 sums differs."""
    from dist_helpers import run_function

    run_function("test_qlora:_ddp_ranks", str(tmp_path), str(base))
    single = tmp_path / "single"
    run_train(llama_cfg(single, base, quantize=NF4, precision="fp32", micro=8, optim=SGD), _store())
    assert _rel(adapter_weights(single), adapter_weights(tmp_path / "ddp")) < 2e-5


# ------------------------------------------------------------------------------- validation
def _validate(tmp_path, base, model_extra: str, train_extra: str = "") -> str:
    corpus = write_corpus(tmp_path / "c.txt", 20)
    text = (
        "model:\n"
        f"  pretrained: {base}\n"
        f"{model_extra}"
        f"data: {{train: {{path: {corpus}}}, chunk: {{seq_len: 32}}}}\n"
        "tokenizer: {train: {vocab_size: 128}}\n"
        f"train: {{max_steps: 1{train_extra}}}\n"
    )
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return refused_by_validate(path)


def test_quantize_without_peft_names_both_keys(tmp_path, base):
    out = _validate(tmp_path, base, "  quantize: {bits: 4}\n")
    assert (
        "x.yaml:3:3: model.quantize: a quantized base cannot be fine-tuned in full: add model.peft"
        in out
    )


def test_8bit_with_fsdp_and_fp64_are_refused(tmp_path, base):
    out = _validate(
        tmp_path,
        base,
        "  peft: {r: 4}\n  quantize: {bits: 8}\n",
        ", parallel: fsdp, precision: fp64",
    )
    assert "train.parallel: fsdp is not supported with model.quantize.bits: 8" in out
    assert "train.precision: fp64 is not supported with model.quantize" in out


def test_4bit_with_fsdp_is_accepted(tmp_path, base):
    # fp64 is refused (validate must fail to return its output); fsdp is not
    extra = ", parallel: fsdp, precision: fp64"
    out = _validate(tmp_path, base, "  peft: {r: 4}\n  quantize: {bits: 4}\n", extra)
    assert "train.precision: fp64 is not supported" in out and "train.parallel" not in out


def test_4bit_options_with_bits_8_are_refused_with_their_line(tmp_path, base):
    out = _validate(tmp_path, base, "  peft: {r: 4}\n  quantize:\n    bits: 8\n    type: nf4\n")
    assert "x.yaml:6:5: model.quantize.type: applies to bits: 4 only" in out


def test_frozen_dtype_that_the_forward_would_not_meet_is_refused(tmp_path, base):
    out = _validate(tmp_path, base, "  peft: {r: 4}\n  frozen_dtype: bf16\n", ", precision: fp32")
    assert "model.frozen_dtype: bf16 does not go with train.precision: fp32" in out
    assert "use auto, fp32 or fp32" not in out


def test_missing_bitsandbytes_is_a_one_line_hint(tmp_path, base, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(
        LLMTrainError, match=r"needs the bitsandbytes package: pip install 'llmtrain\[qlora\]'"
    ):
        build_model(llama_cfg(tmp_path, base, quantize=NF4), FakeTokenizer(), None)
    out = _validate(tmp_path, base, "  peft: {r: 4}\n  quantize: {bits: 4}\n")
    assert "model.quantize: needs the bitsandbytes package: pip install 'llmtrain[qlora]'" in out


# ---------------------------------------------------------------------- using a QLoRA run
def test_generate_and_evaluate_use_a_qlora_run(tmp_path, tok_dir):
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from llmtrain.cli import app
    from llmtrain.config import load_config
    from llmtrain.pipeline import fit

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    llama = save_llama(tmp_path, vocab_size=vocab)
    cfg = {
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu", "threads": 1},
        "model": {"pretrained": str(llama), "peft": {"r": 4}, "quantize": NF4},
        "tokenizer": {"path": str(tok_dir)},
        "data": {
            "train": {"path": str(write_corpus(tmp_path / "c.txt", 60)), "split": "paragraphs"},
            "eval_fraction": 0.2,
            "chunk": {"seq_len": 32},
        },
        "batch": {"global_batch": 4, "micro_batch": 4},
        "train": {"max_steps": 2, "precision": "bf16"},
        "log": {"progress": False},
    }
    fit(load_config(write_config(tmp_path / "q.yaml", cfg)))
    res = CliRunner().invoke(
        app,
        ["generate", str(tmp_path / "run"), "--prompt", "the", "--max-new-tokens", "4", "--json"],
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    from_final = json.loads(res.stdout)["loss"]
    # a checkpoint: the quantized base is built again from model.pretrained, adapters loaded
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    args = ["evaluate", str(tmp_path / "run"), "--checkpoint", str(ckpt), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert abs(json.loads(res.stdout)["loss"] - from_final) < 0.05 * from_final


def test_shipped_8b_recipe_validates_with_a_stand_in(tmp_path, monkeypatch):
    """configs/llama-8b-qlora.yaml with a tiny Llama (and a tokenizer with a chat template)
    where the 8B would be: the recipe's keys and values pass every rule."""
    from test_chunk import bpe_tokenizer
    from typer.testing import CliRunner

    from llmtrain.cli import app

    root = Path(__file__).resolve().parents[1]
    tok = bpe_tokenizer()
    tok.chat_template = (root / "configs" / "chat-template.jinja").read_text()
    model = save_llama(tmp_path, vocab_size=len(tok), max_position_embeddings=4096)
    tok.save_pretrained(model)
    monkeypatch.chdir(root)
    sets = ["--set", f"model.pretrained={model}", "--set", f"tokenizer.path={model}"]
    res = CliRunner().invoke(app, ["validate", "configs/llama-8b-qlora.yaml", *sets])
    assert res.exit_code == 0, res.output
