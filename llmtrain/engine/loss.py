"""Summed losses computed from logits, so the loop — not the model — decides the normalizer.

A model's own `loss` is a mean over *its* micro-batch; averaging those means over k
micro-batches weights short micro-batches wrongly (transformers PRs #34191/#34198). Here each
micro-batch returns a *sum*, and the loop divides by N, the count of the whole window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtrain.data.batching import IGNORE


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
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    flat = logits.reshape(-1, logits.shape[-1])
    if normalization == "tokens":
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    per_token = F.cross_entropy(
        flat, targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)
    counts = (targets != IGNORE).sum(dim=1)
    per_seq = per_token.sum(dim=1) / counts.clamp(min=1)
    return per_seq.sum()
