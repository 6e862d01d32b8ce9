"""The two consoles every stage prints through, and the one way a stage speaks a line.

Human output (tables, banners, progress) goes to `console`. With `--json` a command prints
exactly one JSON object on stdout, so stages then send everything human to `err_console`.
Notes, warnings and errors outside those go through `say`: one line on stderr, from rank 0
of a torchrun job only (torchtune's `log_rank_zero`), optionally once per process.
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.text import Text

console = Console()
err_console = Console(stderr=True)

_SAID: set[str] = set()  # the messages `say(..., once=True)` has printed in this process


def human_console(as_json: bool) -> Console:
    """The console for human output: stderr when stdout is reserved for JSON."""
    return err_console if as_json else console


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of its job, or alone. torchrun's RANK, so it can be asked
    before the process group exists (or where none is ever made)."""
    return os.environ.get("RANK", "0") == "0"


def say(
    message: str,
    *,
    once: bool = False,
    every_rank: bool = False,
    label: str | None = None,
    out: Console | None = None,
) -> None:
    """One line on stderr (or `out`), never wrapped (it names files) and never read as markup.
    Rank 0 alone speaks, unless `every_rank` (what each rank must report of itself: its own
    failure, a checkpoint it could not read; prefixed with the rank when there are several).
    `once`: the same message is printed once per
    process (the probe and the loop both resolve the same setting). `label`: a yellow prefix
    such as `note` or `warning`."""
    if not (every_rank or is_rank_zero()):
        return
    if once:
        if message in _SAID:
            return
        _SAID.add(message)
    if every_rank and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        message = f"rank {os.environ.get('RANK', '?')}: {message}"
    text = Text(f"{label}: ", style="yellow") + message if label else Text(message)
    (out or err_console).print(text, highlight=False, soft_wrap=True)
