"""Faults a careless user still hits (issue 22), one section per CLASS of failure, not per
example: each test states the class and sweeps its instances, so that a field, a file or a
command added later is covered by the same test.

1. Bad values at validation: every field of every section refuses non-finite floats, booleans
   as numbers (and numbers as booleans) and integers past 64 bits, exit 2 with file:line;
   a model too large to build, and a path of the wrong kind, are refused the same way.
2. A full disk, wherever it is met (the token store, the lock): one line naming the folder,
   nothing half-written left behind; no lock file outlives its use.
3. A damaged file we read (weights, tokenizer, the run's config, metrics, a checkpoint of
   another model): one line naming the file, never a library's raw exception.
4. Signals while exiting: a Ctrl-C after SIGTERM's clean exit prints no traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel
from run_helpers import tiny_lm_config, trained, write_config, write_corpus
from typer.testing import CliRunner

from llmtrain.cli import app
from llmtrain.config import Config, section_class, validation_problems
from llmtrain.config.messages import dotted
from llmtrain.errors import LLMTrainError

runner = CliRunner()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return trained("lm", tmp_path_factory)


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    return trained("classifier", tmp_path_factory)


def _cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


# ------------------------------------------------------- 1. bad values at validation
# Every optional section present, so that every field of every section can be reached.
def _full_mapping() -> dict[str, Any]:
    return {
        "model": {"arch": "gpt2", "peft": {}},
        "tokenizer": {"train": {}},
        "data": {"train": {"path": "c.txt"}, "eval": {"path": "c.txt"}},
    }


def _leaves(model: type[BaseModel], path: tuple[str, ...] = ()):
    """(key path, annotation) of every leaf field under `model`, sections recursed into."""
    for name, info in model.model_fields.items():
        inner = section_class(info.annotation)
        if inner is not None:
            yield from _leaves(inner, (*path, name))
        else:
            yield (*path, name), info.annotation


def _admits(annotation: Any, kind: type) -> bool:
    if annotation is kind:
        return True
    return any(_admits(a, kind) for a in get_args(annotation) if not isinstance(a, str))


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    data = _full_mapping()
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return data


def _problem_at(path: tuple[str, ...], value: Any) -> str | None:
    _, problems = validation_problems(_with(path, value))
    found = [msg for p, msg in problems if p[: len(path)] == path]
    return found[0] if found else None


LEAVES = list(_leaves(Config))
NUMBERS = [(p, a) for p, a in LEAVES if _admits(a, int) or _admits(a, float)]
FLOATS = [(p, a) for p, a in LEAVES if _admits(a, float)]
FLAGS = [(p, a) for p, a in LEAVES if _admits(a, bool) and not _admits(a, int)]


def test_the_sweep_reaches_the_fields_it_is_about():
    """The sweeps below are only as good as their lists: they hold the known instances."""
    names = {dotted(p) for p, _ in NUMBERS}
    assert {"optim.lr", "optim.betas", "train.max_steps", "batch.micro_batch"} <= names
    assert {"model.peft.r", "tokenizer.train.vocab_size", "data.chunk.seq_len"} <= names
    assert "optim.lr" in {dotted(p) for p, _ in FLOATS}
    assert "log.jsonl" in {dotted(p) for p, _ in FLAGS}
    assert _problem_at(("optim", "lr"), 1e-3) is None  # the mapping itself is valid


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("path", [p for p, _ in FLOATS], ids=[dotted(p) for p, _ in FLOATS])
def test_no_float_field_takes_a_non_finite_value(path, bad):
    value = [0.5, bad] if dotted(path) == "optim.betas" else bad
    assert _problem_at(path, value) is not None, f"{dotted(path)} took {bad}"


@pytest.mark.parametrize("path", [p for p, _ in NUMBERS], ids=[dotted(p) for p, _ in NUMBERS])
def test_no_number_field_takes_a_boolean_or_an_int_past_64_bits(path):
    pair = dotted(path) == "optim.betas"
    floats = path in [p for p, _ in FLOATS]  # 10**30 is a fine float (peak_flops)
    for bad in (True, False) if floats else (True, False, 10**30):
        problem = _problem_at(path, [0.5, bad] if pair else bad)
        assert problem is not None, f"{dotted(path)} took {bad!r}"


@pytest.mark.parametrize("path", [p for p, _ in FLAGS], ids=[dotted(p) for p, _ in FLAGS])
def test_no_flag_takes_a_number(path):
    assert _problem_at(path, 1) == "must be true or false (got 1)"


CLI_CASES = [
    # (--set, the one line on stderr after "--set X: ")
    ("optim.lr=.inf", "optim.lr: must be a finite number (got inf)"),
    ("optim.betas=[.nan,1.5]", "optim.betas.0: must be a finite number (got nan)"),
    ("optim.betas=[.nan,1.5]", "optim.betas.1: must be a number in [0, 1) (got 1.5)"),
    ("optim.betas=[0.9,1.0]", "optim.betas.1: must be a number in [0, 1) (got 1.0)"),
    ("train.max_steps=true", "train.max_steps: must be a positive integer (got true)"),
    ("batch.micro_batch=true", 'batch.micro_batch: must be an integer or "auto" (got true)'),
    ("log.jsonl=1", "log.jsonl: must be true or false (got 1)"),
    (
        "train.save_every=100000000000000000000000000000",
        "train.save_every: must be an integer below 2^63 (got 100000000000000000000000000000)",
    ),
    ("run.threads=100000", "run.threads: must be an integer in [1, 1024] (got 100000)"),
]


def _validate_in(tmp_path, monkeypatch, *overrides: str):
    """`llmtrain validate` of a small valid config in `tmp_path`, with `--set` overrides."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("some text\n")
    (tmp_path / "cfg.yaml").write_text(
        "model: {arch: gpt2, config: {n_layer: 1, n_embd: 64, n_head: 2}}\n"
        "tokenizer: {train: {}}\ndata: {train: {path: c.txt}}\ntrain: {max_steps: 10}\n"
    )
    return _cli("validate", "cfg.yaml", *(x for o in overrides for x in ("--set", o)))


