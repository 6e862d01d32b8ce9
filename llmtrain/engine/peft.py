"""Parameter-efficient fine-tuning through `peft` (docs/architecture.md, "PEFT").

`model.peft` turns a pretrained model into a `peft.PeftModel` with LoRA or DoRA adapters; the
base stays frozen and only the adapters (plus, for classification, the head, which peft puts in
`modules_to_save`) train. This module is the one place that knows peft:

  apply_peft        wrap the built model (input grads on for gradient checkpointing)
  is_peft           whether a module is such a model
  trainable_state   what a checkpoint holds for it: the trainable tensors, by name
  load_trainable    put those tensors back, bit-exact, refusing a set that does not match
  save_adapter_then_merge
                    `<output_dir>/adapter/` (PeftModel.from_pretrained loads it), then the
                    base with the adapters merged in, for `final/`

Invariant: a PEFT model's frozen parameters are exactly the pretrained weights (rebuilt from
`model.pretrained` on resume), so a checkpoint needs only the trainable ones.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from llmtrain.config.schema import PeftConfig
from llmtrain.engine.parallel import unwrap
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import atomic_dir
from llmtrain.util.owned import check_replaceable, confined, mark


def _peft() -> Any:
    """The peft package, or a one-line install hint."""
    try:
        import peft
    except ImportError as e:
        raise LLMTrainError(
            "model.peft needs the peft package: pip install peft (or remove model.peft to "
            "fine-tune every weight)"
        ) from e
    return peft


def lora_config(p: PeftConfig, task: str) -> Any:
    """peft's LoraConfig for `model.peft`. The task type makes peft add the classification head
    (`classifier` / `score`) to `modules_to_save`, so it trains in full."""
    peft = _peft()
    task_type = peft.TaskType.SEQ_CLS if task == "sequence-classification" else "CAUSAL_LM"
    targets = p.target_modules if isinstance(p.target_modules, str) else list(p.target_modules)
    return peft.LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=targets,
        use_dora=p.method == "dora",
        use_rslora=p.rslora,
        modules_to_save=list(p.modules_to_save) or None,
        task_type=task_type,
        bias="none",
    )


def apply_peft(model: torch.nn.Module, p: PeftConfig, task: str) -> torch.nn.Module:
    """`model` wrapped by peft with frozen base weights; with gradient checkpointing on, the
    embeddings' output requires grad, so checkpointed blocks see an input that needs grad and
    the adapters inside them get gradients."""
    peft = _peft()
    checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
    with warnings.catch_warnings():
        # GPT-2's Conv1D layers: peft switches fan_in_fan_out on itself and says so; and peft
        # asks transformers 5 for the deprecated name of is_activation_checkpointing.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        try:
            wrapped = peft.get_peft_model(model, lora_config(p, task))
        except ValueError as e:
            raise LLMTrainError(f"model.peft: {' '.join(str(e).split())}") from e
    if checkpointing and not hasattr(model, "_require_grads_hook"):
        model.enable_input_require_grads()  # peft did it, unless it saw no checkpointing
    return wrapped


def is_peft(model: torch.nn.Module) -> bool:
    """True for a peft model (under DDP/compile wrappers too); False when peft is absent."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(unwrap(model), PeftModel)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by parameter name, on CPU, contiguous: a PEFT checkpoint."""
    return {
        name: p.detach().cpu().contiguous()
        for name, p in unwrap(model).named_parameters()
        if p.requires_grad
    }


@torch.no_grad()
def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Copy a `trainable_state` back into `model` (bit-exact); any difference in the set of
    names or shapes is an error naming `where`."""
    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise LLMTrainError(
            f"{where}: the adapter weights do not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); was it written with another model.peft?"
        )
    for name, p in params.items():
        if p.shape != state[name].shape:
            raise LLMTrainError(
                f"{where}: {name} has shape {tuple(state[name].shape)}, the model "
                f"{tuple(p.shape)}; was it written with another model.peft.r?"
            )
        p.copy_(state[name])


def save_adapter_then_merge(model: torch.nn.Module, adapter_dir: Path, tokenizer: Any) -> Any:
    """Write the adapter (and the tokenizer) to `adapter_dir` atomically, then merge the
    adapters into the base weights and return that plain transformers model. The peft model is
    consumed: its layers are replaced by the merged ones (no copy of the base is made)."""
    peft_model = unwrap(model)
    adapter_dir = confined(Path(adapter_dir).parent, Path(adapter_dir))
    check_replaceable(adapter_dir, "adapter", ("adapter_config.json",))
    with atomic_dir(adapter_dir) as tmp:
        peft_model.save_pretrained(tmp)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        mark(tmp, "adapter")
    return peft_model.merge_and_unload()
