"""Checkpoints that are never half-written, never run code when read, and are verified.

Layout of `<output_dir>/checkpoints/step-00000100/`:
  model.safetensors   the unwrapped model's weights (safetensors.torch.save_model: tied
                      weights stored once and re-tied on load, bit-exact); for a PEFT
                      model only its trainable tensors (adapters, head), by name
  optimizer.pt        optimizer.state_dict(): tensors and plain values only
  state.pt            the train state (`TrainState`: step, sampler position, micro_batch...)
                      and, each under its own key, the state of every component that has one
                      (`Stateful`: the GradScaler, the RNGs, the log interval...): tensors and
                      plain values only (the numpy RNG key is stored as a tensor)
  checksums.json      size and sha256 of the three files above
  complete            written last: a directory without it is not a checkpoint

Reading never executes code: the `.pt` files are loaded with `torch.load(weights_only=True)`,
which accepts tensors, numbers, strings and containers and refuses any other object, and the
weights with safetensors. Every file is checked against `checksums.json` first; a checkpoint
that fails any check is refused with the file named, and `--resume auto` falls back to the
previous one. Everything is written through `llmtrain.util.atomic.atomic_dir`, so a crash
leaves either the whole checkpoint or a temporary directory that is ignored and cleaned.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from llmtrain import layout
from llmtrain.console import say
from llmtrain.engine.faults import kill_point
from llmtrain.engine.parallel import is_fsdp, load_full_state
from llmtrain.engine.peft import check_trainable, is_peft, load_trainable, trainable_state
from llmtrain.errors import ConfigError, LLMTrainError
from llmtrain.util.atomic import atomic_dir, remove_stale_temps
from llmtrain.util.owned import check_replaceable, confined

MARKER = layout.COMPLETE_FILE
MANIFEST = "checksums.json"
FILES = ("model.safetensors", "optimizer.pt", "state.pt")
FORMAT = 2  # 1: state.pt pickled numpy arrays, no checksums (read for old runs' sake)
_HASH_CHUNK = 8 << 20


class CheckpointRejected(LLMTrainError):
    """One file of a checkpoint failed a check; `file` names it."""

    def __init__(self, file: Path, reason: str):
        self.file, self.reason = Path(file), reason
        super().__init__(f"{file}: unreadable checkpoint ({reason})")


class Stateful(Protocol):
    """A component with state that a checkpoint carries (torchtitan's `Stateful`): it gives
    its part as plain values and tensors, and takes it back. The loop registers each under
    its own key of state.pt (`engine.loop.checkpoint_parts`) and never reads inside it, so
    adding a component is one registration."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Where the run stands, as state.pt records it beside the components' parts."""

    step: int
    micro_batch: int  # the micro-batch at that step (an OOM may have halved it)
    epoch: int = 0
    step_in_epoch: int = 0  # with the epoch, the data order's position
    total_steps: int | None = None
    global_batch: int | None = None  # None: written before llmtrain recorded it
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainState:
        """From state.pt (checked by `check_state`); keys of other parts are ignored."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


@dataclass
class Checkpoint:
    """A verified checkpoint, read but not yet applied (the weights stay on disk)."""

    path: Path
    optimizer: dict[str, Any]  # optimizer.pt: optimizer.state_dict()
    train: TrainState
    parts: dict[str, Any] = field(default_factory=dict)  # state.pt's other keys, by component


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / layout.CHECKPOINTS_DIR


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return checkpoint_dir(output_dir) / layout.checkpoint_name(step)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory is named for (`step-00000100` → 100)."""
    return int(Path(path).name[len(layout.CHECKPOINT_PREFIX) :])


# ------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from (dropout, shuffles), as tensors and plain values
    only, so that `torch.load(weights_only=True)` reads it back."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of ints, float | None)
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    # Only once CUDA is in use: reading its RNG would otherwise initialise it (a CPU run on a
    # GPU machine, or a probe before training) and it has drawn nothing to restore anyway.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved: Any) -> Any:
    """np.random.set_state's tuple from `rng_state`'s dict (format 1 stored the tuple)."""
    if not isinstance(saved, dict):
        return saved
    key = saved["key"].numpy().astype(np.uint32)
    return (saved["bit_generator"], key, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RngState:
    """The process's RNGs as a `Stateful` component of checkpoints."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


# ------------------------------------------------------------------------------ checksums
def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path, names: Iterable[str] = FILES) -> None:
    """checksums.json: size and sha256 of each of `names` (a checkpoint's files, written
    before its marker; or every file of `final/`)."""
    files = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": file_digest(directory / name)}
        for name in names
    }
    text = json.dumps({"format": FORMAT, "files": files}, indent=1)
    (directory / MANIFEST).write_text(text + "\n", encoding="utf-8")


def is_plain_name(name: str) -> bool:
    """A checksums.json entry names a file inside its directory: relative, no `..`, no `.`,
    no empty part, no backslash (the same name on every platform)."""
    parts = name.split("/")
    return bool(name) and "\\" not in name and all(p not in ("", ".", "..") for p in parts)


def check_no_links(path: Path) -> None:
    """A checkpoint or `final/` holds no symbolic link, anywhere below it: what is read from a
    run stays inside it (a link is refused rather than resolved, so there is nothing to
    judge)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            entry = Path(dirpath) / name
            if entry.is_symlink():
                raise CheckpointRejected(
                    entry, f"a symbolic link (to {os.readlink(entry)}); refused unread"
                )


def verify_manifest(path: Path, required: Iterable[str] = FILES) -> None:
    """Every file the manifest lists matches its recorded size and sha256, and it lists all of
    `required`, or CheckpointRejected names the file. A checkpoint of format 1 (or a `final/`
    of that time) has no manifest: it is read unverified, with a warning."""
    check_no_links(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        say(
            f"{path}: no {MANIFEST} (written before llmtrain kept checksums); its content "
            "cannot be verified",
            label="warning",
            every_rank=True,
        )
        return
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        listed = list(files) + [name for name in required if name not in files]
        expected = {
            name: (int(files[name]["bytes"]), str(files[name]["sha256"])) for name in listed
        }
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointRejected(manifest, f"malformed ({type(e).__name__}: {e})") from e
    for name, (size, digest) in expected.items():
        if not is_plain_name(name):
            raise CheckpointRejected(
                manifest, f"lists {name!r}: not a plain relative path inside the checkpoint"
            )
        file = path / name
        if not file.is_file():
            raise CheckpointRejected(file, "missing")
        if file.stat().st_size != size:
            raise CheckpointRejected(
                file, f"{file.stat().st_size} bytes where {MANIFEST} records {size}: truncated"
            )
        if file_digest(file) != digest:
            raise CheckpointRejected(
                file, f"sha256 differs from {MANIFEST}: the file changed after it was written"
            )


# --------------------------------------------------------------------------------- saving
def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensors in a (nested) state: what writing it needs on disk."""
    seen: dict[tuple[int, int], int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            seen[(x.untyped_storage().data_ptr(), x.storage_offset())] = x.nbytes
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return sum(seen.values())


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: TrainState,
    parts: Mapping[str, Stateful],
    keep: int,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune to the latest `keep`; returns its path.
    state.pt holds `train_state` and, under its key, each of `parts`' state_dict().

    `model_state` / `optimizer_state`: full states gathered from a sharded (FSDP) model by
    `llmtrain.engine.parallel`, written in the same format instead of the module's own."""
    root = checkpoint_dir(output_dir)
    final = confined(Path(output_dir), checkpoint_path(output_dir, step))
    check_replaceable(final, "checkpoint", (MARKER,))
    if model_state is None and is_peft(model):  # the frozen base is model.pretrained itself
        model_state = trainable_state(model)
    optim_state = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    weights = model_state if model_state is not None else model.state_dict()
    needs = tensor_bytes(weights) + tensor_bytes(optim_state) + (64 << 10)  # + RNG, headers
    # Re-saving the same step (resumed at the very end) replaces it whole.
    with atomic_dir(final, needs_bytes=needs, what=f"checkpoint step {step}") as tmp:
        if model_state is not None:
            save_file(model_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            save_model(model, str(tmp / "model.safetensors"))
        kill_point("ckpt_after_model")
        kill_point(f"ckpt_after_model:{step}")
        torch.save(optim_state, tmp / "optimizer.pt")
        state = {
            **train_state.to_dict(),
            "format": FORMAT,
            "step": step,
            **{key: part.state_dict() for key, part in parts.items()},
        }
        torch.save(state, tmp / "state.pt")
        write_manifest(tmp)
        (tmp / MARKER).write_text(f"{step}\n")
    prune(root, keep)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and not p.is_symlink()  # a link would lead out of the run
        and re.fullmatch(rf"{layout.CHECKPOINT_PREFIX}\d+", p.name)
        and (p / MARKER).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def prune(root: Path, keep: int) -> None:
    """Keep the latest `keep` checkpoints; remove older ones and stale temp directories."""
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temps(root)


# -------------------------------------------------------------------------------- reading
def _legacy_numpy_globals() -> list[Any]:
    """What a format-1 state.pt needs besides tensors: numpy arrays of the RNG key (array
    reconstruction only; no callable of the file's choosing)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 | numpy 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def load_plain(file: Path) -> Any:
    """torch.load that runs no code: tensors and plain values, or CheckpointRejected."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's failures share no base (pickle, zip, EOF, Runtime...)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found or "Weights only load failed" in str(e):
            what = f" ({found[1]})" if found else ""
            raise CheckpointRejected(
                file,
                f"holds an object other than tensors and plain values{what}; refused unread "
                "(torch.load weights_only=True), nothing in it was run",
            ) from e
        raise CheckpointRejected(file, f"{type(e).__name__}: {' '.join(str(e).split())}") from e


def check_state(state: Any, file: Path) -> dict[str, Any]:
    """The fields `apply_checkpoint` uses, with their types, or CheckpointRejected naming them."""
    if not isinstance(state, dict):
        raise CheckpointRejected(file, f"holds a {type(state).__name__}, not a dict")
    rng = state.get("rng")
    problems = [k for k in ("step", "micro_batch") if not isinstance(state.get(k), int)]
    if not isinstance(state.get("scaler", {}), dict):
        problems.append("scaler")
    if not isinstance(rng, dict) or not all(k in rng for k in ("python", "numpy", "torch")):
        problems.append("rng")
    else:
        if not isinstance(rng["torch"], torch.Tensor):
            problems.append("rng.torch")
        if not isinstance(rng["python"], (tuple, list)) or len(rng["python"]) != 3:
            problems.append("rng.python")
    if problems:
        raise CheckpointRejected(file, f"missing or malformed: {', '.join(problems)}")
    return state


def read_checkpoint(path: Path) -> Checkpoint:
    """Verify a checkpoint and load its optimizer and state dicts (weights stay on disk until
    applied); CheckpointRejected names the first file that fails."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise LLMTrainError(f"{path}: not a complete checkpoint (no '{MARKER}' marker)")
    verify_manifest(path)
    optimizer = load_plain(path / "optimizer.pt")
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise CheckpointRejected(path / "optimizer.pt", "not an optimizer state_dict")
    state = check_state(load_plain(path / "state.pt"), path / "state.pt")
    weights = path / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:  # header + size
            list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointRejected(weights, f"{type(e).__name__}: {e}") from e
    train = TrainState.from_dict(state)
    parts = {k: v for k, v in state.items() if k not in train.to_dict() and k != "format"}
    return Checkpoint(path, optimizer, train, parts)


def _one_line(e: Exception, limit: int = 3) -> str:
    """A load_state_dict error (one line per tensor) as one line: the first few, and a count."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    details = [x for x in lines[1:] if x] or lines
    more = f" (and {len(details) - limit} more)" if len(details) > limit else ""
    return "; ".join(details[:limit]) + more


def apply_checkpoint(
    ckpt: Checkpoint,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    parts: Mapping[str, Stateful],
    device: torch.device,
) -> TrainState:
    """Restore weights, optimizer and every one of `parts` (by its key); returns the train
    state (step, micro-batch...)."""
    path = ckpt.path
    if is_fsdp(model):  # every rank reads the full state and keeps its shard
        file = path / "model.safetensors"
        weights = _read_weights(file)
        peft = is_peft(model)
        if peft:  # the trainable tensors alone, as one process writes them
            check_trainable(model, weights, file)
        try:
            load_full_state(model, optimizer, weights, ckpt.optimizer, trainable_only=peft)
        except Exception as e:  # torch.distributed's state-dict APIs raise many types
            raise LLMTrainError(
                f"{path}: cannot load into the sharded model ({_one_line(e)})"
            ) from e
        return _restore_parts(ckpt, parts)
    if is_peft(model):  # a PEFT checkpoint holds the trainable tensors only (save_checkpoint)
        _load_peft_weights(model, path / "model.safetensors")
    else:
        try:
            file = str(path / "model.safetensors")
            missing, unexpected = load_model(model, file, device=str(device))
        except (SafetensorError, OSError, RuntimeError) as e:  # damaged; shapes that differ
            raise LLMTrainError(
                f"{path}/model.safetensors: does not fit this model ({_one_line(e)}); was it "
                "written with another model config?"
            ) from e
        if missing or unexpected:
            raise LLMTrainError(
                f"{path}: weights do not match the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}); was it written with another model config?"
            )
    try:
        optimizer.load_state_dict(ckpt.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # groups, sizes, fields
        raise LLMTrainError(
            f"{path}/optimizer.pt: does not fit this optimizer ({type(e).__name__}: "
            f"{_one_line(e)}); was it written with another optim config?"
        ) from e
    return _restore_parts(ckpt, parts)


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise LLMTrainError(f"{file}: cannot load ({type(e).__name__}: {e})") from e


def _load_peft_weights(model: torch.nn.Module, file: Path) -> None:
    load_trainable(model, _read_weights(file), file)


def _restore_parts(ckpt: Checkpoint, parts: Mapping[str, Stateful]) -> TrainState:
    """Each component's part, after the weights and optimizer; returns the train state. A
    part the checkpoint lacks or left empty (an older llmtrain, a disabled GradScaler) leaves
    its component as built."""
    for key, part in parts.items():
        saved = ckpt.parts.get(key)
        if not saved:
            continue
        try:
            part.load_state_dict(saved)
        except Exception as e:  # each component checks its own format, with its own errors
            raise LLMTrainError(
                f"{ckpt.path}/state.pt: cannot restore {key} ({type(e).__name__}: {e})"
            ) from e
    return ckpt.train


def check_total(total: int, step: int, where: Path) -> None:
    """A run resumed at `step` must have at least that many steps (max_steps or epochs)."""
    if total < step:
        raise ConfigError(
            f"{where}: at step {step}, beyond this config's {total} steps; set "
            f"train.max_steps (or train.epochs) to reach at least {step}, or start over with "
            "`fit --overwrite`"
        )


def find_resume(output_dir: Path, resume: str) -> Checkpoint | None:
    """`auto`: the newest checkpoint that passes every check (a damaged or tampered one is
    skipped with a warning naming the file); None when there is none. A path: that
    checkpoint, or an error naming it."""
    if resume != "auto":
        return read_checkpoint(Path(resume))
    confined(Path(output_dir), checkpoint_dir(output_dir))  # a link would read another run
    for path in reversed(list_checkpoints(checkpoint_dir(output_dir))):
        try:
            return read_checkpoint(path)
        except LLMTrainError as e:
            say(f"skipping {e}; trying the previous checkpoint", label="warning", every_rank=True)
    return None