@pytest.mark.parametrize("override,line", CLI_CASES, ids=[c[1].split(":")[0] for c in CLI_CASES])
def test_bad_values_are_exit_2_naming_the_key(tmp_path, monkeypatch, override, line):
    result = _validate_in(tmp_path, monkeypatch, override)
    assert result.exit_code == 2
    assert f"--set {override}: {line}\n" in result.stderr
    assert "Traceback" not in result.stderr


SIZES = [
    # (--set, what the line says): refused at validation, not a hang or a crash in `fit`
    ("model.config.n_layer=" + str(10**30), "model.config.n_layer: must be at most 10,000"),
    ("model.config.n_embd=1000000", "model.config.n_embd: builds a model of 1.21e+13 "
     "parameters, above the 1e+12 that one machine can hold"),
    ("model.config.n_positions=" + str(10**11), "model.config.n_positions: builds a model of "
     "6.4e+12"),
    ("model.config.n_embd=" + str(2**62), "model.config.n_embd: cannot be built: Storage size"),
]  # fmt: skip


@pytest.mark.parametrize("override,line", SIZES, ids=[c[0].split("=")[0] for c in SIZES])
def test_a_model_too_large_to_build_is_refused_at_validation(tmp_path, monkeypatch, override, line):
    """Counted on the meta device from 1 and 2 layers, so a deep model costs no time."""
    result = _validate_in(tmp_path, monkeypatch, override)
    assert result.exit_code == 2, result.output
    assert f"--set {override}: {line}" in result.stderr, result.stderr


