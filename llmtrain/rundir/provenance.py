"""What a run directory holds and where it came from: the config a resume may continue with,
and the outputs `fit --overwrite` removes.

On resume the new resolved config is compared, key by key, with the run's own
`config.resolved.yaml` (the one beside the checkpoint). A change to what the run trains
(model, tokenizer, data and chunking, seed, global batch, optimizer and schedule, precision,
loss normalization) is refused, one line per key, `key: old → new`, because the weights,
optimizer state, data order and store of the checkpoint only mean something under the old
values. Changes to how long, how often and where (SAFE below) are allowed; the caller lists
them and records them in metrics.jsonl as a `config_changed` event. A key the run's file does
not hold (written by an older llmtrain) counts as unchanged when the new value is its default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from llmtrain import layout
from llmtrain.config import Config, dump_config
from llmtrain.config.schema import section_class
from llmtrain.engine import checkpoint as ckpt
from llmtrain.errors import ConfigError, LLMTrainError
from llmtrain.util.atomic import remove_path, temp_sibling
from llmtrain.util.owned import confined, is_ours, mark, read_mark

# Keys (or `prefix.` for a whole section) that change how long, how often or where a run
# goes, never what one optimizer step computes. Everything else is refused on resume.
SAFE = (
    "run.name",
    "run.output_dir",
    "run.device",
    "run.threads",
    "run.peak_flops",
    "run.cpu_allocator",  # where freed memory goes, not what is computed
    "model.compile",  # the same graph, compiled
    "model.gradient_checkpointing",  # the same gradients, recomputed
    "model.activation_offload",  # the same saved tensors, kept in host memory
    "model.attn_implementation",  # the same attention, another kernel
    "data.store",  # where the (fingerprinted) store lives
    "data.store_verify",  # how much of a reused store is re-hashed
    "data.workers",
    "batch.micro_batch",  # exact accumulation: the update does not depend on it
    "batch.probe.",
    "train.max_steps",  # checked against the checkpoint's step
    "train.epochs",  # upward only
    "train.eval_every",
    "train.eval_max_batches",
    "train.save_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.nan_policy",
    "train.parallel",  # DDP and FSDP2 compute the same update
    "train.best_metric",  # what report calls best
    "log.",
)

_ABSENT = object()


@dataclass
class Change:
    key: str
    old: Any
    new: Any

    def text(self) -> str:
        return f"{self.key}: {_show(self.old)} → {_show(self.new)}"


@dataclass
class Resume:
    """The checkpoint a resume will start from (the newest; an older one if it fails its
    checks) and the safe changes of the config, as `{key: [old, new]}`."""

    checkpoint: Path
    step: int
    changes: dict[str, list[Any]]


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _plain(value: Any) -> Any:
    """JSON-shaped (tuples → lists), as YAML gives it back."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.loads(json.dumps(value, default=str))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}; a list of mappings by index ({'t': [{'w': 1}]} →
    {'t.0.w': 1}: a mixture's sources, key by key); other lists and empty dicts are leaves."""
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        tree = {str(i): v for i, v in enumerate(tree)}
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def schema_default(key: str) -> Any:
    """The default of a dotted config key, or _ABSENT when it has none (or is not a field)."""
    model: type[BaseModel] | None = Config
    field = None
    for part in key.split("."):
        if model is None or part not in model.model_fields:
            return _ABSENT
        field = model.model_fields[part]
        model = section_class(field.annotation)
    if field is None or field.is_required():
        return _ABSENT
    return _plain(field.get_default(call_default_factory=True))


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every key whose value differs, in the new config's order, then keys only the old has."""
    a, b = flatten(old), flatten(new)
    changes = []
    for key in [*b, *(k for k in a if k not in b)]:
        before, after = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if before is _ABSENT and after == schema_default(key):
            continue  # a field added since the run started, at its default
        if before != after:
            changes.append(Change(key, before, after))
    return changes


def is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE)


def refusal(change: Change, step: int) -> str | None:
    """Why `change` cannot be resumed with (None: it can)."""
    if not is_safe(change.key):
        if change.key.startswith("data.train.") and change.key.endswith(".weight"):
            return "changes how the mixture draws, so the data order"
        return "changes what the run trains"
    if change.key == "train.max_steps" and isinstance(change.new, int) and change.new < step:
        return f"below the checkpoint's step {step}; resume to {step} steps or more"
    if change.key == "train.epochs":
        old, new = change.old, change.new
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) and new < old:
            return "epochs can only grow on resume"
    return None


