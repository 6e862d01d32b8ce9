"""Parameter-efficient fine-tuning through `peft` (docs/architecture.md, "PEFT").

`model.peft` turns a pretrained model into a `peft.PeftModel` with the adapters of the chosen
method (LoRA, DoRA, AdaLoRA, IA3, LoHa, LoKr, OFT, VeRA: config/peft_methods.py); the base
stays frozen and only the adapters (plus, for classification, the head, which peft puts in
`modules_to_save`) train. This module is the one place that knows peft:

  method_config     peft's config object for `model.peft`
  apply_peft        wrap the built model (input grads on for gradient checkpointing)
  prepare_quantized peft's preparation of a quantized base (fp32 frozen dtype)
  is_peft           whether a module is such a model
  trainable_state   what a checkpoint holds for it: the trainable tensors, by name
  load_trainable    put those tensors back, bit-exact, refusing a set that does not match
  save_adapter_then_merge
                    `<output_dir>/adapter/` (PeftModel.from_pretrained loads it), then the
                    base with the adapters merged in, for `final/`

Invariant: a PEFT model's frozen parameters are a function of the pretrained weights alone
(themselves, or with `init: pissa | olora` the residual that peft's deterministic
decomposition leaves), rebuilt from `model.pretrained` on resume, so a checkpoint needs only
the trainable ones.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmtrain.config.peft_methods import ADALORA_FIELDS, METHODS
from llmtrain.config.schema import PeftConfig
from llmtrain.engine.parallel import unwrap
from llmtrain.engine.quantize import is_quantized, merge_dequantized
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import atomic_dir, remove_path
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


# model.peft.init -> LoraConfig.init_lora_weights
LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def method_config(p: PeftConfig, task: str) -> Any:
    """peft's config object for `model.peft` (config/peft_methods.py maps the keys). The task
    type makes peft add the classification head (`classifier` / `score`) to
    `modules_to_save`, so it trains in full."""
    peft = _peft()
    cls_name, common = METHODS[p.method]
    targets = p.target_modules if isinstance(p.target_modules, str) else list(p.target_modules)
    kwargs: dict[str, Any] = {field: getattr(p, key) for key, field in common.items()}
    kwargs.update(_method_fields(p))
    kwargs.update(p.options)
    kwargs.update(
        target_modules=targets,
        modules_to_save=list(p.modules_to_save) or None,
        task_type=peft.TaskType.SEQ_CLS if task == "sequence-classification" else "CAUSAL_LM",
    )
    return getattr(peft, cls_name)(**kwargs)


def _method_fields(p: PeftConfig) -> dict[str, Any]:
    """The fields only LoRA/DoRA or only AdaLoRA take."""
    if p.method in ("lora", "dora"):
        return {
            "use_dora": p.method == "dora",
            "use_rslora": p.rslora,
            "init_lora_weights": LORA_INIT[p.init],
            "bias": "none",
        }
    if p.method == "adalora":
        fields = {field: getattr(p, key) for key, field in ADALORA_FIELDS.items()}
        # peft wants the run's length now; the loop sets the real one (engine/adalora.py)
        # before the first step, once the data fixes it.
        return {**fields, "total_step": p.tinit + p.tfinal + 1}
    if p.method == "ia3" and p.target_modules == "all-linear":
        # peft's per-architecture feedforward list is not a subset of all-linear's resolved
        # names, so adapter/ would not load back: every layer scales its output unless
        # options.feedforward_modules (with a list of target_modules) says otherwise.
        return {"feedforward_modules": []}
    return {}


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
            wrapped = peft.get_peft_model(model, method_config(p, task))
        except (ValueError, TypeError) as e:  # a bad value in model.peft.options, mostly
            raise LLMTrainError(f"model.peft: {' '.join(str(e).split())}") from e
    if checkpointing and not hasattr(model, "_require_grads_hook"):
        model.enable_input_require_grads()  # peft did it, unless it saw no checkpointing
    remember_initial(wrapped, p)
    return wrapped


def prepare_quantized(model: torch.nn.Module) -> torch.nn.Module:
    """peft's `prepare_model_for_kbit_training` (freeze, unquantized weights to fp32); the
    checkpointing it could switch on is build_model's business."""
    return _peft().prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


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
    params = check_trainable(model, state, where)
    for name, p in params.items():
        p.copy_(state[name])


