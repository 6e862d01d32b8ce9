"""pydantic's validation errors, worded for people: one `(key path, message)` per problem.

pydantic reports union branches, type tags and constraint names; a user wants one line per key
saying what the value should have been and what it was (`must be a positive integer (got -3)`),
with a suggestion for a typo. The helpers that show values and key paths are shared with the
cross-field rules and the loader, so every message reads the same way.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from llmtrain.config.schema import NAME_PATTERN, Config, section_class

# A key's place in the config mapping: ('data', 'train', 'path', 0).
KeyPath = tuple[str | int, ...]
# One problem found in a config: the key it is about, and what is wrong, as a sentence.
Problem = tuple[KeyPath, str]


# ----------------------------------------------------------------------- shared wording
def dotted(path: KeyPath) -> str:
    """('data', 'train', 'path', 0) → 'data.train.path.0', the form errors and --set use."""
    return ".".join(str(p) for p in path)


def did_you_mean(word: str, candidates: Any) -> str:
    """', did you mean 'x'?' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


def kind_of(value: Any) -> str:
    """The kind of a parsed YAML/JSON value as a noun phrase: 'a list', 'a mapping', 'an int'."""
    return {list: "a list", dict: "a mapping", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


def show_value(value: Any) -> str:
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


# ------------------------------------------------------------------- what a field accepts
def field_at(path: KeyPath) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """(model holding the last key of `path`, its FieldInfo); None where the path leaves models.
    An item of a list or tuple field (`optim.betas.1`) gets its item type's FieldInfo."""
    model: type[BaseModel] | None = Config
    info: FieldInfo | None = None
    for i, part in enumerate(path):
        named = info is not None and _names_models(info.annotation)
        if named and model is not None and part not in model.model_fields and i < len(path) - 1:
            continue  # a name in a {name: section} mapping (data.eval's named sets)
        if isinstance(part, int) and model is not None and i < len(path) - 1:
            continue  # an item of a list of sections (data.train.0.weight)
        if isinstance(part, int) and info is not None and i == len(path) - 1:
            return model, _item_info(info.annotation, part)
        if model is None or part not in model.model_fields:
            return (model if i == len(path) - 1 else None), None
        info = model.model_fields[str(part)]
        if i < len(path) - 1:
            listed = isinstance(path[i + 1], int)
            model = section_class(info.annotation, listed=listed)
    return model, info


def _item_info(annotation: Any, index: int) -> FieldInfo | None:
    """The FieldInfo of item `index` of a tuple[...] or list[...] annotation (bounds included)."""
    for arg in (annotation, *get_args(annotation)):
        origin, args = get_origin(arg), get_args(arg)
        if origin is tuple and args and args[-1] is not Ellipsis and index < len(args):
            return FieldInfo.from_annotation(args[index])
        if origin in (tuple, list) and args:
            return FieldInfo.from_annotation(args[0])
    return None


def _names_models(annotation: Any) -> bool:
    """Whether the annotation accepts a mapping of names to config sections."""
    if get_origin(annotation) is dict:
        return section_class(get_args(annotation)[1]) is not None
    return any(_names_models(a) for a in get_args(annotation))


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


_PATTERNS = {
    r"^(auto|cpu|cuda|cuda:\d+)$": "one of auto, cpu, cuda, cuda:N",
    NAME_PATTERN: "letters, digits, _ . - only, starting with a letter or digit",
}

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
    bounded = any(b is not None for b in _bounds(info, {}))
    if kind == "finite_number":
        return "a finite number"
    if kind in ("bool_as_number", "int_too_large"):
        # A value of the wrong sort (true, 10**30) where a number belongs: say what is.
        noun = _numeric_noun(info)
        ge, gt, le, lt = _bounds(info, {})
        if kind == "int_too_large" and le is None and lt is None:
            phrase = "an integer below 2^63"
        elif bounded:
            phrase = _range_phrase(noun, ge, gt, le, lt)
        else:
            phrase = "an integer" if noun == "integer" else "a number"
        if isinstance(err["input"], (list, tuple)):
            return f"a list, each item {phrase}"
        return phrase + _literals(info)
    if kind.startswith(("int_", "float_")) and bounded:
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


def _literals(info: FieldInfo | None) -> str:
    """' or "auto"' for a field that also takes words (batch.micro_batch: int | "auto")."""
    types = _flat_types(info.annotation) if info is not None else set()
    return "".join(f' or "{w}"' for w in sorted(t for t in types if isinstance(t, str)))


def _split_loc(
    loc: tuple[Any, ...], data: Any, missing: bool
) -> tuple[KeyPath, str | None, KeyPath]:
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
    groups: dict[KeyPath, list[tuple[str | None, KeyPath, dict[str, Any]]]] = {}
    for err in errors:
        path, tag, below = _split_loc(err["loc"], data, err["type"] == "missing")
        groups.setdefault(path, []).append((tag, below, err))
    problems: list[Problem] = []
    for path, items in groups.items():
        _, info = field_at(path)
        tags = {tag for tag, _, _ in items}
        # several branches of a union failed: one message saying what would do. (Errors of
        # one branch only, as a discriminated union gives, are reported each on its own.)
        if len(items) > 1 and None not in tags and len(tags) > 1:
            phrases: list[str] = []
            for tag, below, err in items:
                phrase = _expectation(err, info) if not below else None
                if tag is not None and (below or err["type"].endswith(("_type", "_parsing"))):
                    phrase = _TAG_NAMES.get(tag.replace(" ", "").lower(), phrase)
                if phrase and phrase not in phrases:
                    phrases.append(phrase)
            value = items[0][2]["input"] if not items[0][1] else _value_at(data, path)
            problems.append((path, f"must be {' or '.join(phrases)} (got {show_value(value)})"))
            continue
        for _, below, err in items:
            problems.append(_message(path + below, err, data))
    return problems


def _value_at(data: Any, path: KeyPath) -> Any:
    for part in path:
        data = data[part] if isinstance(data, (dict, list)) else None
    return data


def _message(path: KeyPath, err: dict[str, Any], data: dict[str, Any]) -> Problem:
    """One pydantic error (not part of a union) → its problem; the path may move up a level."""
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
            return path[:-1], f"needs more items (got {show_value(parent)})"
        return path, "is required"
    _, info = field_at(path)
    message = f"must be {_expectation(err, info)} (got {show_value(err['input'])})"
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
