"""The `llmtrain` command: parse, validate the config, call the command. Nothing else lives here.

Exit codes (docs/architecture.md, "CLI"): 0 success; 2 a bad config or usage; 1 a runtime
failure; 130 Ctrl-C. Messages go to stderr, one line each; tracebacks only with `--debug` or
LLMTRAIN_DEBUG=1. Torch is never imported here: `validate` and `--help` stay fast, and each
command module (llmtrain.commands.*) is imported only when it runs.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from llmtrain import __version__
from llmtrain.console import say
from llmtrain.engine.signals import shield
from llmtrain.errors import ConfigError, LLMTrainError
from llmtrain.launch import LAUNCH_FLAGS_ENV, Nodes, inherited_flags, launch_flags, parse_nodes


def _plain_flags(params: list[Any]) -> list[Any]:
    """Typer shows an on/off flag with a `<bool>` type column, which reads as if it took a
    value (`--dry-run true`, which is then rejected); a flag gets an empty one instead."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Group(TyperGroup):
    """The app's click group: its own flags and those of every command render as flags."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_flags(command.get_params(ctx))
        return command


app = typer.Typer(
    cls=_Group,
    name="llmtrain",
    help="Train transformer language models from YAML configs: exact gradient accumulation, "
    "a measured micro-batch, long sequences chunked.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False, "process": False}


ConfigArg = Annotated[
    str, typer.Argument(help="The YAML config file.", metavar="CONFIG", show_default=False)
]
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
        "same as `torchrun --standalone --nproc_per_node=N -m llmtrain ...`. With --nnodes: N "
        "on each node.",
        show_default=False,
    ),
]
NnodesOpt = Annotated[
    int | None,
    typer.Option(
        "--nnodes",
        min=1,
        help="Run on M machines, the same command started on each (with its own --node-rank); "
        "they meet at --rdzv-endpoint (torchrun's c10d rendezvous). run.output_dir must be on "
        "a filesystem every node sees.",
        show_default=False,
    ),
]
NodeRankOpt = Annotated[
    int | None,
    typer.Option(
        "--node-rank",
        min=0,
        help="With --nnodes: this machine's number, 0 to M-1; node 0 hosts the rendezvous.",
        show_default=False,
    ),
]
RdzvEndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--rdzv-endpoint",
        help="With --nnodes: where the nodes meet, node 0's address and a free port (the same "
        "on every node).",
        metavar="HOST:PORT",
        show_default=False,
    ),
]


def _debug() -> bool:
    return _state["debug"] or os.environ.get("LLMTRAIN_DEBUG", "") not in ("", "0")


def _exiting() -> None:
    """The command has failed or stopped and is on its way out: from here further signals are
    ignored (engine/signals.shield), when this process is the command's own (`main`); an
    in-process caller (tests through CliRunner) keeps its handlers."""
    if _state["process"]:
        shield()


def _delegate(command: str, *args: Any, **kwargs: Any) -> None:
    """`llmtrain.commands.<command>.execute(*args, **kwargs)` under `_guarded`, imported only
    when the command runs (so `--help` never imports torch)."""
    module = "llmtrain.commands." + command.replace("-", "_")
    _guarded(command, lambda: importlib.import_module(module).execute(*args, **kwargs))


def _refuse(message: str) -> Callable[[], None]:
    """Work that fails with a usage error (exit 2, like a bad config)."""

    def work() -> None:
        raise ConfigError(message)

    return work


def _guarded(command: str, work: Callable[[], Any], interrupted: str = "interrupted") -> None:
    """Run a command's work and map what it raises to a message and an exit code. On every
    failure the exit is shielded first: a second Ctrl-C or SIGTERM (a user pressing twice, a
    scheduler sending TERM and the user Ctrl-C) must not turn the clean line into a traceback."""
    try:
        work()
    except ConfigError as e:
        _exiting()
        if _debug():
            traceback.print_exc()
        for line in e.messages:
            say(line, every_rank=True)
        raise typer.Exit(2) from None
    except LLMTrainError as e:
        _exiting()
        if _debug():
            traceback.print_exc()
        say(f"error: {e}", every_rank=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        _exiting()
        say(f"llmtrain {command}: {interrupted}", every_rank=True)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # the last resort: any other failure is one line, not a traceback
        _exiting()
        if _debug():
            traceback.print_exc()
            raise typer.Exit(1) from None
        message = " ".join(str(e).split()) or "(no message)"
        say(
            f"error: {type(e).__name__}: {message} (run with --debug for the traceback)",
            every_rank=True,
        )
        raise typer.Exit(1) from None


def _load(config: str, overrides: list[str] | None, *, check_model: bool | str = True) -> Any:
    from llmtrain.config import load_config

    return load_config(config, overrides or (), check_model=check_model)


def _relaunch(
    nproc: int | None,
    command: list[str],
    set_: list[str] | None,
    cfg: Any,
    nodes: Nodes | None = None,
    flags: list[str] | None = None,
) -> bool:
    """With `--nproc N` (N > 1) or `--nnodes M` (M > 1, `nodes`): run this same command on
    the ranks under torchrun and exit with its code. The config was validated here first, so
    a bad one fails once, before any rank starts. `flags`: the launch flags as given, handed to
    the ranks for the command they print to resume. Returns False when there is nothing to
    launch (no --nproc, or 1, on one machine)."""
    if nodes is None and (nproc is None or nproc == 1):
        return False
    import shlex

    from llmtrain.launch import launch  # looked up now: tests replace it

    argv = ["--debug"] if _state["debug"] else []
    argv += command + [x for s in set_ or () for x in ("--set", s)]
    before = os.environ.get(LAUNCH_FLAGS_ENV)
    os.environ[LAUNCH_FLAGS_ENV] = shlex.join(flags or [])  # the ranks inherit it
    try:
        code = launch(nproc or 1, argv, device=cfg.run.device, nodes=nodes)
    finally:  # an in-process caller (a test) keeps its environment
        if before is None:
            os.environ.pop(LAUNCH_FLAGS_ENV, None)
        else:
            os.environ[LAUNCH_FLAGS_ENV] = before
    if code:
        raise typer.Exit(code)
    return True


def _finite(value: float) -> float:
    """A float option is a finite number: click reads 'inf' (and 'nan') as floats."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number (got {value})")
    return value


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
    from llmtrain.util.quiet import apply as quiet_third_party

    quiet_third_party(debug=_debug())


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
    nnodes: NnodesOpt = None,
    node_rank: NodeRankOpt = None,
    rdzv_endpoint: RdzvEndpointOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start the run over: delete the earlier run's checkpoints, final/, metrics.jsonl "
            "etc. in output_dir (listed first, then asked; the token stores are kept).",
        ),
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="With --overwrite: delete without asking.")
    ] = False,
    accept_data_change: Annotated[
        bool,
        typer.Option(
            "--accept-data-change",
            help="With --resume: continue although the corpus or the token store changed since "
            "the run trained on it (recorded in metrics.jsonl as a data_changed event).",
        ),
    ] = False,
) -> None:
    """Train a model: tokenize, chunk, probe the micro-batch, train with exact accumulation."""

    flags = launch_flags(nproc, nnodes, node_rank, rdzv_endpoint)

    def work() -> None:
        nodes = parse_nodes(nnodes, node_rank, rdzv_endpoint)
        cfg = _load(config, set_)
        if overwrite and resume is not None:
            raise ConfigError("--overwrite starts the run over and --resume continues it: use one")
        if overwrite and not dry_run:
            from llmtrain.rundir.outputs import check_corpus_outside_run

            check_corpus_outside_run(cfg)  # before listing what would be deleted
            _confirm_overwrite(cfg.run.output_dir, yes)
        command = ["fit", config]
        command += ["--resume", resume] if resume is not None else []
        command += ["--dry-run"] if dry_run else []
        command += ["--overwrite", "--yes"] if overwrite else []
        command += ["--accept-data-change"] if accept_data_change else []
        if _relaunch(nproc, command, set_, cfg, nodes, flags):
            return
        from llmtrain.commands import fit as command
        from llmtrain.engine.signals import Preempted

        try:
            command.execute(
                cfg,
                resume=resume,
                dry_run=dry_run,
                overwrite=overwrite,
                accept_data_change=accept_data_change,
            )
        except Preempted as e:  # SIGTERM: not an error; say how to continue
            _exiting()
            say(f"llmtrain fit: {e}", every_rank=True)
            if e.checkpoint is not None:
                again = flags or inherited_flags()  # a rank of `--nproc`: its launcher's
                say(f"resume with: {_resume_command(config, set_, again)}", every_rank=True)
            raise typer.Exit(e.exit_code) from None

    _guarded("fit", work, "interrupted; the last checkpoint is intact, continue with --resume auto")


