"""Summed losses, so the loop — not the model — decides the normalizer; and the chunked
causal-LM loss, which never holds the whole [batch, seq, vocab] logits.

A model's own `loss` is a mean over *its* micro-batch; averaging those means over k
micro-batches weights short micro-batches wrongly (transformers PRs #34191/#34198). Here each
micro-batch returns a *sum*, and the loop divides by N, the count of the whole window.

Chunked loss (`train.loss_chunk`, docs/architecture.md, "Memory"). With a 128k vocabulary the
logits are the largest tensor of a step (8,192 tokens × 128,256 × 4 bytes = 4.2 GB, and as much
again for their gradient). `model_loss` therefore lets the model run as usual — through its
DDP/FSDP/torch.compile wrappers, so gradient sync, `no_sync` and FSDP's unsharding keep
working — but for the duration of the call replaces the *forward of the output embedding*
(`get_output_embeddings()`, an `nn.Linear`) with `ChunkedHead`: given the final hidden states it
returns the summed cross-entropy instead of logits. Why there and not after the model: inside
that forward the weight is exactly what the model itself would use (FSDP has just all-gathered
it; a tied embedding is the same Parameter), and no wrapper needs to know.

`ChunkedHead` keeps only the supervised positions (label ≠ IGNORE: padding, the last position,
document starts, later prompt tokens) *before* the projection, then `linear_cross_entropy` runs
the projection and the cross-entropy over chunks of `loss_chunk` of those positions, upcasting
each chunk's logits to fp32 inside the chunk only (torchtune PR #1390: upcasting the whole
tensor doubles it). Like Liger's fused linear cross-entropy, each chunk's gradient with respect
to the hidden states and the weight is computed in the forward while the chunk's logits exist,
and backward only scales it by the incoming gradient: three matmuls per chunk, as many as the
plain path, where recomputing the logits in backward (torchtune/torchtitan with checkpointing,
Apple's Cut Cross-Entropy without the fused kernel) costs a fourth — and with a large
vocabulary the head is most of a small model's compute. The price is a weight-sized gradient
buffer held from the end of the forward to the start of the backward (a few hundred MB at a
128k vocabulary; the logits it replaces are ~tokens/hidden times larger). torch 2.13's own
`F.linear_cross_entropy(options=...)` does the same (gradients in the forward, chunk by chunk)
and runs instead of ours where it computes the same thing: fp32 or fp64 compute, no per-token
weights (`loss_normalization: sequences`) and no soft-capping; under bf16/fp16 autocast it
would return the loss and the head's gradients in bf16/fp16, so ours runs (`own_loss_reason`).
Soft-capping (`final_logit_softcapping`, Gemma 2) is applied inside the chunk, and the
config's value is cleared for the call so the model does not apply it again. Any model whose
output embedding is not a plain `nn.Linear`, or whose forward does anything else with the
head's output (checked once on a tiny input, `check_chunked_head`), falls back to `off` with a
one-line notice.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmtrain.console import say
from llmtrain.data.batching import IGNORE
from llmtrain.engine.parallel import unwrap
from llmtrain.engine.precision import AUTOCAST_DTYPES, autocast_context, param_dtype

# `loss_chunk: auto`: the largest power of two of tokens whose fp32 logits fit in this many bytes,
# within [AUTO_MIN, AUTO_MAX] tokens (128k vocabulary: 512 tokens, 262 MB; 50k: 1,024; 32k:
# 2,048). Large enough that each chunk's matmuls run at full speed on a GPU, small enough that
# the chunk is a small share of any device's memory.
AUTO_CHUNK_BYTES = 256 * 2**20
AUTO_MIN, AUTO_MAX = 256, 4096


def summed_loss(
    logits: torch.Tensor, labels: torch.Tensor, task: str, normalization: str = "tokens"
) -> torch.Tensor:
    """Sum of per-target losses (fp32 or wider): the window divides it by N.

    causal-lm/tokens: sum of next-token cross-entropies over supervised positions;
    causal-lm/sequences: sum over sequences of each sequence's mean token loss;
    classification: sum of per-sequence cross-entropies.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if task == "sequence-classification":
        return F.cross_entropy(logits, labels, reduction="sum")
    # Shift the labels, not the logits: position t predicts token t+1, and the last position
    # predicts nothing. Slicing the logits would copy a (batch × seq × vocab) tensor.
    targets = shifted_targets(labels)
    flat = logits.reshape(-1, logits.shape[-1])
    if normalization == "tokens":
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    per_token = F.cross_entropy(
        flat, targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)
    counts = (targets != IGNORE).sum(dim=1)
    per_seq = per_token.sum(dim=1) / counts.clamp(min=1)
    return per_seq.sum()


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target of every position: the next label, IGNORE for the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


