"""SIGTERM, what schedulers (SLURM, Kubernetes, torchrun's agent) send before they preempt:
finish the current optimizer step, write a checkpoint, exit 143 with the resume command.

`sigterm_guard()` installs the handler for the whole of `fit`. Before the training loop has
called `defer_to_step_end()` there is nothing worth saving, so a SIGTERM raises `Preempted`
at once; afterwards it only sets a flag, which the loop reads at the end of every step
(`requested()`; under torchrun the ranks agree on it with one all-reduce, so they stop at the
same step). SIGINT (Ctrl-C) is untouched: KeyboardInterrupt, exit 130, as before. Once the
CLI has chosen how it exits (`shield()`), further signals are ignored.

No torch here: the CLI imports `Preempted` to map it to exit code 143.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from llmtrain.errors import LLMTrainError

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a process killed by SIGTERM reports

_state = {"installed": False, "deferring": False, "requested": False}


class Preempted(LLMTrainError):
    """The run stopped on SIGTERM; `checkpoint` is where it can continue from (None when it
    stopped before training, with nothing to save)."""

    exit_code = EXIT_CODE

    def __init__(self, step: int | None = None, checkpoint: Path | None = None):
        self.step, self.checkpoint = step, checkpoint
        if checkpoint is None:
            text = "stopped by SIGTERM before training started; nothing to save"
        else:
            text = f"stopped by SIGTERM after step {step}; checkpoint {checkpoint} written"
        super().__init__(text)


def _handler(signum: int, frame: FrameType | None) -> None:
    _state["requested"] = True
    if not _state["deferring"]:
        raise Preempted()


@contextlib.contextmanager
def sigterm_guard() -> Iterator[None]:
    """Handle SIGTERM for the block (main thread only: elsewhere Python cannot install a
    handler, and the block runs unguarded); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handler)
    _state.update(installed=True, deferring=False, requested=False)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _state.update(installed=False, deferring=False, requested=False)


def shield() -> None:
    """The process is on its way out (its message chosen, its exit code set): from here a
    SIGTERM or Ctrl-C is ignored, as a second one would raise inside the exit path (after the
    clean message) and print a traceback. Main thread only; elsewhere nothing to do."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def active() -> bool:
    """Whether a guard is installed (only then can a stop be requested)."""
    return _state["installed"]


def defer_to_step_end() -> None:
    """From now on a SIGTERM lets the current step finish (the loop checks `requested`)."""
    _state["deferring"] = True


def requested() -> bool:
    return _state["requested"]
