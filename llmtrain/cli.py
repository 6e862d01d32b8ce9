"""The `llmtrain` command: parse, validate the config, call the command. Nothing else lives here.

Exit codes (docs/architecture.md, "CLI"): 0 success; 2 a bad config or usage; 1 a runtime
failure; 130 Ctrl-C. Messages go to stderr, one line each; tracebacks only with `--debug` or
LLMTRAIN_DEBUG=1. Torch is never imported here: `validate` and `--help` stay fast, and each
command module (llmtrain.commands.*) is imported only when it runs.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer

from llmtrain import __version__
from llmtrain.errors import ConfigError, LLMTrainError

app = typer.Typer(
    name="llmtrain",
    help="Train transformer language models from YAML configs: exact gradient accumulation, "
    "a measured micro-batch, long sequences chunked.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


ConfigArg = Annotated[str, typer.Argument(help="The YAML config file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a config key, e.g. --set model.config.n_layer=2 (value parsed as YAML; "
        "repeatable).",
        metavar="KEY=VALUE",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
NprocOpt = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        min=1,
        help="Run on N local processes (one per GPU; gloo on CPU) via torchrun's launcher; the "
        "same as `torchrun --standalone --nproc_per_node=N -m llmtrain ...`.",
        show_default=False,
    ),
]


def _debug() -> bool:
    return _state["debug"] or os.environ.get("LLMTRAIN_DEBUG", "") not in ("", "0")


def _say(line: str) -> None:
    """One line on stderr, as is: no markup, no wrapping (messages name files and keys).
    Under torchrun each rank reports its own failure, so the line says which rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        line = f"rank {os.environ.get('RANK', '?')}: {line}"
    typer.echo(line, err=True)


def _run(command: str, work: Callable[[], Any], interrupted: str = "interrupted") -> None:
    """Run a command's work and map what it raises to a message and an exit code."""
    try:
        work()
    except ConfigError as e:
        if _debug():
            traceback.print_exc()
        for line in e.messages:
            _say(line)
        raise typer.Exit(2) from None
    except LLMTrainError as e:
        if _debug():
            traceback.print_exc()
        _say(f"error: {e}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        _say(f"llmtrain {command}: {interrupted}")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:
        if _debug():
            traceback.print_exc()
            raise typer.Exit(1) from None
        message = " ".join(str(e).split()) or "(no message)"
        _say(f"error: {type(e).__name__}: {message} (run with --debug for the traceback)")
        raise typer.Exit(1) from None


def _load(config: str, overrides: list[str] | None, *, check_model: bool = True) -> Any:
    from llmtrain.config import load_config

    return load_config(config, overrides or (), check_model=check_model)


def _relaunch(nproc: int | None, command: list[str], set_: list[str] | None, cfg: Any) -> bool:
    """With `--nproc N` (N > 1): run this same command on N ranks under torchrun and exit with
    its code. The config was validated here first, so a bad one fails once, before any rank
    starts. Returns False when there is nothing to launch (no --nproc, or 1)."""
    if nproc is None or nproc == 1:
        return False
    from llmtrain.launch import launch

    argv = ["--debug"] if _state["debug"] else []
    argv += command + [x for s in set_ or () for x in ("--set", s)]
    code = launch(nproc, argv, device=cfg.run.device)
    if code:
        raise typer.Exit(code)
    return True


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmtrain {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks (also LLMTRAIN_DEBUG=1).")
    ] = False,
) -> None:
    _state["debug"] = debug


@app.command()
def fit(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue a run: 'auto' (latest checkpoint in output_dir) or a checkpoint path.",
            metavar="auto|PATH",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Resolve everything and print the plan; no training.")
    ] = False,
    nproc: NprocOpt = None,
) -> None:
    """Train a model: tokenize, chunk, probe the micro-batch, train with exact accumulation."""

    def work() -> None:
        cfg = _load(config, set_)
        command = ["fit", config]
        command += ["--resume", resume] if resume is not None else []
        command += ["--dry-run"] if dry_run else []
        if _relaunch(nproc, command, set_, cfg):
            return
        from llmtrain.commands import fit as command

        command.run(cfg, resume=resume, dry_run=dry_run)

    _run("fit", work, "interrupted; the last checkpoint is intact, continue with --resume auto")


@app.command()
def chunk(
    config: ConfigArg,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild the token stores even if they are current.")
    ] = False,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Tokenizer threads (default all cores).")
    ] = None,
) -> None:
    """Tokenize the corpus and cut it into fixed-length chunks (the on-disk token store)."""

    def work() -> None:
        # chunk never builds the model: skip the checks that need transformers (and torch).
        cfg = _load(config, set_, check_model=False)
        from llmtrain.commands import chunk as command

        command.run(cfg, force=force, workers=workers, as_json=as_json)

    _run("chunk", work)


@app.command("probe-batch")
def probe_batch(
    config: ConfigArg, set_: SetOpt = None, as_json: JsonOpt = False, nproc: NprocOpt = None
) -> None:
    """Measure the largest micro-batch that fits on this device for this model and seq_len."""

    def work() -> None:
        cfg = _load(config, set_)
        if _relaunch(nproc, ["probe-batch", config] + (["--json"] if as_json else []), set_, cfg):
            return
        from llmtrain.commands import probe as command

        command.run(cfg, as_json=as_json)

    _run("probe-batch", work)


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Check a config (types, cross-field rules, files) and print it fully resolved."""

    def work() -> None:
        from llmtrain.config import dump_config

        cfg = _load(config, set_)
        if as_json:
            typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
            return
        from rich.syntax import Syntax

        from llmtrain.console import console

        console.print(Syntax(dump_config(cfg), "yaml", background_color="default"))

    _run("validate", work)


def main() -> None:
    """Entry point of the console script and of `python -m llmtrain`."""
    app(prog_name="llmtrain")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
