"""Build the transformers model a config describes: from scratch (`arch`) or `pretrained`.

The same seed gives the same initial weights (a fresh classification head included), because
the torch RNG is seeded right before the weights are created. The vocabulary and the special
token ids come from the tokenizer, so a trained tokenizer and the model always agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

from llmtrain.config import Config
from llmtrain.engine.parallel import unwrap
from llmtrain.engine.peft import apply_peft, load_trainable, prepare_quantized
from llmtrain.engine.placement import ParamSpec
from llmtrain.engine.precision import cast_by_role, compute_dtype, frozen_dtype, param_dtype
from llmtrain.engine.quantize import bnb_config, keep_training_layout, quant_compute_dtype
from llmtrain.errors import LLMTrainError


def auto_class(task: str) -> Any:
    """The AutoModel class of `model.task`."""
    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


# Models whose position ids start after the padding index (fairseq heritage) read two fewer
# tokens than max_position_embeddings (config/rules.py keeps a twin for its
# seq_len check, which must not import engine/; tests/test_config.py checks they agree).
POSITION_OFFSET = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
    "data2vec-text", "longformer",
}  # fmt: skip


def model_positions(hf_config: Any) -> int | None:
    """How many tokens the model reads at most (n_positions / max_position_embeddings /
    n_ctx, minus the padding offset of RoBERTa-like models); None when it declares none."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        limit = getattr(hf_config, key, None)
        if isinstance(limit, int) and limit > 0:
            offset = 2 if getattr(hf_config, "model_type", None) in POSITION_OFFSET else 0
            return limit - offset
    return None


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    """pad/eos/bos from the tokenizer; a missing bos falls back to eos (GPT-2 convention), and
    a missing id is None rather than the architecture's default (which may lie outside the
    trained vocabulary, e.g. GPT-2's 50256)."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos, "bos_token_id": bos}
    return {k: (int(v) if v is not None else None) for k, v in ids.items()}


def build_hf_config(cfg: Config, tokenizer: Any, num_labels: int | None, label_names=None) -> Any:
    """The HF config: arch + config (or the pretrained one), tokenizer ids, overrides, labels."""
    m = cfg.model
    extra: dict[str, Any] = {}
    if m.task == "sequence-classification":
        if num_labels is None:
            raise LLMTrainError(
                "model.num_labels: unset and the data has no labels; set it or add a label field"
            )
        extra["num_labels"] = num_labels
        if label_names and len(label_names) == num_labels:
            extra["id2label"] = dict(enumerate(label_names))
            extra["label2id"] = {name: i for i, name in enumerate(label_names)}
    if m.pretrained:
        # validation (config rule `_model_limits`) has checked that it is a model directory
        hf = AutoConfig.from_pretrained(str(m.pretrained), **extra)
    else:
        try:
            hf = AutoConfig.for_model(
                m.arch,
                **{"vocab_size": len(tokenizer), **_special_ids(tokenizer), **m.config},
                **extra,
            )
        except (ValueError, TypeError) as e:
            raise LLMTrainError(f"model.arch / model.config: {e}") from e
    for key, value in m.config_overrides.items():
        setattr(hf, key, value)
    if m.pretrained:  # the tokenizer decides the special ids of the run
        for key, value in _special_ids(tokenizer).items():
            setattr(hf, key, value)
    hf.use_cache = False  # training never uses the KV cache
    return hf


def storage_dtypes(cfg: Config) -> tuple[torch.dtype, torch.dtype]:
    """(master dtype of the trainable weights, dtype of the frozen ones)."""
    precision = cfg.train.precision
    return param_dtype(precision), frozen_dtype(cfg.model.frozen_dtype, precision)


def _accelerate_installed() -> bool:
    """transformers places weights with a device_map only through accelerate (optional)."""
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def load_kwargs(cfg: Config, device: torch.device | None) -> dict[str, Any]:
    """from_pretrained's arguments: the dtype the weights are stored in while training, so no
    fp32 copy is made of a base that stays bf16; straight onto `device`; quantized there.
    fp64 is loaded as fp32 and cast after: weights created fresh (a new classification head)
    are then initialised exactly as they always were."""
    m = cfg.model
    master, frozen = storage_dtypes(cfg)
    dtype = frozen if m.peft is not None else master
    kwargs: dict[str, Any] = {"dtype": torch.float32 if dtype == torch.float64 else dtype}
    if device is not None and device.type != "cpu" and _accelerate_installed():
        kwargs["device_map"] = {"": str(device)}  # else: loaded on the host, moved after
    if m.quantize is not None:
        compute = quant_compute_dtype(m.quantize, compute_dtype(cfg.train.precision))
        # FSDP shards the packed codes only as floats (bnb_config); one process keeps uint8
        storage = frozen if cfg.train.parallel == "fsdp" else None
        kwargs["quantization_config"] = bnb_config(m.quantize, compute, storage)
    if m.attn_implementation != "auto":
        kwargs["attn_implementation"] = m.attn_implementation
    return kwargs


def _instantiate(cfg: Config, hf: Any, device: torch.device | None) -> PreTrainedModel:
    m = cfg.model
    auto = auto_class(m.task)
    torch.manual_seed(cfg.run.seed)
    try:
        if m.pretrained:
            return auto.from_pretrained(m.pretrained, config=hf, **load_kwargs(cfg, device))
        attn = (
            {}
            if m.attn_implementation == "auto"
            else {"attn_implementation": m.attn_implementation}
        )
        model = auto.from_config(hf, dtype=torch.float32, **attn)
        return model.to(device) if device is not None else model
    except ValueError as e:
        raise LLMTrainError(
            f"model: cannot build {m.task} for {m.arch or m.pretrained}: {e}"
        ) from e
    except (SafetensorError, OSError) as e:  # damaged or unreadable weights in model.pretrained
        raise LLMTrainError(
            f"model.pretrained: cannot load {m.pretrained} ({type(e).__name__}: "
            f"{' '.join(str(e).split())})"
        ) from e


def build_model(
    cfg: Config,
    tokenizer: Any,
    num_labels: int | None,
    label_names: list[str] | None = None,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """The model for `cfg.model.task` in train mode, loaded onto `device` (CPU if None):
    trainable weights in the master dtype, frozen ones in `model.frozen_dtype`, a quantized
    base as bitsandbytes stores it."""
    m = cfg.model
    model = _instantiate(cfg, build_hf_config(cfg, tokenizer, num_labels, label_names), device)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    master, frozen = storage_dtypes(cfg)
    if m.quantize is not None:
        keep_training_layout(model)
    if m.quantize is not None and frozen == torch.float32:
        # peft's preparation upcasts every unquantized weight to fp32: what frozen fp32 asks
        # for; with a bf16/fp16 frozen dtype it would make the fp32 copy this avoids.
        model = prepare_quantized(model)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.peft is not None:  # after checkpointing: peft then turns input grads on
        model = apply_peft(model, m.peft, m.task)
    cast_by_role(model, master, frozen)
    model.train()
    return model


def rebuild_on_host(
    cfg: Config, tokenizer: Any, like: torch.nn.Module, trainable: dict[str, torch.Tensor]
) -> PreTrainedModel:
    """One process's copy, on the host, of a PEFT model that trained sharded: the frozen base
    rebuilt from `model.pretrained` as `build_model` built it (the module docstring of
    engine/peft.py: the base is a function of the pretrained weights alone) and the gathered
    `trainable` tensors put in. What a one-process run holds at its end, so `final/` and
    `adapter/` come out in the same format; it costs one base in host memory on rank 0."""
    hf = unwrap(like).get_base_model().config
    labels = None
    if cfg.model.task == "sequence-classification":
        labels = [hf.id2label[i] for i in range(hf.num_labels)]
    num_labels = hf.num_labels if labels is not None else None
    model = build_model(cfg, tokenizer, num_labels, labels, torch.device("cpu"))
    load_trainable(model, trainable, Path(cfg.run.output_dir))
    return model


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the trainable weights, bytes of the frozen ones) as stored, tied weights
    once; a quantized weight counts its packed data and its block scales."""
    trainable = frozen = 0
    for spec in param_specs(model):
        if spec.trainable:
            trainable += spec.nbytes
        else:
            frozen += spec.nbytes
    return trainable, frozen


