"""Fault points that make rare failures testable on any machine (docs/architecture.md,
"Fault hooks").

- `LLMTRAIN_FAULT_OOM_MICRO=N`: a training forward on a micro-batch of more than N sequences
  raises `torch.OutOfMemoryError`, as a real CUDA OOM would; `LLMTRAIN_FAULT_OOM_RANK=R`
  limits that to rank R (to test that one rank's OOM cannot deadlock the others).
  `LLMTRAIN_FAULT_OOM_IN=backward` raises it from inside that micro-batch's backward instead
  (at the first gradient accumulated into a trainable parameter, while the rest of the graph
  is still queued), where a real OOM most often strikes; `forward` (the default) raises it
  before the forward.
- `LLMTRAIN_FAULT_KILL=<point>`: the process dies at a named point, e.g. `ckpt_after_model`
  (half-way through a checkpoint write) or `step_end:3` (right after optimizer step 3 is
  logged and saved). `LLMTRAIN_FAULT_KILL_MODE=raise` raises `SimulatedKill` instead of
  `os._exit(137)`, so an in-process test can "crash" a run without killing pytest;
  `LLMTRAIN_FAULT_KILL_MODE=await-sigterm` makes the process wait there until a SIGTERM has
  arrived (engine/signals.py), then carry on: a test can signal from outside (a scheduler's
  TERM through a launcher) and know at which step the run stops.

The probe's trials train through `engine.step.forward_backward`, so the OOM fault fails them too.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch

from llmtrain.engine import signals
from llmtrain.errors import LLMTrainError

AWAIT_SIGTERM_S = 600.0  # await-sigterm gives up after this long (a test that never signals)


class SimulatedKill(BaseException):
    """Raised at a kill point when LLMTRAIN_FAULT_KILL_MODE=raise (tests only)."""


def fault_oom_micro() -> int | None:
    """The micro-batch size above which a simulated OOM fires, or None when the hook is off."""
    value = os.environ.get("LLMTRAIN_FAULT_OOM_MICRO")
    return int(value) if value else None


def fault_oom_phase() -> str:
    """Where the simulated OOM fires: `forward` (the default) or `backward`."""
    phase = os.environ.get("LLMTRAIN_FAULT_OOM_IN") or "forward"
    if phase not in ("forward", "backward"):
        raise LLMTrainError(f"LLMTRAIN_FAULT_OOM_IN={phase!r}: expected forward or backward")
    return phase


def simulated_oom(micro_batch: int, rank: int = 0) -> torch.OutOfMemoryError | None:
    """The simulated `torch.OutOfMemoryError` this micro-batch gets, or None."""
    limit = fault_oom_micro()
    if limit is None or micro_batch <= limit:
        return None
    only_rank = os.environ.get("LLMTRAIN_FAULT_OOM_RANK")
    if only_rank not in (None, "") and int(only_rank) != rank:
        return None
    return torch.OutOfMemoryError(
        f"simulated out of memory: micro-batch {micro_batch} > LLMTRAIN_FAULT_OOM_MICRO={limit}"
    )


@contextlib.contextmanager
def oom_fault_point(model: torch.nn.Module, micro_batch: int, rank: int = 0) -> Iterator[None]:
    """Around one micro-batch's forward and backward: the simulated OOM, raised at entry, or
    (LLMTRAIN_FAULT_OOM_IN=backward) from the first gradient accumulated inside the block."""
    error = simulated_oom(micro_batch, rank)
    if error is None:
        yield
        return
    if fault_oom_phase() == "forward":
        raise error

    def fire(_: torch.Tensor) -> None:
        raise error

    handles = [p.register_post_accumulate_grad_hook(fire) for p in model.parameters()
               if p.requires_grad]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
