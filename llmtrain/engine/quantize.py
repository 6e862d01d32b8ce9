"""A quantized frozen base (QLoRA) through bitsandbytes, as transformers and peft drive it.

  bnb_config          transformers' BitsAndBytesConfig for `model.quantize`
  is_quantized        whether a model (a peft model too) holds bitsandbytes layers
  merge_dequantized   for `final/`: the base dequantized to its compute dtype, with the adapters
                      written in `adapter/` merged in (no bitsandbytes needed to read it)

No quantization is written here: transformers quantizes while it loads (on the device it loads
onto), and the blockwise quantization is deterministic, so resume rebuilds the same base from
`model.pretrained` and stays bit-exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmtrain.config.schema import QuantizeConfig
from llmtrain.engine.precision import DTYPES
from llmtrain.errors import LLMTrainError

INSTALL_HINT = "pip install 'llmtrain[qlora]'"


def import_bitsandbytes(needed_by: str) -> Any:
    """bitsandbytes, or one line naming what needs it and how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise LLMTrainError(f"{needed_by} needs the bitsandbytes package: {INSTALL_HINT}") from e
    return bitsandbytes


def bnb_config(q: QuantizeConfig, compute: torch.dtype, storage: torch.dtype | None = None) -> Any:
    """BitsAndBytesConfig for `q`; `compute` is the resolved compute dtype (4-bit layers
    dequantize to it for their matmuls; LLM.int8 picks its own). `storage`: the float dtype
    the packed 4-bit codes are stored as (bitsandbytes' `quant_storage`; None: uint8). FSDP
    shards only floating tensors, so under FSDP the codes ride in the frozen weights' dtype —
    the FSDP-QLoRA recipe; the codes themselves, and so the base, are the same bytes."""
    import_bitsandbytes("model.quantize")
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage or torch.uint8,
    )


def quant_compute_dtype(q: QuantizeConfig, precision_compute: torch.dtype) -> torch.dtype:
    """`model.quantize.compute_dtype`, auto = the compute dtype of train.precision."""
    return precision_compute if q.compute_dtype == "auto" else DTYPES[q.compute_dtype]


def is_quantized(model: torch.nn.Module) -> bool:
    """True when bitsandbytes quantized the model's base (peft forwards the attribute)."""
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def keep_training_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel. On a CPU
    with AVX512-BF16 the first forward in eval mode (an eval, a model check) converts a
    layer in place to a packed layout with bf16 block scales, which rounds the weights again
    and sends later training passes through a kernel with no autograd formula (torch warns
    that gradients may be silently wrong). Training and evaluation then see one base."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _dequantized_dtype(base: Any) -> torch.dtype:
    """What the quantized layers become in `final/`: their compute dtype (4-bit), else the
    dtype of the weights that were never quantized (the embeddings)."""
    compute = getattr(base.config.quantization_config, "bnb_4bit_compute_dtype", None)
    if getattr(base, "is_loaded_in_4bit", False) and isinstance(compute, torch.dtype):
        return compute
    return base.get_input_embeddings().weight.dtype


def merge_dequantized(peft_model: Any, adapter_dir: Path) -> Any:
    """The plain transformers model for `final/`: the base dequantized (transformers'
    `dequantize`), then the adapters read back from `adapter_dir` and merged by peft, so
    `final/` equals what a user gets from the published pieces. Merging into the 4-bit layers
    themselves would quantize the merged weights a second time."""
    from peft import PeftModel

    base = peft_model.unload()  # the bitsandbytes base, adapters dropped (they are on disk)
    base = base.dequantize(dtype=_dequantized_dtype(base))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config  # final/ loads without bitsandbytes
    return merged
