"""Validation of a config mapping: pydantic's errors made human, then the cross-field rules.

Both produce `(key path, message)` pairs; `llmtrain.config.load_config` turns each into one
line `file:line:col: key.path: message`. Rules that need the model's HF config class import
transformers lazily, so `llmtrain validate` on a config without a model stays light.
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
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from llmtrain.config import Config, Path_, _kind, _show, did_you_mean, dotted, parse_bytes

Problem = tuple[Path_, str]


# --------------------------------------------------------------------------------- helpers
def section_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `DataSourceConfig | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = section_class(arg)
        if found is not None:
            return found
    return None


def field_at(path: Path_) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """(model holding the last key of `path`, its FieldInfo); None where the path leaves models."""
    model: type[BaseModel] | None = Config
    info: FieldInfo | None = None
    for i, part in enumerate(path):
        if model is None or part not in model.model_fields:
            return (model if i == len(path) - 1 else None), None
        info = model.model_fields[str(part)]
        if i < len(path) - 1:
            model = section_class(info.annotation)
    return model, info


def _flat_types(annotation: Any) -> set[Any]:
    """int | Annotated[int, ...] | None → {int, NoneType}: the plain types a field accepts."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    if get_origin(annotation) is Annotated:
        return _flat_types(args[0])
    if get_origin(annotation) in (list, dict, tuple):
        return {get_origin(annotation)}
    return set().union(*(_flat_types(a) for a in args))


def _numeric_noun(info: FieldInfo | None) -> str:
    types = _flat_types(info.annotation) if info is not None else set()
    return "integer" if int in types and float not in types else "number"


