"""The chunked causal-LM loss (`train.loss_chunk`, llmtrain/engine/loss.py; docs/architecture.md,
"Memory"): in fp64 the summed loss and the gradient of every parameter equal the plain path's
to 1e-10 — tied (GPT-2) and untied (Llama) output embeddings, an output bias (Phi), final-logit
soft-capping (Gemma 2), variable-length padded data, both normalizations, with accumulation —
and no tensor as large as the [batch, seq, vocab] logits is ever created. Models that do
something else with their head's output fall back to the plain path with a notice."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from fit_helpers import FakeTokenizer, make_cfg, max_rel_diff, params, random_store, run_train
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
)

from llmtrain.config.schema import TrainConfig
from llmtrain.data.batching import collate
from llmtrain.engine import loss as L
from llmtrain.engine.evaluate import evaluate
from llmtrain.engine.model import build_model
from llmtrain.engine.step import StepSpec

TOL = 1e-10
VOCAB = 64
CPU = torch.device("cpu")
SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}
LLAMA_TINY = {**SMALL, **HEADS, "tie_word_embeddings": False}


def gpt2() -> torch.nn.Module:
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=64)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return GPT2LMHeadModel(cfg)


def llama() -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **LLAMA_TINY))


def phi() -> torch.nn.Module:  # lm_head has a bias
    cfg = PhiConfig(vocab_size=VOCAB, **SMALL, num_attention_heads=2, max_position_embeddings=64)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attention_dropout = 0.0
    return PhiForCausalLM(cfg)


def gemma2() -> torch.nn.Module:  # final_logit_softcapping
    cfg = Gemma2Config(vocab_size=VOCAB, **SMALL, **HEADS, head_dim=8, final_logit_softcapping=3.0)
    return Gemma2ForCausalLM(cfg)


MODELS = {"gpt2-tied": gpt2, "llama-untied": llama, "phi-bias": phi, "gemma2-softcap": gemma2}


def fp64(make) -> torch.nn.Module:
    torch.manual_seed(0)
    return make().double()


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Five sequences of 2 to 15 tokens, right-padded the way `collate` pads them."""
    store = random_store(5, vocab=VOCAB, lo=2, hi=15, seed=seed)
    return collate(store, list(range(5)), pad_id=0, task="causal-lm")


def loss_and_grads(model, batch, chunk, normalization="tokens", precision="fp64"):
    """Summed loss and every parameter's gradient, by parameter name (of the unwrapped model)."""
    raw = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: names without a prefix
    raw.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    summed = L.model_loss(
        model,
        inputs,
        batch["labels"],
        task="causal-lm",
        normalization=normalization,
        precision=precision,
        device=batch["input_ids"].device,
        loss_chunk=chunk,
    )
    summed.backward()
    grads = {n: p.grad.detach().clone() for n, p in raw.named_parameters() if p.grad is not None}
    return float(summed.detach()), grads


@pytest.mark.parametrize("normalization", ["tokens", "sequences"])
@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_every_gradient_equal_the_plain_path_in_fp64(name, normalization):
    model = fp64(MODELS[name])
    batch = padded_batch()
    assert (batch["labels"] == -100).any()  # padding really is there
    loss, grads = loss_and_grads(model, batch, None, normalization)
    for chunk in (3, 4096):  # many chunks with a short last one; one chunk
        loss_c, grads_c = loss_and_grads(model, batch, chunk, normalization)
        assert abs(loss_c - loss) <= TOL * abs(loss)
        assert grads_c.keys() == grads.keys() == dict(model.named_parameters()).keys()
        assert max_rel_diff(grads, grads_c) < TOL
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == {"gpt2-tied": True, "llama-untied": False}.get(name, tied)


def test_the_plain_path_differs_on_the_same_data_without_the_softcap():
    """Gemma 2's cap changes the loss, so the equality above really covers it."""
    model = fp64(gemma2)
    batch = padded_batch()
    loss, _ = loss_and_grads(model, batch, 3)
    model.config.final_logit_softcapping = None
    uncapped, _ = loss_and_grads(model, batch, 3)
    assert abs(uncapped - loss) > 1e-6 * abs(loss)