def param_specs(model: torch.nn.Module) -> list[ParamSpec]:
    """Every parameter as stored, for the byte arithmetic (engine/placement.py): tied weights
    once (named_parameters drops repeats), a quantized weight's packed shape with its block
    scales as `side_bytes`."""
    return [
        ParamSpec(name, tuple(p.shape), p.element_size(), p.requires_grad, _quant_state_bytes(p))
        for name, p in model.named_parameters()
    ]


def _quant_state_bytes(p: torch.Tensor) -> int:
    """The block scales bitsandbytes keeps beside a 4-bit weight (nested ones included)."""
    state = getattr(p, "quant_state", None)
    total = 0
    while state is not None:
        for name in ("absmax", "code", "offset"):
            t = getattr(state, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        state = getattr(state, "state2", None)
    return total


def frozen_kinds(model: torch.nn.Module) -> list[str]:
    """The storage of the frozen weights: dtype names, 'nf4'/'fp4'/'int8' for quantized ones."""
    kinds = set()
    for p in model.parameters():
        if p.requires_grad:
            continue
        state = getattr(p, "quant_state", None)
        if state is not None:
            kinds.add(str(getattr(state, "quant_type", "4-bit")))
        elif p.dtype == torch.int8:
            kinds.add("int8")
        else:
            kinds.add(str(p.dtype).removeprefix("torch."))
    return sorted(kinds)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the first parameter's device)."""
    return next(model.parameters()).device


def enable_tf32(device: torch.device) -> bool:
    """TF32 matmuls (and cuDNN) on Ampere and later GPUs: fp32 runs use the tensor cores, as
    bf16 autocast does anyway. Off elsewhere (CPU, pre-Ampere). Returns whether it was set."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def total_parameters(model: torch.nn.Module) -> int:
    """All parameters, frozen ones (a PEFT base) included, tied weights counted once; a 4-bit
    weight counts its original shape (its storage packs two values in a byte)."""
    return sum(_logical_numel(p) for p in model.parameters())


def _logical_numel(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


@torch.no_grad()
def check_document_isolation(model: PreTrainedModel, device: torch.device) -> None:
    """Refuse `cross_doc_attention: false` for a model that would attend across documents.

    Runs two tiny documents packed with restarting position ids (no attention_mask) and alone;
    the second document's logits must match, which is true exactly when the model derives a
    per-document mask from the positions (transformers' packed-sequence detection).
    """
    was_training = model.training
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (1, 5), generator=gen)
    b = torch.randint(0, vocab, (1, 4), generator=gen)
    packed = torch.cat([a, b], dim=1).to(device)
    pos = torch.cat([torch.arange(5), torch.arange(4)]).unsqueeze(0).to(device)
    try:
        together = model(input_ids=packed, position_ids=pos, use_cache=False).logits[0, 5:].double()
        alone = (
            model(input_ids=b.to(device), position_ids=pos[:, 5:], use_cache=False)
            .logits[0]
            .double()
        )
        ok = torch.allclose(together, alone, rtol=1e-3, atol=1e-3)
    except (TypeError, ValueError, RuntimeError):
        ok = False
    model.train(was_training)
    if not ok:
        raise LLMTrainError(
            f"data.chunk.cross_doc_attention: false is not supported by {type(model).__name__} "
            "(it does not keep attention inside documents from restarting position_ids); set "
            "cross_doc_attention: true or use an architecture that does (gpt2, llama, mistral...)"
        )