def _fmt(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_phrase(noun: str, ge: Any, gt: Any, le: Any, lt: Any) -> str:
    an = "an" if noun[0] in "aeiou" else "a"
    lower = ge if ge is not None else gt
    upper = le if le is not None else lt
    if lower is not None and upper is not None:
        lb, rb = ("[" if ge is not None else "("), ("]" if le is not None else ")")
        return f"{an} {noun} in {lb}{_fmt(lower)}, {_fmt(upper)}{rb}"
    if (ge == 1 and noun == "integer") or gt == 0:
        return f"a positive {noun}"
    if ge == 0:
        return f"a non-negative {noun}"
    if lower is not None:
        return f"{an} {noun} {'>=' if ge is not None else '>'} {_fmt(lower)}"
    return f"{an} {noun} {'<=' if le is not None else '<'} {_fmt(upper)}"


def _bounds(info: FieldInfo | None, ctx: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    found = {k: ctx.get(k) for k in ("ge", "gt", "le", "lt")}
    for meta in info.metadata if info is not None else ():
        for k in found:
            if getattr(meta, k, None) is not None:
                found[k] = getattr(meta, k)
    return found["ge"], found["gt"], found["le"], found["lt"]


_PATTERNS = {r"^(auto|cpu|cuda|cuda:\d+)$": "one of auto, cpu, cuda, cuda:N"}

_TAG_NAMES = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "dict[str,any]": "a mapping",
}


# ------------------------------------------------------------------- pydantic errors, human
def _expectation(err: dict[str, Any], info: FieldInfo | None) -> str:
    """What the value should have been, as a noun phrase ('a positive integer')."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return _range_phrase(_numeric_noun(info), *_bounds(info, ctx))
    if kind.startswith(("int_", "float_")) and any(_bounds(info, {})):
        # A word where a bounded number belongs: say the whole expectation at once.
        noun = "integer" if kind.startswith("int_") else _numeric_noun(info)
        return _range_phrase(noun, *_bounds(info, {}))
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        if len(options) == 1:
            return f'"{options[0]}"'
        return "one of " + ", ".join(options)
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        return _PATTERNS.get(pattern, f"a string matching {pattern}")
    simple = {
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "string_type": "a string",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
        "list_type": "a list",
        "tuple_type": "a list",
        "none_required": "null",
    }
    for prefix, phrase in simple.items():
        if kind.startswith(prefix):
            return phrase
    if kind == "too_long":
        return f"a list of at most {ctx.get('max_length')} items"
    if kind == "too_short":
        return f"a list of at least {ctx.get('min_length')} items"
    return re.sub(r"^(Value|Assertion) error, ", "", err["msg"]).rstrip(".")


def _split_loc(loc: tuple[Any, ...], data: Any, missing: bool) -> tuple[Path_, str | None, Path_]:
    """A pydantic loc → (path of the key in the data, union branch tag, path below the tag).

    pydantic inserts the branch of a union ('int', "literal['auto']") into `loc`; those parts
    are not keys of the user's mapping, so walking `loc` against the data tells them apart.
    """
    path: list[Any] = []
    tag: str | None = None
    below: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and (part in node or (missing and last)):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            node = node[part] if part < len(node) else None
        elif tag is None and isinstance(part, str):
            tag = part
            continue
        else:
            node = None
        (below if tag is not None else path).append(part)
    return tuple(path), tag, tuple(below)


def _translate(errors: list[dict[str, Any]], data: dict[str, Any]) -> list[Problem]:
    """pydantic's errors → one short message per key, union branches merged into one."""
    groups: dict[Path_, list[tuple[str | None, Path_, dict[str, Any]]]] = {}
    for err in errors:
        path, tag, below = _split_loc(err["loc"], data, err["type"] == "missing")
        groups.setdefault(path, []).append((tag, below, err))
    problems: list[Problem] = []
    for path, items in groups.items():
        _, info = field_at(path)
        tags = {tag for tag, _, _ in items}
        if len(items) > 1 and None not in tags:
            phrases: list[str] = []
            for tag, below, err in items:
                phrase = _expectation(err, info) if not below else None
                if tag is not None and (below or err["type"].endswith(("_type", "_parsing"))):
                    phrase = _TAG_NAMES.get(tag.replace(" ", "").lower(), phrase)
                if phrase and phrase not in phrases:
                    phrases.append(phrase)
            value = items[0][2]["input"] if not items[0][1] else _value_at(data, path)
            problems.append((path, f"must be {' or '.join(phrases)} (got {_show(value)})"))
            continue
        for _, below, err in items:
            problems.append(_message(path + below, err, data))
    return problems


def _value_at(data: Any, path: Path_) -> Any:
    for part in path:
        data = data[part] if isinstance(data, (dict, list)) else None
    return data


def _message(path: Path_, err: dict[str, Any], data: dict[str, Any]) -> Problem:
    kind = err["type"]
    if kind == "extra_forbidden":
        model, _ = field_at(path)
        names = list(model.model_fields) if model is not None else []
        if path[:-1] == ():
            names.append("extends")
        hint = did_you_mean(str(path[-1]), names)
        return path, "unknown key" + (hint or f" (valid keys: {', '.join(names)})")
    if kind == "missing":
        parent = _value_at(data, path[:-1])
        if isinstance(parent, list):
            return path[:-1], f"needs more items (got {_show(parent)})"
        return path, "is required"
    _, info = field_at(path)
    message = f"must be {_expectation(err, info)} (got {_show(err['input'])})"
    if kind == "literal_error" and isinstance(err["input"], str):
        options = re.findall(r"'([^']*)'", (err.get("ctx") or {}).get("expected", ""))
        message += did_you_mean(err["input"], options).replace(", did", "; did")
    if kind in ("value_error", "assertion_error"):
        message = _expectation(err, info)
    return path, message


def validation_problems(data: dict[str, Any]) -> tuple[Config, list[Problem]]:
    """Validate with pydantic; return a Config (failed sections None) and the problems.

    Sections that validated are kept so the cross-field rules can still run on them: the
    user sees every problem of the file in one go, not type errors first and rules later.
    """
    # An empty section (`log:` with everything commented out) means "all defaults".
    data = {k: ({} if v is None and k in Config.model_fields else v) for k, v in data.items()}
    try:
        return Config.model_validate(data), []
    except ValidationError as e:
        problems = _translate(e.errors(include_url=False), data)
        bad = {err["loc"][0] for err in e.errors() if err["loc"]}
    sections: dict[str, Any] = {}
    for name, info in Config.model_fields.items():
        if name in bad:
            sections[name] = None
            continue
        cls = section_class(info.annotation)
        assert cls is not None
        sections[name] = (
            cls.model_validate(data[name])
            if name in data
            else info.get_default(call_default_factory=True)
        )
    return Config.model_construct(**sections), problems


# -------------------------------------------------------------------------- cross-field rules
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
            yield ("batch", "probe", "memory_limit"), f"{e} (got {_show(b.probe.memory_limit)})"


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
    # Only a warmup the user wrote is an error; the default is capped by the schedule.
    steps = cfg.train.max_steps
    given = "warmup_steps" in (raw.get("optim") or {})
    if given and steps is not None and cfg.optim.warmup_steps > steps:
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


# Models whose position ids start after the padding index (fairseq heritage): the usable
# length is max_position_embeddings - 2.
_POSITION_OFFSET = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
    "data2vec-text", "longformer",
}  # fmt: skip
_POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


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
    if values is None or cfg.data is None:
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


def _arch_config(
    arch: str, config: dict[str, Any], overrides: dict[str, Any]
) -> tuple[dict[str, Any] | None, str, list[Problem]]:
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
    try:
        hf = cls(**merged)
    except Exception as e:  # the HF config class validates types (strict dataclasses)
        text = " ".join(str(e).split())
        field = re.search(r"field '(\w+)'", text)
        section = "config_overrides" if field and field.group(1) in overrides else "config"
        path: Path_ = ("model", section, field.group(1)) if field else ("model", "config")
        reason = text.split(": ", 1)[-1] if field else text
        return None, arch, [(path, f"rejected by {cls.__name__}: {reason}")]
    values = {k: getattr(hf, k, None) for k in _POSITION_KEYS}
    return values, arch, []


def _known_fields(cls: type) -> set[str]:
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
    key: Path_ = ("model", "pretrained")
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
        return None, "", [(key, f"{config_file} is {_kind(values)}, expected a JSON object")]
    return {**values, **overrides}, str(values.get("model_type", "")), []
