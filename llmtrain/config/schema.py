"""The config contract: one pydantic model per YAML section (docs/architecture.md, "Config").

Every field carries its one-line description where it is declared; `docs/config.md` is
generated from these descriptions by `scripts/gen_config_docs.py`. Every section forbids
unknown keys, so a typo is an error that names the key and suggests the closest one.

This module holds the models and the pure helpers that say what their values mean
(`parse_bytes`, `section_class`); reading files, wording errors and the cross-field rules
live in the sibling modules `loader`, `messages` and `rules`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- run
class RunConfig(Section):
    """Where the run writes, and what it runs on."""

    name: str = Field("llmtrain", description="Name of the run, shown in logs and banners.")
    output_dir: str = Field(
        "runs/default",
        description="Directory for everything the run writes (relative paths are relative to "
        "the current directory).",
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seed for weight init, data order and dropout (0 to 2^32 - 1).",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="auto | cpu | cuda | cuda:N — auto takes CUDA when present.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op CPU threads of this process; null = $OMP_NUM_THREADS if set, "
        "else the physical cores. An explicit value wins over OMP_NUM_THREADS.",
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Peak FLOP/s of one device for MFU (e.g. 989e12); null = the table of "
        "common GPUs (engine/flops.py); CPU reports no MFU without it.",
    )
    cpu_allocator: Literal["retain", "system"] = Field(
        "retain",
        description="retain: glibc keeps freed memory for reuse (no page faults per step); "
        "system: glibc's default. $LLMTRAIN_CPU_ALLOCATOR overrides.",
    )


# ------------------------------------------------------------------------------------- model
class PeftConfig(Section):
    """LoRA / DoRA adapters on a pretrained model, built by the `peft` library."""

    method: Literal["lora", "dora"] = Field(
        "lora", description="lora | dora (weight-decomposed LoRA, peft's use_dora)."
    )
    r: int = Field(16, description="Rank of the low-rank update (must be at least 1).")
    alpha: float = Field(
        32.0, gt=0.0, description="Scale of the update: alpha / r (alpha / sqrt(r) with rslora)."
    )
    dropout: float = Field(
        0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input while training."
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="all-linear (every linear layer but the output head) or a list of module "
        "names, matched as name suffixes (e.g. [query, value]).",
    )
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full besides the adapters (the classification head is "
        "always one).",
    )


class QuantizeConfig(Section):
    """A quantized frozen base (QLoRA): bitsandbytes through transformers' BitsAndBytesConfig."""

    bits: Literal[4, 8] = Field(
        4, description="4 (nf4/fp4 blocks, QLoRA) | 8 (LLM.int8); needs model.peft."
    )
    type: Literal["nf4", "fp4"] = Field(
        "nf4", description="bits 4: the 4-bit data type (nf4 is QLoRA's NormalFloat)."
    )
    double_quant: bool = Field(
        True, description="bits 4: quantize the block scales too (about 0.4 bits/param saved)."
    )
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="dtype the quantized layers dequantize to for their matmuls; auto = the "
        "compute dtype of train.precision.",
    )


class ModelConfig(Section):
    """Which transformer to train: from scratch (`arch`) or a local checkpoint (`pretrained`)."""

    task: Literal["causal-lm", "sequence-classification"] = Field(
        "causal-lm", description="causal-lm | sequence-classification."
    )
    arch: str | None = Field(
        None, description="From scratch: a transformers model_type such as gpt2, llama, bert."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields of that architecture's HF config class (with `arch`), e.g. n_layer.",
    )
    pretrained: str | None = Field(
        None, description="Instead of `arch`: a local Hugging Face model directory."
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Applied to the HF config after loading, e.g. {resid_pdrop: 0.0} for gpt2.",
    )
    num_labels: int | None = Field(
        None,
        ge=2,
        description="sequence-classification: number of classes; from the data if unset.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, about 30% more compute."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto lets transformers pick (SDPA when available)."
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile (CUDA speed-up).")
    peft: PeftConfig | None = Field(
        None,
        description="Parameter-efficient fine-tuning of model.pretrained with peft (LoRA/DoRA); "
        "null trains every weight.",
    )
    frozen_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="dtype of the weights that do not train (a PEFT base); auto = the compute "
        "dtype of train.precision (bf16 for bf16, fp32 for fp32, fp64 for fp64). Trainable "
        "weights always keep fp32 (fp64) master copies.",
    )
    quantize: QuantizeConfig | None = Field(
        None,
        description="Quantize the frozen base with bitsandbytes (QLoRA); needs model.peft. "
        "null = off.",
    )


