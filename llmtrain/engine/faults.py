"""Fault points that make rare failures testable on any machine (docs/architecture.md,
"Fault hooks").

- `LLMTRAIN_FAULT_OOM_MICRO=N`: a training forward on a micro-batch of more than N sequences
  raises `torch.OutOfMemoryError`, as a real CUDA OOM would; `LLMTRAIN_FAULT_OOM_RANK=R`
  limits that to rank R (to test that one rank's OOM cannot deadlock the others).
- `LLMTRAIN_FAULT_KILL=<point>`: the process dies at a named point, e.g. `ckpt_after_model`
  (half-way through a checkpoint write) or `step_end:3` (right after optimizer step 3 is
  logged and saved). `LLMTRAIN_FAULT_KILL_MODE=raise` raises `SimulatedKill` instead of
  `os._exit(137)`, so an in-process test can "crash" a run without killing pytest;
  `LLMTRAIN_FAULT_KILL_MODE=await-sigterm` makes the process wait there until a SIGTERM has
  arrived (engine/signals.py), then carry on: a test can signal from outside (a scheduler's
  TERM through a launcher) and know at which step the run stops.

The probe stage reuses `fault_oom_micro` / `maybe_fault_oom` for its own trials.
"""

from __future__ import annotations

import os
import time

import torch

from llmtrain.engine import signals

AWAIT_SIGTERM_S = 600.0  # await-sigterm gives up after this long (a test that never signals)


class SimulatedKill(BaseException):
    """Raised at a kill point when LLMTRAIN_FAULT_KILL_MODE=raise (tests only)."""


def fault_oom_micro() -> int | None:
    """The micro-batch size above which a simulated OOM fires, or None when the hook is off."""
    value = os.environ.get("LLMTRAIN_FAULT_OOM_MICRO")
    return int(value) if value else None


def maybe_fault_oom(micro_batch: int, rank: int = 0) -> None:
    """Raise a simulated `torch.OutOfMemoryError` when the fault hook says this batch is too big."""
    limit = fault_oom_micro()
    if limit is None or micro_batch <= limit:
        return
    only_rank = os.environ.get("LLMTRAIN_FAULT_OOM_RANK")
    if only_rank not in (None, "") and int(only_rank) != rank:
        return
    raise torch.OutOfMemoryError(
        f"simulated out of memory: micro-batch {micro_batch} > LLMTRAIN_FAULT_OOM_MICRO={limit}"
    )


def kill_point(name: str) -> None:
    """Die here when LLMTRAIN_FAULT_KILL names this point (a crash at the worst moment)."""
    if os.environ.get("LLMTRAIN_FAULT_KILL") != name:
        return
    mode = os.environ.get("LLMTRAIN_FAULT_KILL_MODE")
    if mode == "raise":
        raise SimulatedKill(name)
    if mode == "await-sigterm":
        await_sigterm(name)
        return
    os._exit(137)


def await_sigterm(name: str, limit_s: float = AWAIT_SIGTERM_S) -> None:
    """Wait at `name` until SIGTERM's handler has run (it only sets a flag once the loop
    defers to the step's end); SimulatedKill when none comes within `limit_s`."""
    deadline = time.monotonic() + limit_s
    while not signals.requested():
        if time.monotonic() > deadline:
            raise SimulatedKill(f"{name}: no SIGTERM within {limit_s:g}s")
        time.sleep(0.02)
