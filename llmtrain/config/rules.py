"""The cross-field rules: what a config must satisfy beyond each field's type and range.

A rule gets the validated config (a section is None where it failed validation, and rules on
it are skipped) and the user's raw mapping (to tell a value written in the file from a
default), and yields `(key path, message)` problems. Rules marked `hf=True` read the model's
HF config class and import transformers (hence torch: transformers' configuration_utils imports
torch whenever it is installed) lazily. `check_model=False` skips them (a trained run's config);
`chunk`, which never builds the model, loads with `check_model="light"`: the `light=True` rules
run in their place, with the checks that need only files (a pretrained config.json, keys
written in the YAML).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import inspect
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

from llmtrain.config.messages import KeyPath, Problem, did_you_mean, dotted, kind_of, show_value
from llmtrain.config.peft_methods import ADALORA_FIELDS, BOOKKEEPING, METHODS, owner_of
from llmtrain.config.schema import (
    EVAL_KEYS,
    Config,
    DataConfig,
    SftConfig,
    eval_splits,
    parse_bytes,
)

# A rule gets the config and the user's mapping (to tell a value set in the file from a default).
Rule = Callable[[Config, dict[str, Any]], Iterator[Problem]]
# (sections, when, rule): when is "always", "model" (the hf rules) or "light" (their torch-free
# stand-in, run in their place with check_model="light").
RULES: list[tuple[tuple[str, ...], str, Rule]] = []
# check_config's model checks: all (True), none (False) or the torch-free part ("light").
ModelCheck = bool | Literal["light"]


def rule(*sections: str, hf: bool = False, light: bool = False) -> Callable[[Rule], Rule]:
    """Register a cross-field rule; it runs only when its sections validated.

    `hf=True` marks rules that read the model's HF config class: importing transformers also
    imports torch (seconds), so commands that never build the model can skip them.
    `light=True` marks a rule that runs only with `check_model="light"`, in their place.
    """

    def register(fn: Rule) -> Rule:
        RULES.append((sections, "model" if hf else "light" if light else "always", fn))
        return fn

    return register


def check_config(
    cfg: Config, data: dict[str, Any] | None = None, *, check_model: ModelCheck = True
) -> list[Problem]:
    """Every cross-field problem of `cfg` (whose sections may be None where invalid)."""
    problems: list[Problem] = []
    runs = {"always", "light" if check_model == "light" else "model" if check_model else ""}
    for sections, when, fn in RULES:
        if when not in runs:
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


def _directory_problem(path: str) -> str | None:
    """Why `path` cannot be (or become) a directory the run writes into; None when it can."""
    if not path.strip():
        return "must name a directory (got an empty path)"
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path!r} is a file, not a directory; name a directory (or move the file)"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent!r} is a file, so no directory can be made under it"
    return None


@rule("run", "data")
def _written_directories(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """The folders the run writes into: never empty (that writes into the current
    directory), never a file, nor under one."""
    places = [(("run", "output_dir"), cfg.run.output_dir)]
    if cfg.data.store is not None:
        places.append((("data", "store"), cfg.data.store))
    for key, path in places:
        problem = _directory_problem(path)
        if problem is not None:
            yield key, problem


@rule("data")
def _data_sources(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    d = cfg.data
    if d.eval is not None and d.eval_fraction is not None:
        yield ("data", "eval_fraction"), "set either data.eval or data.eval_fraction, not both"
    if isinstance(d.eval, dict):
        yield from _eval_names(list(d.eval))
    for where, source in d.sources():
        paths = [source.path] if isinstance(source.path, str) else list(source.path)
        if not paths:
            yield (*where, "path"), "must name at least one file, folder or glob"
        for i, p in enumerate(paths):
            key = (*where, "path") if isinstance(source.path, str) else (*where, "path", i)
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
    yield from _mixture(d)


def _mixture(d: DataConfig) -> Iterator[Problem]:
    """A mixture's sources: at least one, names unique (each is a store folder and a record
    key), all text or all instruction data (one packing and one loss for the whole mix)."""
    if not isinstance(d.train, list):
        return
    if not d.train:
        yield ("data", "train"), "must list at least one source ({path: ...})"
    seen: dict[str, int] = {}
    for i, (name, source) in enumerate(zip(d.source_names, d.train, strict=True)):
        if name in seen:
            given = source.name is not None
            yield (
                ("data", "train", i, "name") if given else ("data", "train", i),
                f"the source name {name!r} is already data.train.{seen[name]}'s"
                + ("" if given else " (derived from its path)")
                + "; set a unique name: on this source",
            )
        seen.setdefault(name, i)
    kinds = {s.records != "text" for s in d.train}
    if len(kinds) > 1:
        yield (
            ("data", "train"),
            "mixes text corpora with instruction data (chat or prompt/response); a mixture's "
            "sources are all one or all the other",
        )


EVAL_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _eval_names(names: list[str]) -> Iterator[Problem]:
    """Named eval sets: at least one, each name usable in a split (eval/<name>) and a folder."""
    if not names:
        yield ("data", "eval"), "an empty mapping: name at least one eval set, or set null"
    for name in names:
        if not EVAL_SET_NAME.fullmatch(str(name)):
            yield (
                ("data", "eval", name),
                f"eval set name {name!r}: use letters, digits, '_', '.' or '-' (it becomes the "
                f"split eval/{name} and a store folder)",
            )


@rule("data", "model", "train")
def _best_metric(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """train.best_metric names a split the run evaluates and a key its eval records hold."""
    value = cfg.train.best_metric
    if value is None:
        return
    key = ("train", "best_metric")
    splits = eval_splits(cfg)
    if not splits:
        yield key, "the run has no eval data (set data.eval or data.eval_fraction, or null)"
        return
    split, sep, metric = value.partition(":")
    keys = EVAL_KEYS[cfg.model.task]
    if not sep:
        yield key, f"write SPLIT:KEY, e.g. {splits[0]}:loss (got {value!r})"
    elif split not in splits:
        hint = did_you_mean(split, splits)
        yield key, f"no eval set {split!r} (this run's: {', '.join(splits)}){hint}"
    elif metric not in keys:
        hint = did_you_mean(metric, keys)
        yield key, f"{cfg.model.task} eval records hold {', '.join(keys)}, not {metric!r}{hint}"


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


@rule("run", "optim", "train")
def _optim_8bit(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    name = cfg.optim.name
    if not name.endswith("adamw8bit"):
        return
    if not _bitsandbytes_installed():
        yield (
            ("optim", "name"),
            f"{name} needs bitsandbytes, which is not installed: pip install 'llmtrain[qlora]' "
            "(or use optim.name: adamw)",
        )
    if name == "paged_adamw8bit" and cfg.run.device == "cpu":
        yield (
            ("optim", "name"),
            "paged_adamw8bit pages optimizer state between GPU and host memory, so it needs "
            "CUDA; with run.device: cpu use adamw8bit",
        )
    if cfg.train.parallel == "fsdp":
        # bitsandbytes quantizes whole tensors in blocks; FSDP2's sharded DTensor parameters
        # are not what it expects, and nothing here tests the combination.
        yield (
            ("optim", "name"),
            f"{name} is not supported with train.parallel: fsdp; use train.parallel: ddp, or "
            "optim.name: adamw",
        )


@rule("model", "train")
def _activation_offload(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    # Without checkpointing every activation of every layer crosses PCIe twice per step,
    # which costs more time than recomputing them: offload is the step after checkpointing.
    if cfg.model.activation_offload and not cfg.model.gradient_checkpointing:
        yield (
            ("model", "activation_offload"),
            "needs model.gradient_checkpointing: true (offloading moves the checkpointed layer "
            "inputs to host memory; without checkpointing every activation would cross PCIe)",
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
    if p.r < 1 and "r" in METHODS[p.method][1]:
        yield ("model", "peft", "r"), f"must be at least 1 (got {p.r}); 8 to 64 is usual"
    if cfg.train.parallel == "fsdp" and p.method == "adalora":
        # The allocator ranks the singular values of whole matrices by |w * grad| every step
        # and masks them in place; under FSDP2 each rank holds a row shard of each matrix.
        yield (
            ("train", "parallel"),
            "fsdp is not supported with model.peft.method: adalora (its rank allocator scores "
            "whole adapter matrices, which FSDP splits over ranks); use train.parallel: ddp",
        )


# model.peft keys that only some methods read (the rest apply to every method, or are mapped
# per method in config/peft_methods.py).
_ONLY_FOR = {
    **dict.fromkeys(ADALORA_FIELDS, ("adalora",)),
    "lr_ratio": ("lora", "dora"),
    "init": ("lora", "dora"),
    "rslora": ("lora", "dora"),
}


@rule("model")
def _peft_method_keys(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """A key written for another method, or a common key the method has no field for, would
    be silently ignored: refused instead."""
    p = cfg.model.peft
    written = (raw.get("model") or {}).get("peft")
    if p is None or not isinstance(written, dict):
        return
    common = METHODS[p.method][1]
    defaults = {k: f.default for k, f in type(p).model_fields.items()}
    for key in written:
        if key in defaults and written[key] == defaults[key]:
            continue  # at its default it changes nothing (a resolved config lists every key)
        methods = _ONLY_FOR.get(key)
        if methods is not None and p.method not in methods:
            yield (
                ("model", "peft", key),
                f"only applies to model.peft.method {' | '.join(methods)} (this is {p.method}); "
                "remove it",
            )
        elif key == "init" and p.method == "dora" and p.init in ("pissa", "olora"):
            yield (
                ("model", "peft", "init"),
                f"{p.init} applies to method: lora (peft converts its adapter back to a LoRA of "
                "the original base, which DoRA's magnitudes do not survive)",
            )
        elif key in ("r", "alpha", "dropout") and key not in common:
            hint = " (use init_r / target_r)" if p.method == "adalora" else ""
            yield (
                ("model", "peft", key),
                f"does not apply to method {p.method}{hint}; set its own fields in "
                "model.peft.options, or remove it",
            )


@rule("model", "train")
def _adalora_schedule(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """The rank budget must shrink, and the run must have steps to shrink it in (with
    train.epochs the length is known once the data is: engine/adalora.py checks then)."""
    p = cfg.model.peft
    if p is None or p.method != "adalora":
        return
    if p.target_r >= p.init_r:
        yield (
            ("model", "peft", "target_r"),
            f"must be smaller than model.peft.init_r={p.init_r} (got {p.target_r}): AdaLoRA "
            "prunes from init_r down to an average of target_r; use method: lora for a fixed rank",
        )
    steps = cfg.train.max_steps
    if steps is not None and p.tinit + p.tfinal >= steps:
        yield (
            ("model", "peft", "tfinal" if "tfinal" in _peft_written(raw) else "tinit"),
            f"tinit + tfinal = {p.tinit + p.tfinal} must be smaller than the run's "
            f"train.max_steps={steps}, or no step is left to reallocate ranks in",
        )


def _peft_written(raw: dict[str, Any]) -> dict[str, Any]:
    written = (raw.get("model") or {}).get("peft")
    return written if isinstance(written, dict) else {}


@rule("model", hf=True)
def _peft_options(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """Every key of model.peft.options is a field of the method's peft config class that
    llmtrain does not set itself."""
    p = cfg.model.peft
    if p is None or not p.options:
        return
    try:
        import peft
    except ImportError:  # building the model says how to install it
        return
    cls = getattr(peft, METHODS[p.method][0])
    fields = {f.name for f in dataclasses.fields(cls)} - BOOKKEEPING
    for key in p.options:
        owner = owner_of(p.method, key)
        if owner is not None:
            yield ("model", "peft", "options", key), f"is set by {owner}; set that instead"
        elif key not in fields:
            hint = did_you_mean(key, fields) or f"; its fields: {', '.join(sorted(fields))}"
            yield (("model", "peft", "options", key), f"not a field of peft's {cls.__name__}{hint}")


@rule("model", "train")
def _frozen_dtype(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """The frozen weights meet the forward in its compute dtype: fp32, or that dtype."""
    setting, precision = cfg.model.frozen_dtype, cfg.train.precision
    if setting in ("auto", precision) or (setting == "fp32" and precision != "fp64"):
        return
    allowed = {"fp64": "auto", "fp32": "auto or fp32"}.get(precision, f"auto, fp32 or {precision}")
    yield (
        ("model", "frozen_dtype"),
        f"{setting} does not go with train.precision: {precision} (the forward computes in "
        f"{precision}, and a {setting} weight would meet {precision} ones); use {allowed}",
    )


def _bitsandbytes_installed() -> bool:
    """Whether bitsandbytes can be imported, without importing it (it imports torch)."""

    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


@rule("model", "train")
def _quantize(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """A quantized base is frozen (needs model.peft), single-device or DDP, 4-bit options only
    with bits 4, and bitsandbytes installed."""
    q = cfg.model.quantize
    if q is None:
        return
    if cfg.model.peft is None:
        yield (
            ("model", "quantize"),
            "a quantized base cannot be fine-tuned in full: add model.peft (LoRA trains over "
            "the quantized base, QLoRA) or remove model.quantize",
        )
    if cfg.train.parallel == "fsdp" and q.bits == 8:
        yield (
            ("train", "parallel"),
            "fsdp is not supported with model.quantize.bits: 8 (LLM.int8 keeps int8 weights, "
            "and FSDP shards floating-point tensors only); use bits: 4 or train.parallel: ddp",
        )
    if cfg.train.precision == "fp64":
        yield (
            ("train", "precision"),
            "fp64 is not supported with model.quantize (bitsandbytes computes in fp32, bf16 or "
            "fp16); use fp32 for exact checks, or remove model.quantize",
        )
    written = (raw.get("model") or {}).get("quantize") or {}
    if q.bits == 8:
        for key in ("type", "double_quant", "compute_dtype"):
            if isinstance(written, dict) and key in written:
                yield (
                    ("model", "quantize", key),
                    "applies to bits: 4 only (bits: 8 is LLM.int8, which has no 4-bit type, "
                    "nested scales or compute dtype); remove it or set bits: 4",
                )
    if not _bitsandbytes_installed():
        yield (
            ("model", "quantize"),
            "needs the bitsandbytes package: pip install 'llmtrain[qlora]', or remove "
            "model.quantize",
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
    for where, source in d.sources():
        if (source.prompt_field is None) != (source.response_field is None):
            missing = "prompt_field" if source.prompt_field is None else "response_field"
            yield (
                (*where, missing),
                "instruction pairs need both prompt_field and response_field",
            )
        if source.format == "chat" and source.prompt_field is not None:
            yield (
                (*where, "prompt_field"),
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
    yield from _plain_pairs(d)
    template = d.sft.chat_template
    if template is not None and os.path.isdir(template):
        yield (("data", "sft", "chat_template"), f"{template!r} is a directory, not a Jinja file")
    elif template is not None and not os.path.isfile(template):
        yield (
            ("data", "sft", "chat_template"),
            f"no such file {template!r} (a Jinja chat template; relative paths are from the "
            f"current directory, {os.getcwd()})",
        )


# The refusal when instruction data has no chat template, with both ways out (said at
# validate here, and by data.sft when the tokenizer is loaded).
NO_TEMPLATE = (
    "has no chat template; set data.sft.chat_template to a Jinja file (e.g. "
    "configs/chat-template.jinja), or data.sft.template: none to join prompt and response as "
    "plain text (pairs only)"
)


def _plain_pairs(d: DataConfig) -> Iterator[Problem]:
    """template: none joins a prompt and a response: pairs only, and no template file."""
    if d.sft.template != "none":
        return
    for where, source in d.sources():
        if source.records == "chat":
            yield (
                ("data", "sft", "template"),
                f"none joins prompt_field and response_field, but {dotted(where)} holds "
                "conversations (format: chat), which need a chat template",
            )
    if d.sft.chat_template is not None:
        yield (
            ("data", "sft", "chat_template"),
            "is unused with data.sft.template: none; remove one of the two",
        )


@rule("data", "tokenizer")
def _sft_template(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """Instruction data needs a chat template: data.sft.chat_template or the tokenizer's own."""
    sft = cfg.data.sft
    if not cfg.data.is_sft or sft.chat_template is not None or sft.template == "none":
        return
    path = cfg.tokenizer.path
    if path is not None and not os.path.exists(path):
        return  # _tokenizer_source reports it
    if path is not None and _has_chat_template(path):
        return
    whose = f"the tokenizer at {path!r}" if path else "a tokenizer trained by tokenizer.train"
    yield ("data", "sft", "chat_template"), f"is required: {whose} {NO_TEMPLATE}"


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
# What can be built: a config class makes per-layer lists, and a model one module per layer,
# before anything could refuse; the largest models trained have ~100-200 layers.
MAX_LAYERS = 10_000
# 10^12 parameters are 4 TB of fp32 weights (2 TB in bf16) before any optimizer state: more
# than one machine holds, so no single-node run of llmtrain can build the model.
MAX_PARAMETERS = 10**12


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
    if m.arch or m.config_overrides:  # a pretrained model as saved was built once already
        yield from _model_size(m.arch, m.pretrained, m.config, m.config_overrides, m.task)
    yield from _positions(cfg, values, model_type, where_limit)