# --------------------------------------------------------------------------------- tokenizer
class TokenizerTrainConfig(Section):
    """A tokenizer trained on `data.train` with the `tokenizers` library."""

    kind: Literal["bpe", "wordpiece"] = Field(
        "bpe", description="bpe (byte-level, lossless) | wordpiece (BERT-style)."
    )
    vocab_size: int = Field(8192, ge=64, le=1_000_000, description="Target vocabulary size.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a merge.")


class TokenizerConfig(Section):
    """Where tokens come from: a local tokenizer, or one trained on the corpus (exactly one)."""

    path: str | None = Field(
        None, description="A local HF tokenizer directory or a tokenizer.json file."
    )
    train: TokenizerTrainConfig | None = Field(
        None, description="Instead of `path`: train a tokenizer on data.train (cached in the run)."
    )


# -------------------------------------------------------------------------------------- data
class DataSourceConfig(Section):
    """One corpus: files, folders or globs of .txt / .jsonl / .csv / .tsv (optionally .gz)."""

    path: str | list[str] = Field(
        ..., description="File, folder (recursive, sorted) or glob; or a list of them."
    )
    format: Literal["auto", "txt", "jsonl", "csv", "tsv", "chat"] = Field(
        "auto",
        description="File format; auto decides from the extension. chat: JSON Lines whose "
        "messages_field holds a conversation.",
    )
    messages_field: str = Field(
        "messages",
        description="format: chat: the field holding the conversation, a list of "
        "{role, content} (roles system, user, assistant).",
    )
    prompt_field: str | None = Field(
        None, description="Instruction pairs: the field holding the prompt (with response_field)."
    )
    response_field: str | None = Field(
        None, description="Instruction pairs: the field holding the response (with prompt_field)."
    )
    text_field: str = Field("text", description="jsonl/csv: the column holding the text.")
    label_field: str | None = Field(
        "label",
        description="jsonl/csv: the column holding the label (classification): a string or an "
        'integer, one type per corpus (1 and "1" are not one class; lists, booleans and '
        "floats are refused).",
    )
    id_field: str | None = Field(
        None, description="jsonl/csv: a column holding a document id; default file:line."
    )
    split: Literal["file", "lines", "paragraphs"] = Field(
        "file", description="txt: one document per file, per line, or per blank-line paragraph."
    )
    errors: Literal["strict", "replace"] = Field(
        "strict", description="Invalid UTF-8: strict is an error naming file and line; replace."
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A bad record (not JSON, missing field): raise, or skip and count it."
    )

    @property
    def records(self) -> Literal["text", "chat", "pairs"]:
        """What one record is: a text, a conversation (format: chat), or a prompt/response pair."""
        if self.format == "chat":
            return "chat"
        paired = self.prompt_field is not None or self.response_field is not None
        return "pairs" if paired else "text"


