"""Where a command may write its output: never over one of its inputs, nor over a file of a
run directory (its config, metrics, checkpoints, final model...)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from llmtrain import layout
from llmtrain.config import Config
from llmtrain.data.corpus import corpus_files
from llmtrain.errors import ConfigError


def _same(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one file (through links and `..` alike)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(
    output: str | Path, *, option: str, inputs: Iterable[Path] = (), runs: Iterable[Path] = ()
) -> Path:
    """`output`, refused (exit 2, one line) when it is one of `inputs`, a directory, or inside
    one of the run directories `runs` under a name llmtrain keeps its own files by."""
    out = Path(output)
    if out.is_dir():
        raise ConfigError(f"{option} {output}: a directory; give a file to write")
    for path in inputs:
        if _same(out, Path(path)):
            raise ConfigError(
                f"{option} {output}: is the input {path}; writing would replace it: choose "
                "another file"
            )
    for run in runs:
        try:
            rel = out.resolve().relative_to(Path(run).resolve())
        except ValueError:
            continue
        if rel.parts and rel.parts[0] in layout.RUN_FILES:
            raise ConfigError(
                f"{option} {output}: {rel.as_posix()} belongs to the run {run}; writing would "
                "replace it: choose a file outside the run's own files"
            )
    return out


def check_corpus_outside_run(cfg: Config) -> None:
    """`fit` writes (and `--overwrite` deletes) the run's own files: a corpus file among them
    would be replaced or deleted, and a run inside a corpus folder read back as training data.
    Refused, exit 2."""
    run = Path(cfg.run.output_dir).resolve()
    for where, source in cfg.data.sources():
        key = ".".join(str(part) for part in where)
        paths = [source.path] if isinstance(source.path, str) else source.path
        for folder in (Path(p).resolve() for p in paths if Path(p).is_dir()):
            if run == folder or folder in run.parents:  # its outputs would become corpus files
                raise ConfigError(
                    f"{key}: the corpus folder {folder} holds run.output_dir "
                    f"{cfg.run.output_dir}; what fit writes there would be read as training "
                    "data next time: put the run outside the corpus"
                )
        for file in corpus_files(source, key=key):
            try:
                rel = Path(file).resolve().relative_to(run)
            except ValueError:
                continue
            if rel.parts and rel.parts[0] in layout.RUN_FILES:
                raise ConfigError(
                    f"{key}: {file} is inside the run's own {rel.parts[0]} (run.output_dir "
                    f"{cfg.run.output_dir}), which fit writes and --overwrite deletes: move the "
                    "corpus out of it"
                )