@rule("model", light=True)
def _model_limits_light(cfg: Config, raw: dict[str, Any]) -> Iterator[Problem]:
    """_model_limits without transformers (so without torch), for `chunk`: everything a
    pretrained config.json says, and for model.arch what the YAML writes (the depth, a position
    limit); the class defaults, unknown fields and the size bound wait for fit or validate."""
    m = cfg.model
    if bool(m.arch) == bool(m.pretrained):
        return
    if m.pretrained:
        values, model_type, problems = _pretrained_config(m.pretrained, m.config_overrides)
        where: KeyPath = ("model", "config_overrides")
    else:
        problems = _too_many_layers(m.config, m.config_overrides)
        values = None if problems else {**m.config, **m.config_overrides}
        model_type, where = str(m.arch), ("model", "config")
    yield from problems
    if values is None:
        return
    yield from _layer_count(values, m.config, m.config_overrides, where)
    yield from _positions(cfg, values, model_type, where)


def _positions(
    cfg: Config, values: dict[str, Any], model_type: str, where: KeyPath
) -> Iterator[Problem]:
    """data.chunk.seq_len within the model's first position limit among `values`."""
    if cfg.data is None:
        return
    for key in _POSITION_KEYS:
        limit = values.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            usable = limit - 2 if model_type in _POSITION_OFFSET else limit
            seq_len = cfg.data.chunk.seq_len
            if seq_len > usable:
                yield (
                    ("data", "chunk", "seq_len"),
                    (
                        f"{seq_len} is above the model's position limit {key}={limit}"
                        + (" (minus 2 for padding offset)" if usable != limit else "")
                        + f"; use seq_len <= {usable} or raise {dotted(where)}.{key}"
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


def _too_many_layers(config: dict[str, Any], overrides: dict[str, Any]) -> list[Problem]:
    """A depth past MAX_LAYERS, refused before the config class builds its per-layer lists."""
    for section, values in (("config", config), ("config_overrides", overrides)):
        for key in _LAYER_KEYS:
            n = values.get(key)
            if isinstance(n, int) and n > MAX_LAYERS:
                reason = (
                    f"must be at most {MAX_LAYERS:,} (got {n:,}): no model that deep can be built"
                )
                return [(("model", section, key), reason)]
    return []


def _model_size(
    arch: str | None, pretrained: str | None, config: dict[str, Any], overrides: dict[str, Any],
    task: str,
) -> Iterator[Problem]:  # fmt: skip
    """Refuse a model above MAX_PARAMETERS, or one whose sizes cannot be built at all,
    counted on the meta device (nothing allocated) and named at the largest size written."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    written = {**config, **overrides}
    sizes = {k: v for k, v in written.items() if isinstance(v, int) and not isinstance(v, bool)}
    where: KeyPath = ("model", "config" if arch else "config_overrides")
    if sizes:
        largest = max(sizes, key=sizes.__getitem__)
        where = ("model", "config_overrides" if largest in overrides else "config", largest)
    try:
        hf = AutoConfig.from_pretrained(pretrained) if pretrained else CONFIG_MAPPING[arch]()
        for key, value in written.items():
            setattr(hf, key, value)
        n = parameter_count(hf, task)
    except Exception as e:  # a size torch cannot hold (overflow), a shape the model refuses
        text = " ".join(str(e).split())
        if "meta" in text:
            return  # a model that cannot be traced on the meta device: nothing to say here
        yield where, f"cannot be built: {text}"
        return
    if n is not None and n > MAX_PARAMETERS:
        yield (
            where,
            f"builds a model of {n:.3g} parameters, above the {MAX_PARAMETERS:.0e} that one "
            f"machine can hold ({4 * MAX_PARAMETERS / 1e12:.0f} TB of fp32 weights); make it "
            "smaller",
        )


def parameter_count(hf: Any, task: str) -> int | None:
    """The model's parameters, exact for a stack of identical layers: counted with 1 and 2
    layers on the meta device and extrapolated, so a deep model costs no more than a shallow
    one. None for a model that the task's auto class does not build (encoder-decoder...)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if type(hf) not in auto._model_mapping:
        return None

    def count(config: Any) -> int:
        with torch.device("meta"):
            model = auto.from_config(config)
        return sum(p.numel() for p in model.parameters())

    key = next((k for k in _LAYER_KEYS if isinstance(getattr(hf, k, None), int)), None)
    if key is None or getattr(hf, key) < 2:
        return count(hf)
    counts = []
    for layers in (1, 2):
        small = copy.deepcopy(hf)
        setattr(small, key, layers)
        if isinstance(getattr(small, "layer_types", None), list):
            small.layer_types = small.layer_types[:layers]
        counts.append(count(small))
    return counts[0] + (getattr(hf, key) - 1) * (counts[1] - counts[0])


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
    problems += _too_many_layers(config, overrides)
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
    if os.path.exists(directory) and not os.path.isdir(directory):
        reason = f"{directory!r} is a file; name a Hugging Face model directory (save_pretrained)"
        return None, "", [(key, reason)]
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
    too_deep = _too_many_layers({}, overrides)
    if too_deep:
        return None, "", too_deep
    return {**values, **overrides}, str(values.get("model_type", "")), []