class ChunkConfig(Section):
    """How documents become fixed-length sequences."""

    seq_len: int = Field(512, ge=2, description="Tokens per chunk (special tokens included).")
    mode: Literal["pack", "window", "truncate"] = Field(
        "pack",
        description="pack: concatenate with EOS, no padding | window: overlapping windows per "
        "document | truncate: first seq_len tokens.",
    )
    overlap: int = Field(
        0,
        ge=0,
        description="window: tokens shared by consecutive windows (an error with pack or "
        "truncate, which never repeat tokens).",
    )
    min_tail: int | None = Field(
        None,
        ge=1,
        description="window: a last window shorter than this slides back to end at the "
        "document's end; default seq_len // 4.",
    )
    remainder: Literal["drop", "keep"] = Field(
        "drop", description="pack: the final partial chunk is dropped or kept (always counted)."
    )
    cross_doc_attention: bool = Field(
        True,
        description="pack: false restarts positions at each document and keeps attention "
        "inside documents.",
    )
    aggregate: Literal["mean_logits", "max_logits", "mean_probs", "first", "vote"] = Field(
        "mean_logits", description="classification: how window predictions combine per document."
    )


class SftConfig(Section):
    """Instruction data (chats or prompt/response pairs): which tokens carry the loss."""

    train_on: Literal["assistant", "all"] = Field(
        "assistant",
        description="assistant: loss on assistant turns (end-of-turn token included) only | "
        "all: on every token.",
    )
    chat_template: str | None = Field(
        None,
        description="null: the tokenizer's own chat template; else a path to a Jinja file "
        "rendered with tokenizer.apply_chat_template.",
    )


class DataConfig(Section):
    """Corpora, the token store, and chunking."""

    train: DataSourceConfig = Field(..., description="The training corpus.")
    eval: DataSourceConfig | None = Field(None, description="An evaluation corpus (same shape).")
    eval_fraction: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Instead of `eval`: hold out this fraction of training documents (by id hash).",
    )
    store: str | None = Field(None, description="TokenStore directory; default <output_dir>/store.")
    store_verify: Literal["auto", "full", "sampled"] = Field(
        "auto",
        description="Checksums checked when a store is reused: full (sha256 of every file) | "
        "sampled (sizes and a hash of 64 spread blocks per file: catches truncation and most "
        "edits, not every bit flip) | auto (full up to 1 GiB, else sampled).",
    )
    workers: int | None = Field(
        None, ge=1, description="Tokenizer threads for chunking; default all cores."
    )
    chunk: ChunkConfig = Field(default_factory=ChunkConfig, description="Chunking settings.")
    sft: SftConfig = Field(
        default_factory=SftConfig,
        description="Instruction data (data.train with format: chat, or prompt_field and "
        "response_field): loss masking and the chat template.",
    )

    @property
    def is_sft(self) -> bool:
        """Training data are conversations or prompt/response pairs (rendered, masked)."""
        return self.train.records != "text"


# ------------------------------------------------------------------------------------- batch
class ProbeConfig(Section):
    """How `probe-batch` (and `micro_batch: auto`) measures the largest micro-batch."""

    margin: float = Field(
        0.1, ge=0.0, lt=1.0, description="Memory headroom kept free, as a fraction of capacity."
    )
    max_micro: int = Field(4096, ge=1, description="Never try a micro-batch above this.")
    memory_limit: str | int | None = Field(
        None,
        description='Capacity to fit in, e.g. "2GiB" or bytes; default free device memory '
        "(CUDA) or a fraction of available RAM (CPU).",
    )
    cache: bool = Field(True, description="Reuse a cached probe result for the same setup.")


class BatchConfig(Section):
    """Global batch and micro-batch; accumulation k follows from them."""

    global_batch: int = Field(
        64, ge=1, description="Sequences per optimizer step, all devices together."
    )
    micro_batch: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description='Sequences per forward/backward, or "auto" to measure it.'
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="Probe settings.")