def _resume_command(config: str, set_: list[str] | None, flags: list[str]) -> str:
    """The command that continues this run: the same config, overrides and launch flags."""
    import shlex

    argv = ["llmtrain", "fit", config, *(x for s in set_ or () for x in ("--set", s))]
    return shlex.join([*argv, *flags, "--resume", "auto"])


def _interactive() -> bool:
    return sys.stdin.isatty()


def _confirm_overwrite(output_dir: str, yes: bool) -> None:
    """List what `fit --overwrite` deletes, then ask (or refuse without a terminal, unless
    --yes). Nothing to delete: nothing to ask."""
    from pathlib import Path

    from llmtrain.rundir.provenance import claim_run_dir, describe, run_outputs

    claim_run_dir(Path(output_dir), write=False)  # never offer to delete what is not ours
    doomed = run_outputs(Path(output_dir))
    if not doomed:
        return
    say(
        f"--overwrite deletes from {output_dir}: " + ", ".join(describe(p) for p in doomed),
        every_rank=True,
    )
    if yes:
        return
    if not _interactive():
        raise ConfigError(f"{output_dir}: --overwrite needs a confirmation; add --yes to delete")
    if not typer.confirm("Delete them and start the run over?", default=False, err=True):
        say("nothing deleted", every_rank=True)
        raise typer.Exit(1)