def test_the_parameter_count_is_exact():
    """The extrapolation from 1 and 2 layers equals the built model's count (GPT-2, Llama)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from llmtrain.config.rules import parameter_count

    small = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    for hf in (
        GPT2Config(n_layer=5, n_embd=32, n_head=2),
        LlamaConfig(num_hidden_layers=3, **small),
    ):
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(hf)
        assert parameter_count(hf, "causal-lm") == sum(p.numel() for p in built.parameters())


PATHS = [
    # (--set, the problem): a folder the run writes into is never empty, a file, or under one
    ("run.output_dir=''", "run.output_dir: must name a directory (got an empty path)"),
    ("run.output_dir=afile", "run.output_dir: 'afile' is a file, not a directory"),
    ("run.output_dir=afile/run", "run.output_dir: '{tmp}/afile' is a file, so no directory"),
    ("data.store=''", "data.store: must name a directory (got an empty path)"),
    ("data.store=afile", "data.store: 'afile' is a file, not a directory"),
    ("data.sft.chat_template=adir", "data.sft.chat_template: 'adir' is a directory, not a Jinja"),
    ("model.pretrained=afile", "model.pretrained: 'afile' is a file; name a Hugging Face model"),
]


@pytest.mark.parametrize("override,line", PATHS, ids=[c[0] for c in PATHS])
def test_a_path_of_the_wrong_kind_is_refused_naming_the_key(tmp_path, monkeypatch, override, line):
    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "adir").mkdir()
    extra = {"chat_template": ("data.train.format=chat",), "pretrained": ("model.arch=null",)}
    also = next((v for k, v in extra.items() if k in override), ())
    result = _validate_in(tmp_path, monkeypatch, override, *also)
    assert result.exit_code == 2, result.output
    assert f"--set {override}: {line.format(tmp=tmp_path)}" in result.stderr, result.stderr
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_an_output_file_of_the_wrong_kind_is_one_line(lm, tmp_path):
    """Command-line outputs go through util/atomic: a folder given for a file, a file on the
    way to a folder, are one line naming the path (not IsADirectoryError / FileExistsError),
    and nothing is written."""
    from llmtrain.util.atomic import atomic_dir, atomic_write

    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "adir").mkdir()
    cases = [  # a folder named as the output is a usage error (rundir/outputs.check_output)
        (tmp_path / "adir", 2, f"--output {tmp_path / 'adir'}: a directory; give a file"),
        (tmp_path / "afile" / "x.png", 1, f"{tmp_path / 'afile'} is a file, not a directory"),
    ]
    for output, code, line in cases:
        result = _cli("report", str(lm), "--output", str(output))
        assert result.exit_code == code and line in result.stderr, result.output
        assert result.stderr.count("\n") == 1, result.stderr
    directory_over_a_file = atomic_dir(tmp_path / "afile")
    with pytest.raises(LLMTrainError, match="is a file where a directory is written"):
        directory_over_a_file.__enter__()
    with pytest.raises(LLMTrainError, match="afile is a file, not a directory"):
        atomic_write(tmp_path / "afile" / "deeper" / "x.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]
    assert (tmp_path / "afile").read_text() == "mine\n" and not any((tmp_path / "adir").iterdir())


def test_a_float_option_is_finite(lm):
    """click reads 'inf' as a float: `generate --temperature inf` sampled noise."""
    result = _cli("generate", str(lm), "--prompt", "the", "--temperature", "inf")
    assert result.exit_code == 2 and "must be a finite number (got inf)" in result.output


# ---------------------------------------------------- 2. a full disk, wherever it is met
# A real full disk: a small tmpfs in a private mount namespace (as tests/test_safety.py's
# test_a_real_full_disk), so the ENOSPC comes from the kernel, through whatever layer writes.
FULL_DISK = textwrap.dedent(
    """
    import contextlib, io, json, os, subprocess, sys
    root, config = sys.argv[1], sys.argv[2]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", root], check=True)
    from llmtrain.cli import app
    from llmtrain.errors import LLMTrainError
    from llmtrain.util.locks import hold_run_dir
    out = {}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            app(["chunk", config], prog_name="llmtrain")
        except SystemExit as e:
            out["chunk_rc"] = e.code
    out["chunk_err"] = err.getvalue()
    out["store"] = sorted(os.listdir(root + "/store")) if os.path.isdir(root + "/store") else []
    with open(root + "/filler", "wb", buffering=0) as f:  # fill the disk to its last byte
        with contextlib.suppress(OSError):
            while True:
                f.write(b"x" * 4096)
    try:
        with hold_run_dir(root + "/run"):
            out["lock"] = "taken"
    except LLMTrainError as e:
        out["lock"] = str(e)
    out["run"] = sorted(os.listdir(root + "/run"))
    print(json.dumps(out))
    """
)


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(tmp_path):
    """`chunk` filling the disk, and the lock file finding it full: the one "no space" line
    (util/atomic.no_space), exit 1, no traceback, no temporary, no empty lock file."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user+mount namespaces here (unshare -rm)")
    root = tmp_path / "small"
    root.mkdir()
    corpus = write_corpus(tmp_path / "corpus.txt", lines=8000)  # ~100 KB of uint16 tokens
    cfg = tiny_lm_config(tmp_path / "out", corpus, name="full", max_steps=2)
    cfg["data"]["store"] = str(root / "store")
    config = write_config(tmp_path / "cfg.yaml", cfg)
    proc = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", FULL_DISK, str(root), str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["chunk_rc"] == 1, out
    lines = out["chunk_err"].strip().splitlines()
    assert lines[-1].startswith(
        f"error: {root / 'store'}: no space left on the device to write the token store: "
    ), out["chunk_err"]
    assert "Traceback" not in out["chunk_err"] and "Errno" not in out["chunk_err"]
    # no .tmp-train-<pid>: at most the store folder's owner mark (util/owned.py)
    assert [n for n in out["store"] if n != ".llmtrain"] == [], out["store"]
    assert out["lock"].startswith(
        f"{root / 'run'}: no space left on the device to write the lock file llmtrain.lock: "
    ), out["lock"]
    assert [n for n in out["run"] if n != ".llmtrain"] == [], out["run"]  # no empty lock


