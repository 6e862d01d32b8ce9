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
from pathlib import PurePath
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from llmtrain import layout

# The largest integer any field holds: what numpy, torch and the C libraries below them store
# (int64). A larger one is a typo, and would fail far from the config with an OverflowError.
MAX_INT = 2**63 - 1
# Threads of one process: each is an OS thread with its own stack, started at once; no machine
# has this many cores, so more only thrashes.
MAX_THREADS = 1024


def _admits(annotation: Any, kind: type) -> bool:
    """Whether a value of `kind` belongs in a field of this annotation (Any admits all)."""
    if annotation is Any or annotation is kind:
        return True
    return any(_admits(a, kind) for a in get_args(annotation) if not isinstance(a, str))


def _scalars(value: Any) -> list[Any]:
    """The scalars of a value and of its lists (a mapping's values are its own fields)."""
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _scalars(item)]
    return [value]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment,
    and in every field of every section (those added later too): floats are finite, booleans
    are not numbers nor numbers booleans, integer fields hold at most 64 bits."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `true` as 1 (and 1.0); strict mode would also refuse a
        # list for a tuple, so the check is here, once, for every field of every section.
        annotation = cls.model_fields[info.field_name or ""].annotation
        if get_origin(annotation) is dict or _admits(annotation, dict):
            return value  # a free mapping (model.config): its values are checked by their owner
        numeric = _admits(annotation, int) or _admits(annotation, float)
        for x in _scalars(value):
            if isinstance(x, bool):
                if numeric and not _admits(annotation, bool):
                    raise PydanticCustomError("bool_as_number", "a boolean is not a number")
            elif isinstance(x, (int, float)) and not numeric and _admits(annotation, bool):
                raise PydanticCustomError("bool_strict", "a number is not a boolean")
            elif isinstance(x, int) and abs(x) > MAX_INT and not _admits(annotation, float):
                raise PydanticCustomError("int_too_large", "too large")
        return value


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
        le=MAX_THREADS,
        description="Intra-op CPU threads of this process (1 to 1024); null = $OMP_NUM_THREADS "
        "if set, else the physical cores. An explicit value wins over OMP_NUM_THREADS.",
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Peak FLOP/s of one device for MFU (e.g. 989e12); null = the table of "
        "common GPUs (engine/flops.py); CPU reports no MFU without it.",
    )
    cpu_allocator: Literal["retain", "system"] = Field(
        "retain",
        description="retain: glibc keeps freed memory for reuse (no page faults per step: "
        "the fastest, and 1.4-1.7x the resident memory of system on CPU); system: every block "
        "over 128 KiB is its own mapping, returned at free (the leanest, the most page faults). "
        "$LLMTRAIN_CPU_ALLOCATOR overrides. docs/benchmarks.md has the figures.",
    )