@app.command()
def chunk(
    config: ConfigArg,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild the token stores even if they are current.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, max=1024, help="Tokenizer threads (default all cores)."),
    ] = None,
) -> None:
    """Tokenize the corpus and cut it into fixed-length chunks (the on-disk token store)."""

    def work() -> None:
        # Without the checks that need the model's HF config class: transformers imports
        # torch with it (seconds, the largest fixed cost of a chunk process), and chunking
        # never builds the model. Their torch-free part still runs (rules._model_limits_light):
        # a seq_len above the positions of a pretrained config.json, or of a limit written in
        # model.config, fails here, not after building a useless store. fit and validate run
        # them all.
        cfg = _load(config, set_, check_model="light")
        from llmtrain.commands import chunk as command

        command.execute(cfg, force=force, workers=workers, as_json=as_json)

    _guarded("chunk", work)


@app.command("probe-batch")
def probe_batch(
    config: ConfigArg,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    nproc: NprocOpt = None,
    nnodes: NnodesOpt = None,
    node_rank: NodeRankOpt = None,
    rdzv_endpoint: RdzvEndpointOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Measure again even when probe-cache.json holds this setup's result."
        ),
    ] = False,
) -> None:
    """Measure the largest micro-batch that fits on this device for this model and seq_len."""

    def work() -> None:
        nodes = parse_nodes(nnodes, node_rank, rdzv_endpoint)
        cfg = _load(config, set_)
        flags = (["--json"] if as_json else []) + (["--force"] if force else [])
        launch = launch_flags(nproc, nnodes, node_rank, rdzv_endpoint)
        if _relaunch(nproc, ["probe-batch", config, *flags], set_, cfg, nodes, launch):
            return
        from llmtrain.commands import probe as command

        command.execute(cfg, as_json=as_json, force=force)

    _guarded("probe-batch", work)


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

    _guarded("validate", work)


