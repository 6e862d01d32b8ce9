"""Reading a config file: YAML with positions, `extends`, `--set`, then validation.

A config is read in four steps, each keeping track of where every key came from so that any
error can point at a file:line:col (or at the `--set` that introduced the value):
  1. YAML → plain mapping, plus a side map key path → position (`_read_yaml`);
  2. `extends:` chains deep-merged, base first (`_read_with_extends`);
  3. `--set KEY=VALUE` overrides applied to the merged mapping (`_apply_override`);
  4. pydantic validation worded by `messages`, then the cross-field rules of `rules`.
All problems found are collected and raised together as one ConfigError.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmtrain.config.messages import KeyPath, dotted, kind_of, show_value, validation_problems
from llmtrain.config.rules import ModelCheck, check_config
from llmtrain.config.schema import Config
from llmtrain.errors import ConfigError


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


Positions = dict[KeyPath, Where]


def _error(where: Where | None, path: KeyPath, message: str) -> str:
    """One error line: `file:line:col: key.path: message` (position and path when known)."""
    prefix = f"{where}: " if where is not None else ""
    return f"{prefix}{dotted(path)}: {message}" if path else f"{prefix}{message}"


def locate(positions: Positions, path: KeyPath) -> Where | None:
    """The position of `path`, or of its nearest enclosing key when it is not in the files."""
    for n in range(len(path), -1, -1):
        where = positions.get(tuple(path[:n]))
        if where is not None:
            return where
    return None


class _PositionLoader(yaml.SafeLoader):
    """The safe loader; composed nodes keep their marks, which `_walk_positions` records."""


# A real config holds hundreds of values. Aliases repeat a subtree, and aliases of aliases
# repeat it exponentially (the "billion laughs": 9 levels of 9 aliases is 387 million values
# from 300 bytes), which every later step (positions, validation, the dump) would expand.
MAX_VALUES = 100_000


class _Refused(Exception):
    """Internal: carries (node, path, reason) out of the recursive count."""


def _expansion_problem(node: yaml.Node) -> tuple[yaml.Node, KeyPath, str] | None:
    """(node, key path, reason) when `node` expands past MAX_VALUES values or contains itself.

    Counted on the composed graph, where an anchored node is one object however often an
    alias names it, so the count costs one visit per distinct node: O(file), not O(expansion).
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: reaching one again is a cycle

    def children(n: yaml.Node) -> list[tuple[Any, yaml.Node]]:
        if isinstance(n, yaml.MappingNode):
            return [(k.value if isinstance(k, yaml.ScalarNode) else "?", v) for k, v in n.value]
        if isinstance(n, yaml.SequenceNode):
            return list(enumerate(n.value))
        return []

    def size(n: yaml.Node, path: KeyPath) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_nodes:
            raise _Refused(n, path, "an alias refers to the mapping or list that contains it")
        open_nodes.add(id(n))
        total = 1 + sum(size(child, (*path, key)) for key, child in children(n))
        open_nodes.discard(id(n))
        if total > MAX_VALUES:
            raise _Refused(
                n,
                path,
                f"expands to more than {MAX_VALUES:,} values through YAML aliases (*name); "
                "a config that large is refused: write the values out, or alias less",
            )
        sizes[id(n)] = total
        return total

    try:
        size(node, ())
    except _Refused as e:
        return e.args
    return None


def _compose(loader: yaml.SafeLoader, file: str) -> yaml.Node | None:
    """The document's node graph, refused when its aliases expand it past MAX_VALUES."""
    node = loader.get_single_node()
    problem = _expansion_problem(node) if node is not None else None
    if problem is not None:
        bad, path, reason = problem
        where = Where(file, bad.start_mark.line + 1, bad.start_mark.column + 1)
        raise ConfigError(_error(where, path, reason))
    return node


