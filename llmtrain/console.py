"""The two consoles every stage prints through.

Human output (tables, banners, progress) goes to `console`. With `--json` a command prints
exactly one JSON object on stdout, so stages then send everything human to `err_console`.
"""

from __future__ import annotations

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def human_console(as_json: bool) -> Console:
    """The console for human output: stderr when stdout is reserved for JSON."""
    return err_console if as_json else console
