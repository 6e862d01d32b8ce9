"""Checkpoints that are never half-written, and the search for the latest good one.

Layout of `<output_dir>/checkpoints/step-00000100/`:
  model.safetensors   the unwrapped model's weights (safetensors.torch.save_model: tied
                      weights stored once and re-tied on load, bit-exact)
  optimizer.pt        optimizer.state_dict()
  state.pt            step, sampler position, micro_batch, GradScaler, RNG states
  complete            written last: a directory without it is not a checkpoint

Everything is written through `llmtrain.util.atomic.atomic_dir`, so a crash leaves either the
whole checkpoint or a temporary directory that is ignored and cleaned.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from llmtrain.console import err_console
from llmtrain.engine.faults import kill_point
from llmtrain.engine.parallel import is_fsdp, load_full_state
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import atomic_dir, remove_stale_temps

MARKER = "complete"
PREFIX = "step-"


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from (dropout, shuffles)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    # Only once CUDA is in use: reading its RNG would otherwise initialise it (a CPU run on a
    # GPU machine, or a probe before training) and it has drawn nothing to restore anyway.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    train_state: dict[str, Any],
    keep: int,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune to the latest `keep`; returns its path.

    `model_state` / `optimizer_state`: full states gathered from a sharded (FSDP) model by
    `llmtrain.engine.parallel`, written in the same format instead of the module's own."""
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    # Re-saving the same step (resumed at the very end) replaces it whole.
    with atomic_dir(final) as tmp:
        if model_state is not None:
            save_file(model_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            save_model(model, str(tmp / "model.safetensors"))
        kill_point("ckpt_after_model")
        kill_point(f"ckpt_after_model:{step}")
        torch.save(
            optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            tmp / "optimizer.pt",
        )
        state = {**train_state, "step": step, "scaler": scaler.state_dict(), "rng": rng_state()}
        torch.save(state, tmp / "state.pt")
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
        if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def prune(root: Path, keep: int) -> None:
    """Keep the latest `keep` checkpoints; remove older ones and stale temp directories."""
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temps(root)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint's optimizer and state dicts (weights stay on disk until applied)."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise LLMTrainError(f"{path}: not a complete checkpoint (no '{MARKER}' marker)")
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:  # header + size
            list(f.keys())
    except Exception as e:  # any unreadable file means this checkpoint cannot be used
        raise LLMTrainError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    return {"path": path, "optimizer": optimizer, "state": state}


def apply_checkpoint(
    ckpt: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> dict[str, Any]:
    """Restore weights, optimizer, scaler and RNG; returns the train state (step, micro...)."""
    path = ckpt["path"]
    if is_fsdp(model):  # every rank reads the full state and keeps its shard
        try:
            weights = load_file(str(path / "model.safetensors"))
            load_full_state(model, optimizer, weights, ckpt["optimizer"])
        except Exception as e:
            raise LLMTrainError(f"{path}: cannot load into the sharded model ({e})") from None
        return _restore_rest(ckpt, scaler)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), device=str(device))
    except Exception as e:
        raise LLMTrainError(f"{path}/model.safetensors: cannot load ({e})") from None
    if missing or unexpected:
        raise LLMTrainError(
            f"{path}: weights do not match the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it written with another model config?"
        )
    optimizer.load_state_dict(ckpt["optimizer"])
    return _restore_rest(ckpt, scaler)


def _restore_rest(ckpt: dict[str, Any], scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """Scaler and RNG, after the weights and optimizer; returns the train state."""
    state = ckpt["state"]
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state


def find_resume(output_dir: Path, resume: str) -> dict[str, Any] | None:
    """`auto`: the newest checkpoint that reads (a corrupt one is skipped with a warning);
    None when there is none. A path: that checkpoint, or an error naming it."""
    if resume != "auto":
        return read_checkpoint(Path(resume))
    for path in reversed(list_checkpoints(checkpoint_dir(output_dir))):
        try:
            return read_checkpoint(path)
        except LLMTrainError as e:
            err_console.print(f"[yellow]warning:[/] skipping {e}")
    return None