def _walk_positions(
    node: yaml.Node, path: KeyPath, file: str, out: Positions, problems: list[str]
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
    except FileNotFoundError as e:
        raise ConfigError(f"{file}: no such config file") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{file}: is a directory, expected a YAML config file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: cannot read config file ({e})") from e
    positions: Positions = {(): Where(file)}
    problems: list[str] = []
    loader: _PositionLoader | None = None
    try:
        # Built inside the try: the reader refuses control characters as it is constructed.
        loader = _PositionLoader(text)
        node = _compose(loader, file)
        # Positions are read from the composed nodes before construction, which rewrites
        # merge keys (`<<: *base`) in place.
        if node is not None:
            _walk_positions(node, (), file, positions, problems)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: invalid YAML: {' '.join(str(e).split())}") from e
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        raise ConfigError(
            f"{file}:1:1: the file is empty; expected a mapping of sections (run, model, data, ...)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{file}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: expected a mapping "
            f"of sections (run, model, data, ...), got {kind_of(data)}"
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

    def merge(dst: dict[str, Any], src: dict[str, Any], path: KeyPath) -> None:
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
            _error(where, ("extends",), f"must be a file name (got {show_value(base_ref)})")
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


def _parse_override(text: str) -> tuple[KeyPath, Any]:
    """'model.config.n_layer=2' → (('model', 'config', 'n_layer'), 2); the value is YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE (no '=' found)")
    key, _, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        raise ConfigError(f"--set {text}: the key must be a dotted path like batch.micro_batch")
    try:
        value = _load_value(raw, text) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {text}: the value is not valid YAML ({problem})") from e
    path: KeyPath = tuple(int(p) if p.isdigit() else p.strip() for p in parts)
    return path, value


def _load_value(raw: str, text: str) -> Any:
    """A `--set` value: YAML, with the same bound on aliases as a file."""
    loader = yaml.SafeLoader(raw)
    try:
        node = loader.get_single_node()
        problem = _expansion_problem(node) if node is not None else None
        if problem is not None:
            raise ConfigError(f"--set {text}: the value {problem[2]}")
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _apply_override(data: dict[str, Any], positions: Positions, text: str) -> None:
    """Apply one `--set` to the nested mapping, creating mappings on the way as needed."""
    parts, value = _parse_override(text)
    node: Any = data
    path: KeyPath = ()
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError(f"--set {text}: {dotted(path)} has no item {part!r}")
        elif isinstance(node, dict):
            part = str(part)
        else:
            raise ConfigError(
                f"--set {text}: {dotted(path)} is {show_value(node)}, not a mapping; "
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


def _all_paths(value: Any, path: KeyPath) -> list[KeyPath]:
    """`path` and every key path below it in `value` (all take the `--set` position)."""
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _all_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _all_paths(v, (*path, i))
    return out


def load_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), *, check_model: ModelCheck = True
) -> Config:
    """Read, merge, override and validate a config file; every problem in one ConfigError.

    Relative paths inside the config (data, tokenizer, output_dir...) are relative to the
    current working directory, not to the config file — like any command-line path.
    `check_model=False` skips the rules that need the model's HF config class (they import
    transformers, hence torch) and the model checks altogether (a trained run's config, whose
    base model may have moved); `"light"` runs their torch-free part instead: for `chunk`,
    which never builds the model.
    """
    cfg, _ = load_config_with_positions(path, overrides, check_model=check_model)
    return cfg


def load_config_with_positions(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), *, check_model: ModelCheck = True
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
    cfg, errors = validation_problems(data)
    errors += check_config(cfg, data, check_model=check_model)
    if errors:
        errors.sort(key=lambda e: _sort_key(locate(positions, e[0])))
        raise ConfigError([_error(locate(positions, p), p, msg) for p, msg in errors])
    assert isinstance(cfg, Config)
    return cfg, positions


def _sort_key(where: Where | None) -> tuple[int, str, int, int]:
    """Errors in file order, then those from `--set`, then those with no known position."""
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