def test_a_trained_tokenizer_leaves_no_lock_file(tmp_path):
    """The lock that serialises the ranks training one tokenizer is removed after use
    (util/locks.exclusive), like llmtrain.lock: no empty file is left in the run."""
    from llmtrain.config import load_config
    from llmtrain.data.tokenizer import load_tokenizer

    corpus = write_corpus(tmp_path / "corpus.txt", lines=30)
    cfg = tiny_lm_config(tmp_path / "run", corpus, name="tok", max_steps=2)
    load_tokenizer(load_config(write_config(tmp_path / "cfg.yaml", cfg)))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tokenizer"]


# ------------------------------------ 3. a damaged file we read: one line naming the file
def _random_bytes(path: Path, *, reseal: bool) -> None:
    """`path` becomes noise; `reseal` rewrites its folder's checksums.json to match (what
    someone who can write the run can do), else the folder loses it (an older run's)."""
    from llmtrain.engine.checkpoint import write_manifest

    path.write_bytes(os.urandom(5000))
    if reseal:
        folder = path.parent
        names = [f.name for f in folder.iterdir() if f.is_file() and f.name != "checksums.json"]
        write_manifest(folder, sorted(set(names) - {"complete"}))
    else:
        (path.parent / "checksums.json").unlink(missing_ok=True)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01 not what it should be \x07{[")
    (path.parent / "checksums.json").unlink(missing_ok=True)  # or the checksum names it


DAMAGED = [
    # (case, file in the run, how it is damaged, command after `llmtrain`, code)
    ("final weights", "final/model.safetensors", "noise", "predict", 1),
    ("final weights resealed", "final/model.safetensors", "noise+seal", "predict", 1),
    ("checkpoint weights", "checkpoints/step-00000006/model.safetensors", "noise+seal",
     "predict --checkpoint", 1),
    ("checkpoint weights on resume", "checkpoints/step-00000006/model.safetensors",
     "noise+seal", "fit --resume PATH", 1),
    ("final tokenizer", "final/tokenizer.json", "garbage", "predict", 1),
    ("final config", "final/config.json", "garbage", "predict", 1),
    ("resolved config, predict", "config.resolved.yaml", "garbage", "predict", 2),
    ("resolved config, resume", "config.resolved.yaml", "garbage", "fit --resume auto", 1),
]  # fmt: skip


def _command(kind: str, run: Path, tmp_path: Path, resume_config: Path) -> list[str]:
    step = str(run / "checkpoints" / "step-00000006")
    docs = tmp_path / "in.txt"
    docs.write_text("the cat sat on a mat\n")
    return {
        "predict": ["predict", str(run), "--input", str(docs)],
        "predict --checkpoint": ["predict", str(run), "--input", str(docs), "--checkpoint", step],
        "fit --resume PATH": ["fit", str(resume_config), "--resume", step],
        "fit --resume auto": ["fit", str(resume_config), "--resume", "auto"],
    }[kind]


@pytest.mark.parametrize("case,name,damage,kind,code", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_a_damaged_file_is_one_line_naming_it(lm, tmp_path, case, name, damage, kind, code):
    run = tmp_path / "run"
    shutil.copytree(lm, run)
    config = tmp_path / "cfg.yaml"
    cfg = yaml.safe_load((lm / "config.resolved.yaml").read_text())
    cfg["run"]["output_dir"] = str(run)
    config.write_text(yaml.safe_dump(cfg))
    if damage.startswith("noise"):
        _random_bytes(run / name, reseal=damage.endswith("seal"))
    else:
        _garbage(run / name)
    result = _cli(*_command(kind, run, tmp_path, config))
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if str(run / name) in line]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "(run with --debug" not in result.stderr


def test_a_checkpoint_of_another_model_is_one_line(lm, clf, tmp_path):
    """`predict --checkpoint` given a classifier's checkpoint for a causal LM's run."""
    docs = tmp_path / "in.txt"
    docs.write_text("the cat sat on a mat\n")
    other = sorted((clf / "checkpoints").iterdir())[-1]
    result = _cli("predict", str(lm), "--input", str(docs), "--checkpoint", str(other))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(
        f"error: {other / 'model.safetensors'}: weights do not match the run's model (missing ["
    ), result.stderr
    assert result.stderr.count("\n") == 1


def test_torn_bytes_in_metrics_are_skipped_lines_not_a_crash(lm, tmp_path):
    """metrics.jsonl holding bytes that are not UTF-8: `report` counts unreadable lines and
    `fit --resume` drops them, as it drops a line a crash tore."""
    from llmtrain.engine.metrics import truncate_after
    from llmtrain.rundir.trained import read_run_metrics

    metrics = tmp_path / "metrics.jsonl"
    good = (lm / "metrics.jsonl").read_bytes()
    metrics.write_bytes(good + b"\xff\xfe\x00garbage\n5\n")
    records, bad = read_run_metrics(tmp_path)
    assert len(records) == good.count(b"\n") and len(bad) == 1
    truncate_after(metrics, 10**6)
    assert metrics.read_bytes() == good


# ------------------------------------------------------------ 4. signals while exiting
@pytest.mark.slow  # a real `fit` process: ~15 s on a loaded 2-core machine
def test_ctrl_c_after_sigterm_prints_no_traceback(tmp_path):
    """SIGTERM stops `fit` cleanly (exit 143, its two lines); Ctrl-C pressed again and again
    from the moment the first line appears, through the interpreter's shutdown (atexit
    handlers, where it used to land), changes nothing: no traceback, still 143."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_lm_config(tmp_path / "run", corpus, name="sig", max_steps=400, save_every=None)
    config = write_config(tmp_path / "cfg.yaml", cfg)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtrain", "fit", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = []
    for line in proc.stderr:
        err.append(line)
        if "stopped by SIGTERM" in line:
            break

    def press_ctrl_c() -> None:
        while proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            time.sleep(0.005)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    err.append(proc.stderr.read())
    assert proc.wait(timeout=60) == 143, "".join(err)
    text = "".join(err)
    assert "stopped by SIGTERM after step" in text and "resume with: llmtrain fit" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
