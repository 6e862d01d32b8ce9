"""The next window's data, prepared on a background thread while the current window computes.

What runs in the background is exactly `engine.step.make_window` for the next optimizer step's
indices (computed by the loop, so the data order is the loop's), with `n_total` left for later,
plus — on CUDA — pinning the batches in page-locked host memory, so that forward_backward's
`.to(device, non_blocking=True)` copies really overlap with compute. Collation is numpy and
torch work that releases the GIL for its copies.

Invariants:
- A prefetched window is used only for the (step, micro) it was cut for; anything else (an
  out-of-memory re-cut halved the micro-batch, an fp16 retry of the same step, a rank's micro
  lowered by the all-reduce) falls back to cutting on the caller's thread. The window is the
  same object `make_window` builds, so exactness cannot change.
- No collective ever runs on the background thread: collectives of two threads would
  interleave differently on different ranks. N (the window's supervised count over all
  ranks) is all-reduced on the caller's thread in `take`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from llmtrain.data.batching import supervised_count
from llmtrain.engine.distributed import all_reduce_sum
from llmtrain.engine.step import StepSpec, Window

# What the loop hands over: a function that cuts one window with n_total given (no collective).
Cut = Callable[[float], Window]


def pinned(win: Window) -> Window:
    """The window with every batch tensor in page-locked memory (for async host-to-device)."""
    batches = [{k: v.pin_memory() for k, v in b.items()} for b in win.batches]
    return dataclasses.replace(win, batches=batches)


def with_global_count(win: Window, spec: StepSpec, device: torch.device) -> Window:
    """`win` with n_total = the supervised count of its real batches, summed over ranks."""
    real = win.batches[: len(win.batches) - win.padding]
    n_local = sum(supervised_count(b, spec.task, spec.normalization) for b in real)
    n = torch.tensor(float(n_local), dtype=torch.float64, device=device)
    return dataclasses.replace(win, n_total=float(all_reduce_sum(n).item()))


class Prefetcher:
    """One window ahead, on one worker thread. `close()` ends the thread."""

    def __init__(self, spec: StepSpec, device: torch.device, *, pin: bool | None = None):
        self.spec, self.device = spec, device
        self.pin = device.type == "cuda" if pin is None else pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtrain-prefetch")
        self._pending: tuple[int, int, Future[Window]] | None = None

    def schedule(self, step: int, micro: int, cut: Cut) -> None:
        """Start cutting the window of optimizer step `step` at micro-batch `micro`."""
        self.drop()

        def work() -> Window:
            win = cut(0.0)  # n_total given: make_window runs no collective here
            return pinned(win) if self.pin else win

        self._pending = (step, micro, self._pool.submit(work))

    def take(self, step: int, micro: int) -> Window | None:
        """The window prepared for (step, micro) with its global N, or None (cut it yourself).
        An error raised while preparing it is raised here."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending[:2] != (step, micro):
            pending[2].cancel()
            return None
        return with_global_count(pending[2].result(), self.spec, self.device)

    def drop(self) -> None:
        if self._pending is not None:
            self._pending[2].cancel()
            self._pending = None

    def close(self) -> None:
        self.drop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