# ------------------------------------------------------------------ the chunked computation
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where logits, the loss and the weight gradient accumulate: fp32, or fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i · CE(softcap(h_i · Wᵀ + b), t_i) over rows of `hidden`, chunk by chunk, with
    the gradients computed in the forward (module docstring). Backward may run once."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # [n, H] supervised positions only
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        targets: torch.Tensor,  # [n] in [0, V)
        token_weights: torch.Tensor | None,  # [n]; None = all 1
        chunk: int,
        softcap: float | None,
        dtype: torch.dtype,  # of the matmuls: the autocast dtype, else the weight's
        grad_enabled: bool,  # grad mode of the caller (inside forward it is always off)
    ) -> torch.Tensor:
        need = tuple(grad_enabled and n for n in ctx.needs_input_grad)
        acc = _acc_dtype(dtype)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        n, vocab = hidden.shape[0], weight.shape[0]
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need[1] else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need[2] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                h = hidden[start:end].to(dtype)
                tw = token_weights[start:end] if token_weights is not None else None
                part, g = _chunk_loss(h, w, b, targets[start:end], tw, softcap, acc, any(need[:3]))
                loss += part
                if g is None:
                    continue
                if grad_h is not None:
                    grad_h[start:end] = g @ w
                if grad_w is not None and g.dtype == acc:
                    grad_w.addmm_(g.t(), h)
                elif grad_w is not None:  # a bf16/fp16 product, summed over chunks in fp32
                    grad_w += g.t() @ h
                if grad_b is not None:
                    grad_b += g.sum(0, dtype=acc)
                del g, h
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("the chunked loss backpropagates once (no retain_graph)")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # handed over: autograd may keep them as .grad without a copy
        w_dtype, b_dtype = ctx.dtypes
        out = [
            grad_h.mul_(grad_out) if grad_h is not None else None,
            grad_w.mul_(grad_out).to(w_dtype) if grad_w is not None else None,
            grad_b.mul_(grad_out).to(b_dtype) if grad_b is not None else None,
        ]
        return (*out, None, None, None, None, None, None)


def _chunk_loss(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None,
    softcap: float | None,
    acc: torch.dtype,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's summed loss, and d loss / d logits in the matmul dtype (None unless
    `need_grad`). Every [chunk, V] temporary dies here."""
    logits = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
    z = logits.to(acc)  # the upcast, inside the chunk only
    del logits
    capped = None
    if softcap is not None:
        capped = torch.tanh(z / softcap)
        z = capped * softcap
    rows = torch.arange(z.shape[0], device=z.device)
    target_logit = z[rows, targets]
    peak = z.amax(dim=1, keepdim=True)
    p = z.sub_(peak).exp_()  # in place: z is not needed any more
    total = p.sum(dim=1, keepdim=True)
    per_token = (peak + total.log()).squeeze(1) - target_logit
    loss = (per_token * token_weights).sum() if token_weights is not None else per_token.sum()
    if not need_grad:
        return loss, None
    p.div_(total)  # softmax
    p[rows, targets] -= 1.0
    if token_weights is not None:
        p.mul_(token_weights[:, None])
    if capped is not None:  # d softcap·tanh(x/softcap) / dx = 1 − tanh²
        p.mul_(capped.mul_(capped).neg_().add_(1.0))
    return loss, p.to(h.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    chunk: int,
    softcap: float | None = None,
    own: bool = False,
) -> torch.Tensor:
    """sum_i w_i · cross_entropy(softcap(hidden_i · weightᵀ + bias), targets_i), never holding
    more than `chunk` rows of logits. Under autocast the matmuls run in the autocast dtype, as
    `F.linear` would; logits, loss and the weight gradient accumulate in fp32 (fp64 for fp64).
    torch's own chunked op runs where it computes the same thing (`own_loss_reason`), unless
    `own` (the comparisons in tests and scripts/bench_memory.py)."""
    device = hidden.device.type
    dtype = weight.dtype
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    chunk = max(1, int(chunk))
    weighted = token_weights is not None
    if not own and own_loss_reason(dtype, hidden.dtype, weight.dtype, weighted, softcap) is None:
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, chunking_method=None)
        return F.linear_cross_entropy(
            hidden, weight, targets, linear_bias=bias, reduction="sum", options=options
        )
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(
        hidden, weight, bias, targets, token_weights, chunk, softcap, dtype, grad
    )


# torch 2.13's chunked linear + cross-entropy (None on an older torch)
TORCH_LCE = getattr(torch.nn, "LinearCrossEntropyOptions", None)


def own_loss_reason(
    dtype: torch.dtype,
    hidden_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    weighted: bool,
    softcap: float | None,
) -> str | None:
    """Why llmtrain's chunked loss runs rather than torch's `F.linear_cross_entropy` with
    `LinearCrossEntropyOptions(batch_chunk_size=chunk)`; None: torch's runs. Both compute the
    gradients in the forward chunk by chunk, and measured the same peak at the same chunk
    (docs/benchmarks.md, "The chunked loss against torch's"); torch's lacks the rest."""
    if TORCH_LCE is None:
        return "this torch has no chunked F.linear_cross_entropy (2.13 or later has)"
    if softcap is not None:
        return "soft-capped logits (final_logit_softcapping)"
    if weighted:
        return "per-token weights (train.loss_normalization: sequences)"
    if not dtype == hidden_dtype == weight_dtype or dtype not in (torch.float32, torch.float64):
        return (
            f"mixed precision: torch's returns the loss and the head's gradients in "
            f"{str(dtype).removeprefix('torch.')}, llmtrain's accumulates them in fp32"
        )
    return None