class LargestTensor(TorchDispatchMode):
    """The element count of the largest tensor any aten op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("make", [gpt2, llama])
def test_no_tensor_as_large_as_the_logits_ever_exists(make):
    torch.manual_seed(0)
    model = make()
    vocab = 512
    model.resize_token_embeddings(vocab)
    ids = torch.randint(2, vocab, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    logits_numel = ids.numel() * vocab
    sizes = {}
    for chunk in (None, 8):
        with LargestTensor() as seen:
            loss_and_grads(model, batch, chunk, precision="fp32")
        sizes[chunk] = seen.largest
    assert sizes[None] >= logits_numel  # the plain path holds the logits: the probe sees them
    hidden = model.config.hidden_size
    assert sizes[8] <= max(8 * vocab, vocab * hidden) < logits_numel


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_accumulated_chunked_steps_equal_one_plain_batch(tmp_path, arch):
    """(micro 2, k 4, chunk 3) and (micro 8, k 1, auto) train exactly as (micro 8, k 1, off)."""
    store = random_store(20, seed=1)
    model = {} if arch == "gpt2" else {"arch": "llama", "config": LLAMA_TINY}
    if arch == "llama":
        model["config_overrides"] = {}

    def cfg(micro: int, chunk):
        out = tmp_path / f"{micro}-{chunk}"
        return make_cfg(out, micro=micro, model=model, train={"loss_chunk": chunk})

    def run(micro: int, chunk):
        return params(run_train(cfg(micro, chunk), store)[0])

    plain = run(8, "off")
    init = params(build_model(cfg(8, "off"), FakeTokenizer(), None))
    assert max_rel_diff(init, plain) > 1e-3  # training really moved the weights
    assert max_rel_diff(plain, run(2, 3)) < TOL
    assert max_rel_diff(plain, run(8, "auto")) < TOL


def test_auto_is_the_default_and_chunks_causal_lm_only():
    assert TrainConfig().loss_chunk == "auto"
    model = fp64(gpt2)
    assert L.resolve_loss_chunk("auto", model, "causal-lm") == L.LossChunk(L.auto_chunk(VOCAB))
    assert L.resolve_loss_chunk(7, model, "causal-lm") == L.LossChunk(7)
    assert L.resolve_loss_chunk("off", model, "causal-lm") == L.LossChunk(None)
    assert L.resolve_loss_chunk("auto", model, "sequence-classification") == L.LossChunk(None)
    # 128k vocabulary: 512 tokens of fp32 logits per chunk (256 MiB); bounded both ways
    assert (L.auto_chunk(128_256), L.auto_chunk(50_257), L.auto_chunk(64)) == (512, 1024, 4096)
    assert L.auto_chunk(10**7) == L.AUTO_MIN


class OddLinear(torch.nn.Linear):
    """A head that is a Linear subclass (as a quantized one would be): not chunked."""


def test_other_heads_fall_back_to_full_logits_with_one_notice(capsys):
    torch.manual_seed(0)
    odd = gpt2()
    odd.lm_head = OddLinear(16, VOCAB, bias=False)
    cohere = CohereForCausalLM(CohereConfig(vocab_size=VOCAB, **SMALL, **HEADS, logit_scale=0.5))
    for model, why in ((odd, "not a linear layer"), (cohere, "changes the output embedding")):
        chunk = L.resolve_loss_chunk("auto", model, "causal-lm")
        assert chunk.tokens is None and why in chunk.notice
        assert chunk.notice.startswith(f"train.loss_chunk: {type(model).__name__}: ")
        L.show_notice(chunk)
        L.show_notice(chunk)  # the probe and the loop both resolve: printed once
    err = capsys.readouterr().err
    assert err.count("train.loss_chunk: GPT2LMHeadModel") == 1
    assert err.count("train.loss_chunk: CohereForCausalLM") == 1


def test_eval_loss_is_the_same_chunked():
    model = fp64(llama)
    store = random_store(11, vocab=VOCAB, seed=3)
    spec = StepSpec("causal-lm", "tokens", "fp64", None)
    kw = {"micro": 4, "pad_id": 0, "device": CPU}
    plain = evaluate(model, store, spec, **kw)
    chunked = evaluate(model, store, replace(spec, loss_chunk=3), **kw)
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-12)
    assert model.training  # eval put the mode back


def test_bf16_chunked_loss_is_close_to_the_plain_path():
    """Under autocast the chunk's matmuls run in bf16 as F.linear's would; logits are upcast to
    fp32 inside the chunk, so the loss agrees to bf16 rounding."""
    torch.manual_seed(0)
    model = llama()
    batch = padded_batch()
    loss, grads = loss_and_grads(model, batch, None, precision="bf16")
    loss_c, grads_c = loss_and_grads(model, batch, 3, precision="bf16")
    assert loss_c == pytest.approx(loss, rel=1e-2)
    assert max_rel_diff(grads, grads_c) < 5e-2


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_chunked_step_matches_and_never_allocates_the_logits(precision):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32_000, **LLAMA_TINY)).to(device)
    ids = torch.randint(2, 32_000, (4, 512), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    results = {}
    for chunk in (None, 256):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        summed = L.model_loss(
            model,
            {"input_ids": ids, "attention_mask": batch["attention_mask"]},
            ids,
            task="causal-lm",
            normalization="tokens",
            precision=precision,
            device=device,
            loss_chunk=chunk,
        )
        summed.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.double().cpu() for n, p in model.named_parameters()}
        results[chunk] = (float(summed), grads, torch.cuda.max_memory_allocated() - base)
    logits_bytes = ids.numel() * 32_000 * 4
    assert results[None][2] > logits_bytes  # the plain step holds fp32 logits
    assert results[256][2] < logits_bytes / 2
    rel = 1e-5 if precision == "fp32" else 2e-2
    assert results[256][0] == pytest.approx(results[None][0], rel=rel)
    assert max_rel_diff(results[None][1], results[256][1]) < (1e-4 if precision == "fp32" else 5e-2)


@pytest.mark.cuda
def test_cuda_compiled_model_trains_the_chunked_loss_like_eager():
    """torch.compile traces the model; the chunked head runs eagerly inside it (one graph
    break) and the same object stands in every micro-batch, so nothing recompiles."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = llama().to(device)
    compiled = torch.compile(model)
    batch = {k: v.to(device) for k, v in padded_batch().items()}
    eager = loss_and_grads(model, batch, 3, precision="fp32")
    for _ in range(2):  # the second call reuses the compiled graph
        again = loss_and_grads(compiled, batch, 3, precision="fp32")
    assert again[0] == pytest.approx(eager[0], rel=1e-5)
    assert max_rel_diff(eager[1], again[1]) < 1e-4