# ------------------------------------------------------------------------------------- optim
class OptimConfig(Section):
    """Optimizer and learning-rate schedule (counted in optimizer steps)."""

    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="adamw | adam | sgd.")
    lr: float = Field(3.0e-4, gt=0.0, description="Peak learning rate (before lr_scaling).")
    weight_decay: float = Field(
        0.1, ge=0.0, description="Decoupled weight decay (not on biases/norms)."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1.0e-8, gt=0.0, description="Adam epsilon.")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd: momentum.")
    grad_clip: float | None = Field(
        1.0, gt=0.0, description="Clip the global gradient norm to this; null disables."
    )
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="After warmup: constant | linear | cosine decay to min_lr_ratio."
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Linear warmup length, in optimizer steps; null: 5% of the run's steps "
        "(rounded up; shown in fit's banner).",
    )
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Final LR as a fraction of the peak (linear, cosine)."
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="Scale lr by f(global_batch / base_batch): none | linear | sqrt."
    )
    base_batch: int | None = Field(
        None, ge=1, description="The global batch that `lr` was tuned for (with lr_scaling)."
    )


# ------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    """Length, precision, loss normalisation, evaluation and checkpoints."""

    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to run (exactly one of max_steps / epochs)."
    )
    epochs: float | None = Field(None, gt=0.0, description="Passes over the training chunks.")
    precision: Literal["fp32", "bf16", "fp16", "fp64"] = Field(
        "bf16", description="fp32 | bf16 (autocast) | fp16 (autocast + GradScaler) | fp64."
    )
    loss_normalization: Literal["tokens", "sequences"] = Field(
        "tokens",
        description="Divide the window's summed loss by its supervised tokens or its sequences.",
    )
    loss_chunk: Annotated[int, Field(ge=1)] | Literal["auto", "off"] = Field(
        "auto",
        description="Causal LM: output projection + cross-entropy over chunks of this many "
        "supervised tokens, never the whole [batch, seq, vocab] logits; auto = as many as fit "
        "256 MiB of fp32 logits (256-4096); off = full logits. Exact either way.",
    )
    eval_every: int | None = Field(
        200, ge=1, description="Evaluate every N optimizer steps (and at the end); null: end only."
    )
    eval_max_batches: int | None = Field(
        None, ge=1, description="Cap evaluation at this many micro-batches; null: whole eval set."
    )
    save_every: int | None = Field(
        500, ge=1, description="Checkpoint every N optimizer steps (and at the end)."
    )
    keep_checkpoints: int = Field(3, ge=1, description="How many latest checkpoints to keep.")
    log_every: int = Field(
        10,
        ge=1,
        description="Write a train record every N optimizer steps (and at the first and last): "
        "its loss and grad_norm are the means, its tokens and sequences the sums, over the "
        "steps since the previous record.",
    )
    nan_policy: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN/inf loss: stop with a message, or skip that update (the run ends "
        "with a warning counting the skipped steps, loud when over half were skipped).",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: ddp (replicated) | fsdp (sharded, FSDP2)."
    )


# --------------------------------------------------------------------------------------- log
class LogConfig(Section):
    """What the run reports and where."""

    jsonl: bool = Field(True, description="Write <output_dir>/metrics.jsonl.")
    tensorboard: bool = Field(
        False, description="Also write TensorBoard events (needs tensorboard)."
    )
    progress: bool = Field(True, description="Show rich progress bars on a terminal.")


# ------------------------------------------------------------------------------------ config
class Config(Section):
    """A whole llmtrain config file."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and device.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model.")
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig, description="The tokenizer."
    )
    data: DataConfig = Field(..., description="Corpora and chunking.")
    batch: BatchConfig = Field(default_factory=BatchConfig, description="Batch sizes.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training run.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")


def section_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `DataSourceConfig | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = section_class(arg)
        if found is not None:
            return found
    return None


# `batch.probe.memory_limit` is a size: the `rules` module checks it parses, the probe reads it.
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip


def parse_bytes(value: str | int) -> int:
    """'2GiB' → 2147483648, '512MB' → 512000000, 4096 → 4096; bare K/M/G/T are binary.

    Raises ValueError with a short reason for anything else (zero and negatives included).
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 2GiB or 512MB")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError("expected a size such as 2GiB, 512MB or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError("must be a positive size")
    return n
