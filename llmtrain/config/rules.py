"""The cross-field rules: what a config must satisfy beyond each field's type and range.

A rule gets the validated config (a section is None where it failed validation, and rules on
it are skipped) and the user's raw mapping (to tell a value written in the file from a
default), and yields `(key path, message)` problems. Rules marked `hf=True` read the model's
HF config class and import transformers (hence torch) lazily, so `llmtrain validate` on a
config, and commands that never build the model, stay light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import inspect
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from llmtrain.config.messages import KeyPath, Problem, did_you_mean, dotted, kind_of, show_value
from llmtrain.config.schema import Config, SftConfig, parse_bytes

# A rule gets the config and the user's mapping (to tell a value set in the file from a default).
Rule = Callable[[Config, dict[str, Any]], Iterator[Problem]]
RULES: list[tuple[tuple[str, ...], bool, Rule]] = []


def rule(*sections: str, hf: bool = False) -> Callable[[Rule], Rule]:
    """Register a cross-field rule; it runs only when its sections validated.

    `hf=True` marks rules that read the model's HF config class: importing transformers also
    imports torch (seconds), so commands that never build the model can skip them.
    """

    def register(fn: Rule) -> Rule:
        RULES.append((sections, hf, fn))
        return fn

    return register


def check_config(
    cfg: Config, data: dict[str, Any] | None = None, *, check_model: bool = True
) -> list[Problem]:
    """Every cross-field problem of `cfg` (whose sections may be None where invalid)."""
    problems: list[Problem] = []
    for sections, hf, fn in RULES:
        if hf and not check_model:
            continue
        if all(getattr(cfg, s, None) is not None for s in sections):
            problems += list(fn(cfg, data or {}))
    return problems


@rule("model")
def _model_source(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    m = cfg.model
    if m.arch and m.pretrained:
        yield (
            ("model", "pretrained"),
            "set either model.arch (from scratch) or model.pretrained, not both",
        )
    if not m.arch and not m.pretrained:
        yield (
            ("model", "arch"),
            (
                "is required: set model.arch (a transformers model_type such as gpt2) "
                "or model.pretrained (a local model directory)"
            ),
        )
    if m.pretrained and m.config:
        yield (
            ("model", "config"),
            ("only applies with model.arch; change a pretrained model with model.config_overrides"),
        )
    if m.num_labels is not None and m.task != "sequence-classification":
        yield ("model", "num_labels"), "only applies to task: sequence-classification"


@rule("train")
def _train_length(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    t = cfg.train
    if t.max_steps is not None and t.epochs is not None:
        yield ("train", "epochs"), "set either train.max_steps or train.epochs, not both"
    if t.max_steps is None and t.epochs is None:
        yield ("train", "max_steps"), "is required: set train.max_steps or train.epochs"


@rule("run")
def _output_dir(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    # '' would be the current directory: the run's files would land among the user's own
    if not cfg.run.output_dir.strip():
        yield ("run", "output_dir"), "is empty: give the run's own directory, e.g. runs/my-run"


@rule("data")
def _store_dir(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    if cfg.data.store is not None and not cfg.data.store.strip():
        yield ("data", "store"), "is empty: give a folder for the stores, or leave it unset"


@rule("tokenizer")
def _tokenizer_source(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    t = cfg.tokenizer
    if t.path is not None and t.train is not None:
        yield ("tokenizer", "train"), "set either tokenizer.path or tokenizer.train, not both"
    if t.path is None and t.train is None:
        yield (
            ("tokenizer", "path"),
            (
                "is required: set tokenizer.path (a local tokenizer) or tokenizer.train "
                "(e.g. {kind: bpe, vocab_size: 8192})"
            ),
        )
    if t.path is not None and not os.path.exists(t.path):
        yield (
            ("tokenizer", "path"),
            (
                f"no such file or directory {t.path!r} (relative paths are from the current "
                f"directory, {os.getcwd()})"
            ),
        )


@rule("data")
def _data_sources(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    d = cfg.data
    if d.eval is not None and d.eval_fraction is not None:
        yield ("data", "eval_fraction"), "set either data.eval or data.eval_fraction, not both"
    for split in ("train", "eval"):
        source = getattr(d, split)
        if source is None:
            continue
        paths = [source.path] if isinstance(source.path, str) else list(source.path)
        if not paths:
            yield ("data", split, "path"), "must name at least one file, folder or glob"
        for i, p in enumerate(paths):
            key = (
                ("data", split, "path")
                if isinstance(source.path, str)
                else ("data", split, "path", i)
            )
            if os.path.exists(p):
                continue
            if glob.has_magic(p):
                if not glob.glob(p, recursive=True):
                    yield key, f"the glob {p!r} matches no files"
                continue
            yield (
                key,
                (
                    f"no such file or directory {p!r} (relative paths are from the current "
                    f"directory, {os.getcwd()})"
                ),
            )


@rule("data")
def _chunking(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    c = cfg.data.chunk
    if c.mode != "window" and c.overlap > 0:
        # Refused, not ignored: the user asked for repeated context that this mode never makes.
        yield (
            ("data", "chunk", "overlap"),
            (
                f"only applies to mode: window ({c.mode} never repeats tokens, got overlap "
                f"{c.overlap}); remove it or set data.chunk.mode: window"
            ),
        )
    if c.mode == "window" and c.overlap >= c.seq_len:
        yield (
            ("data", "chunk", "overlap"),
            (f"must be smaller than data.chunk.seq_len={c.seq_len} (got {c.overlap})"),
        )
    if c.min_tail is not None and c.min_tail > c.seq_len:
        yield (
            ("data", "chunk", "min_tail"),
            (f"must be at most data.chunk.seq_len={c.seq_len} (got {c.min_tail})"),
        )


@rule("data", "model")
def _pack_needs_lm(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    if cfg.model.task == "sequence-classification" and cfg.data.chunk.mode == "pack":
        yield (
            ("data", "chunk", "mode"),
            (
                "pack mixes documents in one sequence, so it cannot carry one label per sequence; "
                "use window or truncate with task: sequence-classification"
            ),
        )


@rule("batch")
def _batch(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    b = cfg.batch
    if isinstance(b.micro_batch, int) and b.micro_batch > b.global_batch:
        yield (
            ("batch", "micro_batch"),
            (f"must be at most batch.global_batch={b.global_batch} (got {b.micro_batch})"),
        )
    if b.probe.memory_limit is not None:
        try:
            parse_bytes(b.probe.memory_limit)
        except ValueError as e:
            yield (
                ("batch", "probe", "memory_limit"),
                f"{e} (got {show_value(b.probe.memory_limit)})",
            )


@rule("optim")
def _lr_scaling(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    o = cfg.optim
    if o.lr_scaling != "none" and o.base_batch is None:
        yield (
            ("optim", "base_batch"),
            (
                f"is required with lr_scaling: {o.lr_scaling} (the global batch that optim.lr was "
                "tuned for)"
            ),
        )


@rule("optim", "train")
def _warmup(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    # The default (null) follows the run's length; a number the user wrote must fit in it
    # (with train.epochs the length is known only once the data is: engine.optim checks then).
    steps, warmup = cfg.train.max_steps, cfg.optim.warmup_steps
    if warmup is not None and steps is not None and warmup > steps:
        yield (
            ("optim", "warmup_steps"),
            (f"must be at most train.max_steps={steps} (got {cfg.optim.warmup_steps})"),
        )


@rule("run", "model")
def _attention_on_cpu(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    if cfg.run.device == "cpu" and cfg.model.attn_implementation == "flash_attention_2":
        yield (
            ("model", "attn_implementation"),
            ("flash_attention_2 needs a CUDA device; use sdpa, eager or auto with run.device: cpu"),
        )


@rule("model", "train")
def _peft(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    p = cfg.model.peft
    if p is None:
        return
    if cfg.model.arch:
        yield (
            ("model", "peft"),
            "adapts a pretrained model: set model.pretrained (a local model directory) "
            "instead of model.arch, or remove model.peft to train from scratch",
        )
    if p.r < 1:
        yield ("model", "peft", "r"), f"must be at least 1 (got {p.r}); 8 to 64 is usual"
    if cfg.train.parallel == "fsdp":
        yield (
            ("train", "parallel"),
            "fsdp is not supported with model.peft (the frozen base is small to replicate next "
            "to its optimizer state); use train.parallel: ddp",
        )


@rule("model", hf=True)
def _peft_targets(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """Every listed target names a module of the model, matched as peft does (whole name or a
    dotted suffix); the skeleton is built on the meta device, so nothing is allocated."""
    m = cfg.model
    p = m.peft
    if p is None or not m.pretrained or not isinstance(p.target_modules, list):
        return
    names = _module_names(m.pretrained, m.task)
    if names is None:  # not a model directory: _model_limits says so
        return
    modules, linear = names
    for i, target in enumerate(p.target_modules):
        if not any(n == target or n.endswith("." + target) for n in modules):
            yield (
                ("model", "peft", "target_modules", i),
                f"no module of the model is named {target!r}"
                + did_you_mean(target, linear)
                + f"; its linear layers are: {', '.join(linear)} (or use all-linear)",
            )


def _module_names(directory: str, task: str) -> tuple[list[str], list[str]] | None:
    """(every module's dotted name, the distinct last names of its linear layers), from the
    model's config alone; None when the directory does not hold a loadable config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    try:
        hf = AutoConfig.from_pretrained(directory)
        auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
        with torch.device("meta"):
            skeleton = auto.from_config(hf)
    except (OSError, ValueError, KeyError):
        return None
    modules = [n for n, _ in skeleton.named_modules() if n]
    kinds = (torch.nn.Linear, Conv1D)  # GPT-2 writes its linear layers as Conv1D
    linear = {n.rsplit(".", 1)[-1] for n, mod in skeleton.named_modules() if isinstance(mod, kinds)}
    return modules, sorted(linear)


@rule("data", "model")
def _sft_data(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """Instruction data: a causal LM, pack or truncate, both pair fields, a template file."""
    d = cfg.data
    for split in ("train", "eval"):
        source = getattr(d, split)
        if source is None:
            continue
        if (source.prompt_field is None) != (source.response_field is None):
            missing = "prompt_field" if source.prompt_field is None else "response_field"
            yield (
                ("data", split, missing),
                "instruction pairs need both prompt_field and response_field",
            )
        if source.format == "chat" and source.prompt_field is not None:
            yield (
                ("data", split, "prompt_field"),
                "format: chat reads messages_field; use prompt_field/response_field without it",
            )
    data_raw = raw.get("data")
    # a resolved config (config.resolved.yaml, `validate` output) spells out the defaults
    sft_given = isinstance(data_raw, dict) and "sft" in data_raw and d.sft != SftConfig()
    if not d.is_sft:
        if sft_given:
            yield (
                ("data", "sft"),
                "applies to instruction data: set data.train.format: chat (with messages_field) "
                "or data.train.prompt_field and response_field",
            )
        return
    if cfg.model.task != "causal-lm":
        yield ("model", "task"), "instruction data (chats or pairs) trains a causal-lm"
    if d.chunk.mode == "window":
        yield (
            ("data", "chunk", "mode"),
            "window cuts documents for classification; use pack or truncate with instruction data",
        )
    template = d.sft.chat_template
    if template is not None and not os.path.isfile(template):
        yield (
            ("data", "sft", "chat_template"),
            f"no such file {template!r} (a Jinja chat template; relative paths are from the "
            f"current directory, {os.getcwd()})",
        )


@rule("data", "tokenizer")
def _sft_template(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """Instruction data needs a chat template: data.sft.chat_template or the tokenizer's own."""
    if not cfg.data.is_sft or cfg.data.sft.chat_template is not None:
        return
    path = cfg.tokenizer.path
    if path is not None and not os.path.exists(path):
        return  # _tokenizer_source reports it
    if path is not None and _has_chat_template(path):
        return
    whose = f"the tokenizer at {path!r}" if path else "a tokenizer trained by tokenizer.train"
    yield (
        ("data", "sft", "chat_template"),
        f"is required: {whose} has no chat template; set data.sft.chat_template to a Jinja "
        "file (e.g. configs/chat-template.jinja)",
    )


def _has_chat_template(path: str) -> bool:
    """A saved tokenizer directory carries a template (chat_template.jinja, chat_template.json
    or tokenizer_config.json's chat_template); a bare tokenizer.json never does."""
    if not os.path.isdir(path):
        return False
    files = ("chat_template.jinja", "chat_template.json")
    if any(os.path.isfile(os.path.join(path, f)) for f in files):
        return True
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


# Models whose position ids start after the padding index (fairseq heritage): the usable
# length is max_position_embeddings - 2. A twin of engine.model.POSITION_OFFSET (config/
# must not import engine/); tests/test_config.py checks that the two agree.
_POSITION_OFFSET = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
    "data2vec-text", "longformer",
}  # fmt: skip
_POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")
# The names HF configs give the depth (attribute_map aliases included); zero builds a model
# that trains nothing but the embeddings, and says nothing.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@rule("model", hf=True)
def _model_limits(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """The HF config class knows the model's fields and its position limit."""
    m = cfg.model
    if bool(m.arch) == bool(m.pretrained):
        return
    if m.arch:
        values, model_type, problems = _arch_config(m.arch, m.config, m.config_overrides)
        where_limit = ("model", "config")
    else:
        assert m.pretrained is not None
        values, model_type, problems = _pretrained_config(m.pretrained, m.config_overrides)
        where_limit = ("model", "config_overrides")
    yield from problems
    if values is None:
        return
    yield from _layer_count(values, m.config, m.config_overrides, where_limit)
    if cfg.data is None:
        return
    for key in _POSITION_KEYS:
        limit = values.get(key)
        if isinstance(limit, int) and limit > 0:
            usable = limit - 2 if model_type in _POSITION_OFFSET else limit
            seq_len = cfg.data.chunk.seq_len
            if seq_len > usable:
                yield (
                    ("data", "chunk", "seq_len"),
                    (
                        f"{seq_len} is above the model's position limit {key}={limit}"
                        + (" (minus 2 for padding offset)" if usable != limit else "")
                        + f"; use seq_len <= {usable} or raise {dotted(where_limit)}.{key}"
                    ),
                )
            break


def _layer_count(
    values: dict[str, Any],
    config: dict[str, Any],
    overrides: dict[str, Any],
    where: KeyPath,
) -> Iterator[Problem]:
    """A depth below 1, named at the key the user wrote (else at model.config / overrides)."""
    for key in _LAYER_KEYS:
        n = values.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n < 1:
            written = [k for k in _LAYER_KEYS if k in overrides or k in config]
            if not written:
                yield where, f"{key} must be at least 1: a model needs a layer (got {n})"
                return
            section = "config_overrides" if written[0] in overrides else "config"
            path: KeyPath = ("model", section, written[0])
            yield path, f"must be at least 1: a model needs a layer (got {n})"
            return


def _arch_config(
    arch: str, config: dict[str, Any], overrides: dict[str, Any]
) -> tuple[dict[str, Any] | None, str, list[Problem]]:
    """(position fields of the built HF config, model_type, problems); None when it fails."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if arch not in CONFIG_MAPPING:
        hint = did_you_mean(arch, CONFIG_MAPPING.keys())
        return (
            None,
            arch,
            [
                (
                    ("model", "arch"),
                    f"unknown transformers model_type {arch!r}"
                    + (hint or " (e.g. gpt2, llama, bert, roberta)"),
                )
            ],
        )
    cls = CONFIG_MAPPING[arch]
    known = _known_fields(cls)
    problems: list[Problem] = []
    for section, values in (("config", config), ("config_overrides", overrides)):
        for key in values:
            if key not in known:
                hint = did_you_mean(key, known)
                problems.append((("model", section, key), f"not a field of {cls.__name__}" + hint))
    if problems:
        return None, arch, problems
    merged = {**config, **overrides}
    # The run's special ids come from its tokenizer (engine/model.py); the class defaults (GPT-2's
    # 50256) may lie outside a smaller vocab_size, which transformers warns about here.
    unset = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    try:
        hf = cls(**{**unset, **merged})
    except Exception as e:  # the HF config class validates types (strict dataclasses)
        text = " ".join(str(e).split())
        field = re.search(r"field '(\w+)'", text)
        section = "config_overrides" if field and field.group(1) in overrides else "config"
        path: KeyPath = ("model", section, field.group(1)) if field else ("model", "config")
        reason = text.split(": ", 1)[-1] if field else text
        return None, arch, [(path, f"rejected by {cls.__name__}: {reason}")]
    values = {k: getattr(hf, k, None) for k in (*_POSITION_KEYS, *_LAYER_KEYS)}
    return values, arch, []


def _known_fields(cls: type) -> set[str]:
    """Every name an HF config class accepts: attribute aliases, fields, __init__ params."""
    known: set[str] = set(getattr(cls, "attribute_map", {}) or {})
    if dataclasses.is_dataclass(cls):
        known |= {f.name for f in dataclasses.fields(cls)}
    known |= set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    # A class that cannot build with defaults: its signature and fields suffice.
    with contextlib.suppress(Exception):
        known |= set(vars(cls()))
    return known


def _pretrained_config(
    directory: str, overrides: dict[str, Any]
) -> tuple[dict[str, Any] | None, str, list[Problem]]:
    """(config.json values with overrides, its model_type, problems); None when unreadable."""
    key: KeyPath = ("model", "pretrained")
    if not os.path.isdir(directory):
        return (
            None,
            "",
            [
                (
                    key,
                    f"no such directory {directory!r} (a local Hugging Face model "
                    f"directory; relative paths are from {os.getcwd()})",
                )
            ],
        )
    config_file = os.path.join(directory, "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        return (
            None,
            "",
            [
                (
                    key,
                    f"{directory!r} has no config.json; not a Hugging Face model "
                    "directory (save one with save_pretrained)",
                )
            ],
        )
    except (OSError, ValueError) as e:
        return None, "", [(key, f"cannot read {config_file}: {e}")]
    if not isinstance(values, dict):
        return None, "", [(key, f"{config_file} is {kind_of(values)}, expected a JSON object")]
    return {**values, **overrides}, str(values.get("model_type", "")), []