# ------------------------------------------------------------------------------------- model
class PeftConfig(Section):
    """Adapters on a pretrained model, built by the `peft` library (docs/training.md, "PEFT")."""

    method: Literal["lora", "dora", "adalora", "ia3", "loha", "lokr", "oft", "vera"] = Field(
        "lora",
        description="lora | dora (weight-decomposed LoRA) | adalora (rank budget reallocated "
        "while training) | ia3 | loha | lokr | oft | vera: peft methods whose adapters merge "
        "into the base for final/.",
    )
    r: int = Field(
        16,
        description="Rank of the low-rank update (must be at least 1); lora, dora, loha, "
        "lokr, vera.",
    )
    alpha: float = Field(
        32.0,
        gt=0.0,
        description="Scale of the update: alpha / r (alpha / sqrt(r) with rslora); lora, dora, "
        "adalora, loha, lokr.",
    )
    dropout: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapter's input while training; lora, dora, adalora, vera.",
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
    init_r: int = Field(12, ge=1, description="adalora: the rank every matrix starts with.")
    target_r: int = Field(
        8, ge=1, description="adalora: the average rank per matrix at the end (below init_r)."
    )
    tinit: int = Field(
        0, ge=0, description="adalora: optimizer steps at the full budget before it shrinks."
    )
    tfinal: int = Field(
        0, ge=0, description="adalora: last optimizer steps trained at the final rank pattern."
    )
    delta_t: int = Field(
        1, ge=1, description="adalora: optimizer steps between two rank reallocations."
    )
    beta1: float = Field(
        0.85, gt=0.0, lt=1.0, description="adalora: EMA factor of the importance scores."
    )
    beta2: float = Field(
        0.85, gt=0.0, lt=1.0, description="adalora: EMA factor of their uncertainty."
    )
    orth_reg_weight: float = Field(
        0.5,
        ge=0.0,
        description="adalora: weight w of the orthogonal regularizer; the objective is "
        "sum(token losses) / N + w * R(A, B), R added once per optimizer step.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Other fields of peft's config class for the method (e.g. "
        "{feedforward_modules: [...]} for ia3), checked against that class.",
    )
    lr_ratio: float | None = Field(
        None,
        gt=0.0,
        description="LoRA+ (lora, dora): the B matrices learn at lr_ratio x the LR (16 in the "
        "paper); null = one LR for all.",
    )
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="lora, dora: how the adapters start (peft's init_lora_weights): default "
        "(B = 0), gaussian, pissa (principal singular vectors; the base keeps the residual), "
        "olora (QR).",
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
    activation_offload: bool = Field(
        False,
        description="CUDA: keep the activations saved for backward in pinned host memory "
        "(torch.autograd.graph.save_on_cpu); with gradient_checkpointing only the layer inputs "
        "move. No effect on CPU (a notice says so).",
    )
    peft: PeftConfig | None = Field(
        None,
        description="Parameter-efficient fine-tuning of model.pretrained with peft (LoRA, "
        "AdaLoRA...); "
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
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a source's name is a folder name too


class DataSourceConfig(Section):
    """One corpus: files, folders or globs of .txt / .jsonl / .csv / .tsv (optionally .gz),
    .parquet, or Arrow (.arrow, a datasets.save_to_disk folder)."""

    path: str | list[str] = Field(
        ...,
        description="File, folder (recursive, sorted; a datasets.save_to_disk folder reads its "
        "Arrow shards) or glob; or a list of them. Regular files only: FIFOs and sockets in a "
        "folder are skipped with a warning.",
    )
    format: Literal["auto", "txt", "jsonl", "csv", "tsv", "parquet", "arrow", "chat"] = Field(
        "auto",
        description="File format; auto decides from the extension (.parquet, .arrow included). "
        "chat: records are conversations in messages_field, read from JSON Lines, or from "
        ".parquet/.arrow files (a list-of-structs column).",
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
    text_field: str = Field(
        "text", description="jsonl/csv/parquet/arrow: the column holding the text."
    )
    label_field: str | None = Field(
        "label",
        description="jsonl/csv/parquet/arrow: the column holding the label (classification): "
        'a string or an integer, one type per corpus (1 and "1" are not one class; lists, '
        "booleans and floats are refused).",
    )
    id_field: str | None = Field(
        None,
        description="jsonl/csv/parquet/arrow: a column holding a document id; default file:line "
        "(file:row N in parquet/arrow).",
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


def _eval_shape(value: Any) -> str:
    """data.eval is one corpus (a mapping with any corpus key), named corpora, or null:
    deciding here lets a mistake be reported against one shape, not against all three."""
    if value is None:
        return "none"
    if isinstance(value, dict) and value and not set(value) & set(DataSourceConfig.model_fields):
        return "named"
    return "one"


EvalCorpora = Annotated[
    Annotated[DataSourceConfig, Tag("one")]
    | Annotated[dict[str, DataSourceConfig], Tag("named")]
    | Annotated[None, Tag("none")],
    Discriminator(_eval_shape),
]


class TrainSourceConfig(DataSourceConfig):
    """The training corpus; in a list of sources (a mixture), each also takes weight and name."""

    weight: float | None = Field(
        None,
        gt=0,
        description="A list's source only: its share of an epoch, relative to the other "
        "sources' weights; default its "
        "size in sequences (no source repeated). A source asked for more sequences than it "
        "holds is repeated (up-sampled; shown by fit --dry-run).",
    )
    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        max_length=64,
        description="A list's source only: its name in records, tables and its store folder "
        "(store/train-<name>); "
        "default the first path's file or folder name without extensions. Names are unique.",
    )


class TrainPart(NamedTuple):
    """One training source as the stages see it: its name (None for a single source), its
    store folder under the store root, the config key its messages name, and its corpus."""

    name: str | None
    store: str
    key: str
    source: DataSourceConfig


def default_source_name(source: DataSourceConfig, index: int) -> str:
    """The name of an unnamed mixture source: its first path's last part, extensions
    dropped (`web.jsonl.gz` → `web`), other characters than [A-Za-z0-9_.-] as `_`;
    `source<index>` when nothing is left."""
    first = source.path if isinstance(source.path, str) else (source.path or [""])[0]
    stem = PurePath(first.rstrip("/")).name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("_.-")
    return stem[:64] or f"source{index}"


def _train_kind(value: Any) -> str:
    return "list" if isinstance(value, list) else "source"


# data.train: one source, or a list of weighted sources. A callable discriminator picks the
# branch from the value's shape, so a mistake is reported for the shape written only.
TrainSources = Annotated[
    Annotated[list[TrainSourceConfig], Tag("list")] | Annotated[DataSourceConfig, Tag("source")],
    Discriminator(_train_kind),
]


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

    template: Literal["chat", "none"] = Field(
        "chat",
        description="chat: render records with the chat template | none (prompt/response "
        "pairs only, e.g. a base model without a template): prompt + response + EOS tokenized "
        "as one text, the loss on the response and the EOS; a token straddling the boundary "
        "is a target.",
    )

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

    train: TrainSources = Field(
        ...,
        description="The training corpus: one source, or a list of sources, each with an "
        'optional weight and name (a weighted mixture; docs/training.md, "Mixtures").',
    )
    eval: EvalCorpora = Field(
        None,
        description="An evaluation corpus (same shape), or named ones {name: corpus}, each "
        "evaluated and logged on its own as split eval/<name>.",
    )
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
        None,
        ge=1,
        le=MAX_THREADS,
        description="Tokenizer threads for chunking (1 to 1024); default all cores.",
    )
    chunk: ChunkConfig = Field(default_factory=ChunkConfig, description="Chunking settings.")
    sft: SftConfig = Field(
        default_factory=SftConfig,
        description="Instruction data (data.train with format: chat, or prompt_field and "
        "response_field): loss masking and the chat template.",
    )

    @property
    def is_mixture(self) -> bool:
        """data.train is a list of sources (even of one): named stores, a mixed order."""
        return isinstance(self.train, list)

    @property
    def train_parts(self) -> list[TrainPart]:
        """The training sources, in config order: a single source is `train` in store/train,
        a mixture's are `train-<name>` (names defaulted by `default_source_name`)."""
        if not isinstance(self.train, list):
            return [TrainPart(None, layout.TRAIN_SPLIT, "data.train", self.train)]
        return [
            TrainPart(n, layout.train_source_store(n), f"data.train.{i}", s)
            for i, (n, s) in enumerate(zip(self.source_names, self.train, strict=True))
        ]

    @property
    def source_names(self) -> list[str]:
        """The names of a mixture's sources, given or defaulted; [] for a single source."""
        if not isinstance(self.train, list):
            return []
        return [s.name or default_source_name(s, i) for i, s in enumerate(self.train)]

    @property
    def is_sft(self) -> bool:
        """Training data are conversations or prompt/response pairs (rendered, masked)."""
        return any(p.source.records != "text" for p in self.train_parts)

    @property
    def is_isolated(self) -> bool:
        """Pack mode with attention kept inside documents: asked for, or instruction data
        (packed conversations never see each other; positions restart at each)."""
        return self.chunk.mode == "pack" and (not self.chunk.cross_doc_attention or self.is_sft)

    @property
    def eval_sets(self) -> dict[str, DataSourceConfig]:
        """The eval corpora by split: {"eval": source} for one, {"eval/<name>": source} for
        named ones, {} without (`eval_fraction` holds out a split "eval" from train)."""
        if self.eval is None:
            return {}
        if isinstance(self.eval, DataSourceConfig):
            return {"eval": self.eval}
        return {f"eval/{name}": source for name, source in self.eval.items()}

    def sources(self) -> list[tuple[tuple[str | int, ...], DataSourceConfig]]:
        """Every corpus with its key path: data.train (data.train.N of a mixture), then
        data.eval or data.eval.<name>."""
        found: list[tuple[tuple[str | int, ...], DataSourceConfig]] = [
            ((("data", "train", i) if self.is_mixture else ("data", "train")), part.source)
            for i, part in enumerate(self.train_parts)
        ]
        for split, source in self.eval_sets.items():
            found.append((("data", *split.split("/")), source))
        return found


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
# An Adam beta is a decay rate: 1 never forgets (the moments stop moving), above 1 diverges.
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class OptimConfig(Section):
    """Optimizer and learning-rate schedule (counted in optimizer steps)."""

    name: Literal["adamw", "adam", "sgd", "adamw8bit", "paged_adamw8bit"] = Field(
        "adamw",
        description="adamw | adam | sgd | adamw8bit (bitsandbytes: Adam's two moments in 8 bits, "
        "2 bytes per parameter instead of 8) | paged_adamw8bit (the same, paged to host memory "
        "under pressure; CUDA only).",
    )
    lr: float = Field(3.0e-4, gt=0.0, description="Peak learning rate (before lr_scaling).")
    weight_decay: float = Field(
        0.1, ge=0.0, description="Decoupled weight decay (not on biases/norms)."
    )
    betas: tuple[Beta, Beta] = Field(
        (0.9, 0.95), description="Adam betas (beta1, beta2), each in [0, 1)."
    )
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
    best_metric: str | None = Field(
        None,
        description="What 'best eval' means (report): SPLIT:KEY, e.g. eval:loss or "
        "eval/web:doc_accuracy (SPLIT as in metrics.jsonl); loss and ppl are best lowest, "
        "accuracies highest. null: loss of the (first) eval set.",
    )


# --------------------------------------------------------------------------------------- log
class WandbConfig(Section):
    """Weights & Biases: the run's records as W&B metrics (needs wandb)."""

    project: str | None = Field(None, description="W&B project; null: run.name.")
    entity: str | None = Field(None, description="W&B entity (user or team); null: yours.")
    name: str | None = Field(None, description="The W&B run's display name; null: run.name.")
    tags: list[str] = Field(default_factory=list, description="Tags of the W&B run.")
    mode: Literal["online", "offline"] = Field(
        "online",
        description="online: to the W&B server | offline: into <output_dir>/wandb/ only "
        "(upload later with `wandb sync`).",
    )


class MlflowConfig(Section):
    """MLflow: the run's records as MLflow metrics (needs mlflow)."""

    tracking_uri: str | None = Field(
        None,
        description='Where MLflow stores runs, e.g. "file:./mlruns", "sqlite:///mlflow.db" '
        "or an http(s) server; null: MLflow's own default (MLFLOW_TRACKING_URI).",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment name (created when missing); null: run.name."
    )
    run_name: str | None = Field(None, description="The MLflow run's name; null: run.name.")


class LogConfig(Section):
    """What the run reports and where."""

    jsonl: bool = Field(True, description="Write <output_dir>/metrics.jsonl.")
    tensorboard: bool = Field(
        False, description="Also write TensorBoard events (needs tensorboard)."
    )
    progress: bool = Field(True, description="Show rich progress bars on a terminal.")
    wandb: WandbConfig | None = Field(
        None, description="Also log to Weights & Biases (rank 0; resumes the same W&B run)."
    )
    mlflow: MlflowConfig | None = Field(
        None, description="Also log to MLflow (rank 0; resumes the same MLflow run)."
    )


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


# What an eval record holds, by task: the keys train.best_metric may name.
EVAL_KEYS = {
    "causal-lm": ("loss", "ppl"),
    "sequence-classification": ("loss", "accuracy", "doc_accuracy"),
}
HIGHER_IS_BETTER = ("accuracy", "doc_accuracy")


def eval_splits(cfg: Config) -> list[str]:
    """The splits of the run's eval records: eval, or eval/<name> per named set."""
    return list(cfg.data.eval_sets) or (["eval"] if cfg.data.eval_fraction else [])


def best_metric(cfg: Config) -> tuple[str, str] | None:
    """(split, key) that 'best eval' refers to: train.best_metric, else the first eval
    split's loss; None without eval data."""
    if cfg.train.best_metric is not None:
        split, _, key = cfg.train.best_metric.partition(":")
        return split, key
    splits = eval_splits(cfg)
    return (splits[0], "loss") if splits else None


def section_class(annotation: Any, *, listed: bool | None = None) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `DataSourceConfig | None`. For a
    section-or-list union (data.train), `listed=False` skips the list branch; otherwise the
    first model found (the list's items, which declare every key) is the answer."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = get_args(annotation)
    if get_origin(annotation) is list:
        return None if listed is False else section_class(args[0])
    for arg in args:
        found = section_class(arg, listed=listed)
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