def check_trainable(
    model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path
) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters by name, once `state` is known to hold each of them
    at its full shape (a sharded parameter is compared at its full shape); any difference in
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
        if p.shape != state[name].shape:  # a DTensor's shape is the full one
            raise LLMTrainError(
                f"{where}: {name} has shape {tuple(state[name].shape)}, the model "
                f"{tuple(p.shape)}; was it written with another model.peft.r?"
            )
    return params


def save_adapter_then_merge(model: torch.nn.Module, adapter_dir: Path, tokenizer: Any) -> Any:
    """Write the adapter (and the tokenizer) to `adapter_dir` atomically, then merge the
    adapters into the base weights and return that plain transformers model. The peft model is
    consumed: its layers are replaced by the merged ones (no copy of the base is made). A
    quantized base is dequantized first (engine/quantize.py)."""
    peft_model = unwrap(model)
    initial = getattr(peft_model, INITIAL_ATTR, None)
    adapter_dir = confined(Path(adapter_dir).parent, Path(adapter_dir))
    check_replaceable(adapter_dir, "adapter", ("adapter_config.json",))
    with atomic_dir(adapter_dir) as tmp, warnings.catch_warnings():
        # AdaLoRA may prune a matrix to rank 0; peft takes that for an ungathered FSDP shard
        warnings.filterwarnings("ignore", message=".*have invalid shape.*")
        if initial is None:
            peft_model.save_pretrained(tmp)
        else:
            save_converted(peft_model, tmp, initial)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        mark(tmp, "adapter")
    if is_quantized(peft_model):
        return merge_dequantized(peft_model, adapter_dir)
    return peft_model.merge_and_unload()


# init: pissa | olora change the frozen base (W -> W - B0 A0): the peft model keeps the
# adapters as first built under this attribute, so that adapter/ can be saved as a plain LoRA
# of the ORIGINAL base (peft's path_initial_model_for_weight_conversion). A resume rebuilds
# them identically from model.pretrained.
INITIAL_ATTR = "llmtrain_initial_adapters"


def remember_initial(model: torch.nn.Module, p: PeftConfig) -> None:
    if p.method in ("lora", "dora") and p.init in ("pissa", "olora"):
        setattr(model, INITIAL_ATTR, trainable_state(model))


def save_converted(peft_model: Any, directory: Path, initial: dict[str, torch.Tensor]) -> None:
    """adapter/ for a PiSSA/OLoRA run: B A - B0 A0 as a LoRA of rank 2r on the original base,
    so PeftModel.from_pretrained(pretrained, adapter/) is the trained model (peft converts it
    from the initial adapters, written to a scratch folder inside `directory` and removed)."""
    scratch = directory / "initial"
    trained = trainable_state(peft_model)
    load_trainable(peft_model, initial, scratch)
    peft_model.save_pretrained(scratch)
    load_trainable(peft_model, trained, directory)
    peft_model.save_pretrained(directory, path_initial_model_for_weight_conversion=str(scratch))
    remove_path(scratch)
    # peft's conversion keeps the LoRA matrices only: put the rest (the trained head) back
    kept = _peft().get_peft_model_state_dict(peft_model)
    rest = {k: v.contiguous() for k, v in kept.items() if "lora_A" not in k and "lora_B" not in k}
    if rest:
        file = directory / "adapter_model.safetensors"
        save_file({**load_file(str(file)), **rest}, str(file), metadata={"format": "pt"})