def read_resolved(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: bytes that are not UTF-8
        text = " ".join(str(e).split())
        raise LLMTrainError(f"{path}: cannot read the run's config ({text})") from e
    if not isinstance(tree, dict):
        raise LLMTrainError(f"{path}: not a config (a mapping was expected)")
    return tree


def compare(cfg: Config, resolved: Path, step: int) -> dict[str, list[Any]]:
    """The safe changes of `cfg` against the run's `resolved` config, `{key: [old, new]}`;
    ConfigError with one line per refused key."""
    changes = diff(read_resolved(resolved), _plain(yaml.safe_load(dump_config(cfg))))
    refused = [(c, why) for c in changes if (why := refusal(c, step)) is not None]
    if refused:
        lines = [f"{resolved}: {c.text()} ({why})" for c, why in refused]
        lines.append(
            f"{resolved.parent}: --resume continues the run that file describes; set these "
            "keys back, start over with `fit --overwrite`, or choose a new run.output_dir"
        )
        raise ConfigError(lines)
    return {c.key: [None if c.old is _ABSENT else c.old, c.new] for c in changes}


def resume_target(out: Path, resume: str) -> Path | None:
    """The checkpoint `--resume` names: a path, or (auto) the newest complete one."""
    if resume != "auto":
        return Path(resume)
    found = ckpt.list_checkpoints(ckpt.checkpoint_dir(out))
    return found[-1] if found else None


def check_resume(cfg: Config, out: Path, resume: str, warn: Any) -> Resume | None:
    """Before any work: the config may continue this run (see the module doc). None when
    there is nothing to resume (a fresh start). `warn(line)` reports a missing record."""
    target = resume_target(Path(out), resume)
    if target is None or not (target / ckpt.MARKER).is_file():
        return None  # a path that is no checkpoint is reported where it is read
    step = ckpt.checkpoint_step(target) if target.name.startswith(layout.CHECKPOINT_PREFIX) else 0
    resolved = target.parent.parent / layout.CONFIG_FILE
    if not resolved.is_file():
        warn(f"warning: {resolved} is missing; the config cannot be compared with the run's")
        return Resume(target, step, {})
    return Resume(target, step, compare(cfg, resolved, step))


# ------------------------------------------------------------------------------ overwrite
def run_outputs(out: Path) -> list[Path]:
    """What `fit --overwrite` would remove from `out`, as it stands."""
    return [Path(out) / name for name in layout.RUN_OUTPUTS if (Path(out) / name).exists()]


def describe(path: Path) -> str:
    """`checkpoints/ (3 checkpoints, 12.0 MiB)` for the confirmation list."""
    if path.is_symlink():
        return f"{path} (a symbolic link: the link alone)"
    if path.is_file():
        return f"{path} ({path.stat().st_size:,} bytes)"
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    inside = len(ckpt.list_checkpoints(path)) if path.name == layout.CHECKPOINTS_DIR else None
    count = f"{inside} checkpoints, " if inside is not None else ""
    return f"{path}/ ({count}{size:,} bytes)"


def claim_run_dir(out: Path, *, write: bool = True) -> None:
    """Make `out` a run directory of llmtrain's own, marked so (util/owned.py); refuse one
    that holds a file or folder named like a run output without being ours (llmtrain would
    write over it, or `--overwrite` delete it). A run of an older llmtrain, recognised by its
    config.resolved.yaml, is adopted. `write`: False only checks (a dry run writes nothing)."""
    out = Path(out)
    for name in layout.RUN_FILES:  # before any work: a link would lead a write out of the run
        if name != layout.STORE_DIR:  # the stores' folder is judged where it is opened
            confined(out, out / name)
    if is_ours(out, "run"):
        return
    if not is_ours(out, "run", (layout.CONFIG_FILE,)):
        taken = [name for name in layout.RUN_OUTPUTS if os.path.lexists(out / name)]
        if taken or read_mark(out) is not None:
            shown = ", ".join(taken) or f"the {layout.OWNER_MARK} mark of another kind"
            raise LLMTrainError(
                f"{out}: not a run directory llmtrain made, yet it holds {shown}; llmtrain "
                "never writes over what it did not create: choose an empty or new run.output_dir"
            )
    if write:
        mark(out, "run")


def clear_run(out: Path) -> list[Path]:
    """Remove the run outputs; each is renamed aside first, so a crash half-way leaves no
    half of a checkpoint (a `.old-*` sibling is swept by remove_stale_temps). Only from a run
    directory of llmtrain's own (claim_run_dir)."""
    if not is_ours(Path(out), "run", (layout.CONFIG_FILE,)):
        raise LLMTrainError(f"{out}: not a run directory llmtrain made; nothing deleted")
    removed = []
    for path in run_outputs(out):
        aside = temp_sibling(path, "old")
        os.replace(path, aside)
        remove_path(aside)
        removed.append(path)
    return removed
