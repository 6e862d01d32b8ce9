"""The config contract (DESIGN §3): one pydantic model per YAML section.

Every field carries its one-line description where it is declared; `docs/config.md` is
generated from these descriptions by `scripts/gen_config_docs.py`. Every section forbids
unknown keys, so a typo is an error that names the key and suggests the closest one.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from llmtrain.errors import ConfigError


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
    seed: int = Field(0, description="Seed for weight init, data order and dropout.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="auto | cpu | cuda | cuda:N — auto takes CUDA when present.",
    )


# ------------------------------------------------------------------------------------- model
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
    format: Literal["auto", "txt", "jsonl", "csv", "tsv"] = Field(
        "auto", description="File format; auto decides from the extension."
    )
    text_field: str = Field("text", description="jsonl/csv: the column holding the text.")
    label_field: str | None = Field(
        "label", description="jsonl/csv: the column holding the label (classification)."
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


class ChunkConfig(Section):
    """How documents become fixed-length sequences."""

    seq_len: int = Field(512, ge=2, description="Tokens per chunk (special tokens included).")
    mode: Literal["pack", "window", "truncate"] = Field(
        "pack",
        description="pack: concatenate with EOS, no padding | window: overlapping windows per "
        "document | truncate: first seq_len tokens.",
    )
    overlap: int = Field(0, ge=0, description="window: tokens shared by consecutive windows.")
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
    workers: int | None = Field(
        None, ge=1, description="Tokenizer threads for chunking; default all cores."
    )
    chunk: ChunkConfig = Field(default_factory=ChunkConfig, description="Chunking settings.")


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
    warmup_steps: int = Field(100, ge=0, description="Linear warmup length, in optimizer steps.")
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
    log_every: int = Field(10, ge=1, description="Write a train record every N optimizer steps.")
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/inf loss: stop with a message, or skip that update."
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


# ==================================================================================== loading
# A config is read in four steps, each keeping track of where every key came from so that any
# error can point at a file:line:col (or at the `--set` that introduced the value):
#   1. YAML → plain mapping, plus a side map key path → position (`_read_yaml`);
#   2. `extends:` chains deep-merged, base first (`_read_with_extends`);
#   3. `--set KEY=VALUE` overrides applied to the merged mapping (`_apply_override`);
#   4. pydantic validation, then the cross-field rules of `llmtrain.config_checks`.
# All problems found are collected and raised together as one ConfigError.

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Where:
    """Where a key was defined: a file position, or the `--set` that set it."""

    file: str | None = None
    line: int | None = None
    col: int | None = None
    override: str | None = None

    def __str__(self) -> str:
        if self.override is not None:
            return f"--set {self.override}"
        if self.line is None:
            return str(self.file)
        return f"{self.file}:{self.line}:{self.col}"


Positions = dict[Path_, Where]


def dotted(path: Path_) -> str:
    """('data', 'train', 'path', 0) → 'data.train.path.0', the form errors and --set use."""
    return ".".join(str(p) for p in path)


def _error(where: Where | None, path: Path_, message: str) -> str:
    prefix = f"{where}: " if where is not None else ""
    return f"{prefix}{dotted(path)}: {message}" if path else f"{prefix}{message}"


def locate(positions: Positions, path: Path_) -> Where | None:
    """The position of `path`, or of its nearest enclosing key when it is not in the files."""
    for n in range(len(path), -1, -1):
        where = positions.get(tuple(path[:n]))
        if where is not None:
            return where
    return None


class _PositionLoader(yaml.SafeLoader):
    """The safe loader; composed nodes keep their marks, which `_walk_positions` records."""


def _walk_positions(
    node: yaml.Node, path: Path_, file: str, out: Positions, problems: list[str]
) -> None:
    """Record the position of every mapping key and list item under `node`."""
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key: Any = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            where = Where(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key_node.tag not in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"):
                problems.append(_error(where, path, f"key {key!r} must be a string (quote it)"))
            elif key in seen:
                problems.append(_error(where, (*path, key), "duplicate key"))
            seen.add(key)
            out[(*path, key)] = where
            _walk_positions(value_node, (*path, key), file, out, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = Where(file, item.start_mark.line + 1, item.start_mark.column + 1)
            _walk_positions(item, (*path, i), file, out, problems)


def _read_yaml(file: str) -> tuple[dict[str, Any], Positions]:
    """One YAML file → (mapping, positions). Raises ConfigError for anything but a mapping."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{file}: is a directory, expected a YAML config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: cannot read config file ({e})") from None
    loader = _PositionLoader(text)
    positions: Positions = {(): Where(file)}
    problems: list[str] = []
    try:
        node = loader.get_single_node()
        # Positions are read from the composed nodes before construction, which rewrites
        # merge keys (`<<: *base`) in place.
        if node is not None:
            _walk_positions(node, (), file, positions, problems)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(
            f"{file}:1:1: the file is empty; expected a mapping of sections (run, model, data, ...)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{file}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: expected a mapping "
            f"of sections (run, model, data, ...), got {_kind(data)}"
        )
    if problems:
        raise ConfigError(problems)
    return data, positions