def test_a_peft_wrapped_model_is_chunked_and_exact():
    """LoRA on every linear layer (peft excludes the output layer): the head is found through
    the PeftModel, and only the adapters' gradients exist — equal to the plain path's."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        fp64(llama),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    assert L.resolve_loss_chunk("auto", model, "causal-lm").tokens == L.auto_chunk(VOCAB)
    batch = padded_batch()
    loss, grads = loss_and_grads(model, batch, None)
    loss_c, grads_c = loss_and_grads(model, batch, 3)
    assert abs(loss_c - loss) <= TOL * abs(loss)
    assert grads.keys() == grads_c.keys() and all("lora_" in k for k in grads)
    assert max_rel_diff(grads, grads_c) < TOL


# ------------------------------------------------------------- torch's linear_cross_entropy
@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyOptions"), reason="torch < 2.13")
@pytest.mark.parametrize("bias", [True, False])
def test_torch_linear_cross_entropy_equals_ours_in_fp64(bias):
    """torch 2.13's chunked F.linear_cross_entropy against llmtrain's, same chunk, fp64: the
    loss and the gradients of hidden, weight and bias. Both sum the same fp64 terms in another
    order, so they agree to rounding: 1e-12 relative (fp64 eps 2.2e-16 × a few hundred terms,
    with margin); a wrong chunk, a missed row or a dropped bias gradient is off by far more."""
    from llmtrain.engine.loss import linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    n, hidden, vocab = 203, 24, 517  # a short last chunk
    h = torch.randn(n, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(vocab, generator=gen, dtype=torch.float64).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=gen)
    inputs = (h, w, b) if bias else (h, w)
    ours = linear_cross_entropy(h, w, b, t, chunk=32, own=True)
    g_ours = torch.autograd.grad(ours, inputs)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=32, chunking_method=None)
    theirs = F.linear_cross_entropy(h, w, t, linear_bias=b, reduction="sum", options=opts)
    g_theirs = torch.autograd.grad(theirs, inputs)
    ours, theirs = ours.detach(), theirs.detach()
    assert abs(float(ours - theirs)) <= 1e-12 * abs(float(ours))
    for a, c in zip(g_ours, g_theirs, strict=True):
        assert float((a - c).abs().max()) <= 1e-12 * float(c.abs().max())
    # and the dispatch takes torch's here (fp64, no weights, no softcap): the same value
    auto = linear_cross_entropy(h, w, b, t, chunk=32)
    assert abs(float(auto.detach() - theirs)) <= 1e-12 * abs(float(theirs))


def test_which_chunked_loss_runs():
    from llmtrain.engine.loss import TORCH_LCE, own_loss_reason

    f32, bf16 = torch.float32, torch.bfloat16
    expect_torch = None if TORCH_LCE is not None else own_loss_reason(f32, f32, f32, False, None)
    assert own_loss_reason(f32, f32, f32, False, None) == expect_torch
    assert "sequences" in own_loss_reason(f32, f32, f32, True, None)
    assert "final_logit_softcapping" in own_loss_reason(f32, f32, f32, False, 30.0)
    if TORCH_LCE is not None:
        assert "mixed precision" in own_loss_reason(bf16, f32, f32, False, None)
        assert "mixed precision" in own_loss_reason(bf16, bf16, bf16, False, None)
