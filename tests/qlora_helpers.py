"""Helpers for the QLoRA and frozen-dtype tests: a tiny Llama saved as a "pretrained" model
(bitsandbytes quantizes nn.Linear layers, which Llama has and GPT-2's Conv1D is not), and
configs that fine-tune it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fit_helpers import make_cfg

from llmtrain.config import Config

LLAMA_TINY = {
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
NF4 = {"bits": 4, "type": "nf4", "double_quant": True}


def save_llama(root: Path, *, dtype: torch.dtype = torch.float32, **config: Any) -> Path:
    """A randomly initialised Llama (seed 0) written with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_TINY, **config})).to(dtype)
    path = root / "base-llama"
    model.save_pretrained(path)
    return path


def llama_cfg(
    out: Path,
    base: Path,
    *,
    peft: dict[str, Any] | None = None,
    quantize: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    **kw: Any,
) -> Config:
    """`make_cfg` fine-tuning `base` with LoRA (and `quantize`, when given)."""
    data = make_cfg(out, **kw).model_dump()
    data["model"].update(
        arch=None,
        config={},
        config_overrides={},
        pretrained=str(base),
        peft={**LORA, **(peft or {})},
        quantize=quantize,
        **(model or {}),
    )
    return Config.model_validate(data)
