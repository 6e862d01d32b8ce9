"""Build the transformers model a config describes: from scratch (`arch`) or `pretrained`.

The same seed gives the same initial weights (a fresh classification head included), because
the torch RNG is seeded right before the weights are created. The vocabulary and the special
token ids come from the tokenizer, so a trained tokenizer and the model always agree.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

from llmtrain.config import Config
from llmtrain.engine.peft import apply_peft
from llmtrain.engine.precision import param_dtype
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


def build_model(
    cfg: Config,
    tokenizer: Any,
    num_labels: int | None,
    label_names: list[str] | None = None,
) -> PreTrainedModel:
    """The model for `cfg.model.task`, in the precision's weight dtype, in train mode, on CPU."""
    m = cfg.model
    hf = build_hf_config(cfg, tokenizer, num_labels, label_names)
    auto = auto_class(m.task)
    kwargs: dict[str, Any] = {}
    if m.attn_implementation != "auto":
        kwargs["attn_implementation"] = m.attn_implementation
    torch.manual_seed(cfg.run.seed)
    try:
        if m.pretrained:
            model = auto.from_pretrained(m.pretrained, config=hf, dtype=torch.float32, **kwargs)
        else:
            model = auto.from_config(hf, dtype=torch.float32, **kwargs)
    except ValueError as e:
        raise LLMTrainError(
            f"model: cannot build {m.task} for {m.arch or m.pretrained}: {e}"
        ) from e
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.peft is not None:  # after checkpointing: peft then turns input grads on
        model = apply_peft(model, m.peft, m.task)
    model.to(param_dtype(cfg.train.precision))
    model.train()
    return model


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
    """All parameters, frozen ones (a PEFT base) included, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


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