def describe_loss(
    setting: str | int, model: torch.nn.Module, task: str, precision: str, normalization: str
) -> str:
    """Which loss trains, for fit's banner (before `resolve_loss_chunk`'s check, whose rare
    fallback prints its own notice)."""
    if task != "causal-lm":
        return "cross-entropy of the classification head"
    linear = output_linear(model)
    if setting == "off" or linear is None:
        return "full logits" + (" (train.loss_chunk: off)" if setting == "off" else "")
    chunk = auto_chunk(linear.out_features) if setting == "auto" else int(setting)
    compute = AUTOCAST_DTYPES.get(precision, param_dtype(precision))
    w_dtype = linear.weight.dtype
    reason = own_loss_reason(
        compute, w_dtype, w_dtype, normalization == "sequences", _softcap(model)
    )
    which = "torch's F.linear_cross_entropy" if reason is None else f"llmtrain's ({reason})"
    return f"chunked, {chunk} tokens per chunk: {which}"


# ------------------------------------------------------------------------ the swapped head
@dataclass
class _Targets:
    """What one micro-batch's head needs besides the hidden states."""

    index: torch.Tensor  # flat positions (batch × seq) that have a target
    targets: torch.Tensor  # their targets
    token_weights: torch.Tensor | None  # None: tokens; 1 / (targets in the row): sequences
    chunk: int
    softcap: float | None


def select_targets(
    labels: torch.Tensor, normalization: str, dtype: torch.dtype, chunk: int, softcap: float | None
) -> _Targets:
    """The supervised positions of a micro-batch, chosen before any projection."""
    targets = shifted_targets(labels)
    keep = targets != IGNORE
    index = keep.reshape(-1).nonzero().squeeze(1)
    weights = None
    if normalization == "sequences":  # each sequence's mean: weight 1 / its target count
        per_row = 1.0 / keep.sum(dim=1).clamp(min=1).to(_acc_dtype(dtype))
        weights = per_row[index // targets.shape[1]]
    return _Targets(index, targets.reshape(-1)[index], weights, chunk, softcap)


class ChunkedHead:
    """Stands in for the output embedding's `forward` while armed: hidden states in, the summed
    loss of the armed targets out. One per module for its lifetime, so torch.compile sees the
    same object every micro-batch (no recompilation); the loss itself runs eagerly."""

    def __init__(self, linear: torch.nn.Linear):
        self._linear = weakref.ref(linear)
        self.armed: _Targets | None = None

    @torch.compiler.disable
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        linear, t = self._linear(), self.armed
        if linear is None or t is None:
            raise RuntimeError("ChunkedHead called outside model_loss")
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, t.index)
        return linear_cross_entropy(
            rows,
            linear.weight,
            linear.bias,
            t.targets,
            t.token_weights,
            chunk=t.chunk,
            softcap=t.softcap,
        )


_HEADS: weakref.WeakKeyDictionary[torch.nn.Module, ChunkedHead] = weakref.WeakKeyDictionary()