def _deep_merge(
    base: dict[str, Any], over: dict[str, Any], base_pos: Positions, over_pos: Positions
) -> tuple[dict[str, Any], Positions]:
    """`over` on top of `base`: mappings merge key by key, anything else is replaced.

    Positions follow the values: a key keeps the position of the file that defined it last.
    """
    positions = dict(base_pos)

    def merge(dst: dict[str, Any], src: dict[str, Any], path: Path_) -> None:
        for key, value in src.items():
            sub = (*path, key)
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                dst[key] = dict(dst[key])
                merge(dst[key], value, sub)
            else:
                for p in [p for p in positions if p[: len(sub)] == sub]:
                    del positions[p]
                dst[key] = value

    merged = dict(base)
    merge(merged, over, ())
    positions.update({p: w for p, w in over_pos.items() if p})
    return merged, positions


def _read_with_extends(file: str, chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], Positions]:
    """Read `file` and, recursively, the files it `extends` (relative to itself)."""
    data, positions = _read_yaml(file)
    if "extends" not in data:
        return data, positions
    base_ref = data.pop("extends")
    where = positions.pop(("extends",))
    if base_ref is None:
        return data, positions
    if not isinstance(base_ref, str) or not base_ref:
        raise ConfigError(
            _error(where, ("extends",), f"must be a file name (got {_show(base_ref)})")
        )
    base_file = os.path.normpath(os.path.join(os.path.dirname(file), base_ref))
    seen = (*chain, os.path.realpath(file))
    if os.path.realpath(base_file) in seen:
        cycle = " -> ".join([*(os.path.relpath(p) for p in seen), base_file])
        raise ConfigError(_error(where, ("extends",), f"cycle: {cycle}"))
    if not os.path.isfile(base_file):
        raise ConfigError(
            _error(where, ("extends",), f"no such file {base_ref!r} (looked for {base_file})")
        )
    base, base_pos = _read_with_extends(base_file, seen)
    return _deep_merge(base, data, base_pos, positions)


def _parse_override(text: str) -> tuple[Path_, Any]:
    """'model.config.n_layer=2' → (('model', 'config', 'n_layer'), 2); the value is YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE (no '=' found)")
    key, _, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        raise ConfigError(f"--set {text}: the key must be a dotted path like batch.micro_batch")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {text}: the value is not valid YAML ({problem})") from None
    path: Path_ = tuple(int(p) if p.isdigit() else p.strip() for p in parts)
    return path, value


def _apply_override(data: dict[str, Any], positions: Positions, text: str) -> None:
    """Apply one `--set` to the nested mapping, creating mappings on the way as needed."""
    parts, value = _parse_override(text)
    node: Any = data
    path: Path_ = ()
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError(f"--set {text}: {dotted(path)} has no item {part!r}")
        elif isinstance(node, dict):
            part = str(part)
        else:
            raise ConfigError(
                f"--set {text}: {dotted(path)} is {_show(node)}, not a mapping; "
                f"cannot set {dotted(parts[i:])} inside it"
            )
        path = (*path, part)
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
    for p in [p for p in positions if p[: len(path)] == path]:
        del positions[p]
    where = Where(override=text)
    for p in _all_paths(value, path):
        positions[p] = where


def _all_paths(value: Any, path: Path_) -> list[Path_]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _all_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _all_paths(v, (*path, i))
    return out


def did_you_mean(word: str, candidates: Any) -> str:
    """', did you mean 'x'?' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


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


def _kind(value: Any) -> str:
    return {list: "a list", dict: "a mapping", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _show(value: Any) -> str:
    """A value as the user wrote it, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), *, check_model: bool = True
) -> Config:
    """Read, merge, override and validate a config file; every problem in one ConfigError.

    Relative paths inside the config (data, tokenizer, output_dir...) are relative to the
    current working directory, not to the config file — like any command-line path.
    `check_model=False` skips the rules that need the model's HF config class (they import
    transformers, hence torch): for commands such as `chunk` that never build the model.
    """
    cfg, _ = load_config_with_positions(path, overrides, check_model=check_model)
    return cfg


def load_config_with_positions(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), *, check_model: bool = True
) -> tuple[Config, Positions]:
    """`load_config`, also returning where each key was defined (for later error messages)."""
    data, positions = _read_with_extends(os.fspath(path))
    problems: list[str] = []
    for text in overrides:
        try:
            _apply_override(data, positions, text)
        except ConfigError as e:
            problems += e.messages
    if problems:
        raise ConfigError(problems)
    from llmtrain.config_checks import check_config, validation_problems

    cfg, errors = validation_problems(data)
    errors += check_config(cfg, data, check_model=check_model)
    if errors:
        errors.sort(key=lambda e: _sort_key(locate(positions, e[0])))
        raise ConfigError([_error(locate(positions, p), p, msg) for p, msg in errors])
    assert isinstance(cfg, Config)
    return cfg, positions


def _sort_key(where: Where | None) -> tuple[int, str, int, int]:
    if where is None:
        return (2, "", 0, 0)
    if where.override is not None:
        return (1, "", 0, 0)
    return (0, str(where.file), where.line or 0, where.col or 0)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, in section order; `load_config` of it gives `cfg` back."""
    return yaml.safe_dump(
        cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