# ------------------------------------------------------------------ using a trained run
RunDirArg = Annotated[
    str,
    typer.Argument(
        help="A run directory (a config's run.output_dir).", metavar="RUN_DIR", show_default=False
    ),
]
CheckpointOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        help="Use this checkpoint (RUN_DIR/checkpoints/step-N) instead of final/.",
        metavar="PATH",
        show_default=False,
    ),
]
BatchOpt = Annotated[
    str | None,
    typer.Option(
        "--batch",
        help="Rows per forward pass, or 'auto' to probe; default the run's micro-batch.",
        metavar="N|auto",
        show_default=False,
    ),
]
TextFieldOpt = Annotated[
    str | None,
    typer.Option(
        "--text-field",
        help="jsonl/csv: the field holding the text (default: the run's data.train.text_field).",
        show_default=False,
    ),
]


@app.command()
def predict(
    run_dir: RunDirArg,
    input_path: Annotated[
        str,
        typer.Option(
            "--input",
            help="The documents: any corpus data.* accepts (file, folder, glob).",
            show_default=False,
        ),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            help="Write one JSON object per document to this file.",
            metavar="FILE.jsonl",
        ),
    ] = None,
    batch: BatchOpt = None,
    text_field: TextFieldOpt = None,
    id_field: Annotated[
        str | None,
        typer.Option(
            "--id-field",
            help="jsonl/csv: the field holding a document id (default: the run's; '' for "
            "file:line).",
            show_default=False,
        ),
    ] = None,
    checkpoint: CheckpointOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict every document of a corpus with a trained run: same tokenizer, windows and
    aggregation as in training."""

    _delegate(
        "predict",
        run_dir,
        input_path=input_path,
        output=output,
        batch=batch,
        text_field=text_field,
        id_field=id_field,
        checkpoint=checkpoint,
        as_json=as_json,
    )


@app.command()
def evaluate(
    run_dir: RunDirArg,
    input_path: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="Evaluate on this labelled corpus instead of the run's eval data.",
            show_default=False,
        ),
    ] = None,
    checkpoint: CheckpointOpt = None,
    batch: BatchOpt = None,
    text_field: TextFieldOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The metrics of fit's eval records (loss, ppl, accuracy, doc_accuracy) for the final
    model or a checkpoint; per-class precision/recall and a confusion matrix for classifiers."""

    _delegate(
        "evaluate",
        run_dir,
        input_path=input_path,
        checkpoint=checkpoint,
        batch=batch,
        text_field=text_field,
        as_json=as_json,
    )


@app.command()
def generate(
    run_dir: RunDirArg,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="The text to continue.", show_default=False),
    ] = None,
    input_path: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="Prompts from a file: .txt one per line, .jsonl one per record (--text-field).",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate at most.")
    ] = 100,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature",
            min=0.0,
            callback=_finite,
            help="Sampling temperature; 0 is greedy.",
        ),
    ] = 0.8,
    top_p: Annotated[
        float,
        typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling: keep this much mass."),
    ] = 0.95,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Seed the sampling: the same seed gives the same text."),
    ] = None,
    text_field: TextFieldOpt = None,
    checkpoint: CheckpointOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Continue a prompt with a trained causal LM (transformers' generate)."""

    if (prompt is None) == (input_path is None):
        _guarded("generate", _refuse("generate: give exactly one of --prompt TEXT or --input FILE"))
    _delegate(
        "generate",
        run_dir,
        prompt=prompt,
        input_path=input_path,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        text_field=text_field,
        checkpoint=checkpoint,
        as_json=as_json,
    )


@app.command()
def report(
    run_dirs: Annotated[
        list[str],
        typer.Argument(
            help="One or more run directories.", metavar="RUN_DIR...", show_default=False
        ),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            help="The PNG to write (default: RUN_DIR/report.png for one run, report.png for "
            "several).",
            metavar="FILE.png",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Plot runs' metrics.jsonl (loss, learning rate, tokens/s, grad norm, accuracy) into one
    PNG, several runs overlaid, and print a summary table."""

    _delegate("report", run_dirs, output=output, as_json=as_json)


def main() -> None:
    """Entry point of the console script and of `python -m llmtrain`."""
    _state["process"] = True
    try:
        app(prog_name="llmtrain")
    finally:  # a success too: Ctrl-C during the interpreter's shutdown prints a traceback
        _exiting()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