def output_linear(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output embedding when it is a plain nn.Linear (tied or not), else None —
    a quantized or adapter-wrapped head is a subclass or another module, and is not chunked."""
    raw = unwrap(model)
    get = getattr(raw, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    return emb if type(emb) is torch.nn.Linear else None


def _softcap(model: torch.nn.Module) -> float | None:
    value = getattr(getattr(unwrap(model), "config", None), "final_logit_softcapping", None)
    return float(value) if value else None


@contextlib.contextmanager
def chunked_head(
    model: torch.nn.Module, labels: torch.Tensor, normalization: str, chunk: int
) -> Iterator[None]:
    """Inside: `model(**inputs).logits` is the micro-batch's summed loss (module docstring)."""
    linear = output_linear(model)
    if linear is None:
        raise RuntimeError(f"{type(unwrap(model)).__name__} has no linear output embedding")
    config = getattr(unwrap(model), "config", None)
    softcap = _softcap(model)
    head = _HEADS.get(linear)
    if head is None:
        head = _HEADS[linear] = ChunkedHead(linear)
    head.armed = select_targets(labels, normalization, linear.weight.dtype, chunk, softcap)
    linear.forward = head  # an instance attribute shadows nn.Linear.forward
    if softcap is not None:
        config.final_logit_softcapping = None  # applied inside the chunk instead
    try:
        yield
    finally:
        del linear.forward
        head.armed = None
        if softcap is not None:
            config.final_logit_softcapping = softcap


def model_loss(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    task: str,
    normalization: str,
    precision: str,
    device: torch.device,
    loss_chunk: int | None,
) -> torch.Tensor:
    """The summed loss of one micro-batch, the forward under autocast. `loss_chunk` None: from
    the model's logits (classification, `off`); else chunked. Only the returned scalar's graph
    references the step's tensors: no logits or model outputs survive this call."""
    if loss_chunk is None or task != "causal-lm":
        with autocast_context(precision, device):
            logits = model(**inputs).logits
        return summed_loss(logits, labels, task, normalization)
    with (
        autocast_context(precision, device),
        chunked_head(model, labels, normalization, loss_chunk),
    ):
        summed = model(**inputs).logits
    if summed.dim() != 0:
        raise RuntimeError(
            f"{type(unwrap(model)).__name__} reshaped its output embedding's result; "
            "set train.loss_chunk: off"
        )
    return summed


# ------------------------------------------------------------------ choosing and checking
def auto_chunk(vocab: int) -> int:
    """`loss_chunk: auto` for a vocabulary: see AUTO_CHUNK_BYTES."""
    tokens = AUTO_CHUNK_BYTES // (4 * max(1, vocab))
    pow2 = 2 ** int(math.log2(tokens)) if tokens >= 1 else 1
    return max(AUTO_MIN, min(AUTO_MAX, pow2))


@dataclass(frozen=True)
class LossChunk:
    """What `train.loss_chunk` resolved to for a model: tokens per chunk (None: plain loss from
    full logits), and why a requested chunked loss fell back (None when it did not)."""

    tokens: int | None
    notice: str | None = None


@torch.no_grad()
def check_chunked_head(model: torch.nn.Module, chunk: int) -> bool:
    """True when the chunked loss equals the plain loss on a tiny input: the model returns its
    output embedding's result as is (soft-capping aside). Eval mode, so dropout draws nothing.
    (A model that scales its logits after the head — Cohere, Granite — fails here.)"""
    raw = unwrap(model)
    param = next(raw.parameters())
    vocab = int(raw.get_input_embeddings().num_embeddings)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 6), generator=gen).to(param.device)
    was_training = raw.training
    raw.eval()
    try:
        plain = summed_loss(raw(input_ids=ids).logits, ids, "causal-lm")
        with chunked_head(raw, ids, "tokens", chunk):
            chunked = raw(input_ids=ids).logits
    finally:
        raw.train(was_training)
    return chunked.dim() == 0 and bool(torch.allclose(chunked, plain, rtol=1e-4, atol=1e-4))


def resolve_loss_chunk(setting: str | int, model: torch.nn.Module, task: str) -> LossChunk:
    """`train.loss_chunk` (auto | off | N) for this model and task."""
    if task != "causal-lm" or setting == "off":
        return LossChunk(None)
    name = type(unwrap(model)).__name__
    linear = output_linear(model)
    if linear is None:
        why = "its output embedding is not a linear layer"
    else:
        tokens = auto_chunk(linear.out_features) if setting == "auto" else int(setting)
        if check_chunked_head(model, tokens):
            return LossChunk(tokens)
        why = "its forward changes the output embedding's result"
    return LossChunk(
        None, f"train.loss_chunk: {name}: {why}; the loss is computed from full logits (off)"
    )


def show_notice(chunk: LossChunk) -> None:
    """Print a fallback notice once per process, on rank 0 (the probe and the loop both
    resolve)."""
    if chunk.notice:
        say(chunk.notice, once=True)
