"""The bad inputs a new user hits (issue 12, items 6, 8, 9 and 10): each refused with one line
naming the key and file:line, or reported instead of silently ignored.

Covered: a YAML alias bomb; strict label types; n_layer 0, a negative seed, overlap with pack;
chunk with seq_len above the model's positions; on_error: skip counts; nan_policy: skip
summary and failure; the warmup default; Typer's flag rendering; probe-batch's cache and cap;
an explicit --workers against TOKENIZERS_PARALLELISM=false.
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from chunk_helpers import wordpiece_tokenizer
from fit_helpers import FakeTokenizer, make_cfg, random_store, run_train
from rich.console import Console
from typer.testing import CliRunner

from llmtrain.cli import app
from llmtrain.config import DataSourceConfig, OptimConfig, load_config
from llmtrain.data.corpus import iter_documents
from llmtrain.data.encode import set_workers
from llmtrain.data.store_cache import ensure_stores
from llmtrain.engine import loop
from llmtrain.engine.optim import resolve_warmup
from llmtrain.errors import ConfigError, LLMTrainError

runner = CliRunner()


def write_config(tmp_path: Path, tok_dir: Path, corpus: Path, **sections) -> Path:
    """A small causal-lm config on `corpus` (JSON, which is YAML), sections merged in."""
    cfg = {
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
        "model": {
            "arch": "gpt2",
            "config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64},
        },
        "tokenizer": {"path": str(tok_dir)},
        "data": {"train": {"path": str(corpus)}, "chunk": {"seq_len": 16}},
        "batch": {"global_batch": 4, "micro_batch": 2},
        "train": {"max_steps": 1, "precision": "fp32", "eval_every": None},
        "log": {"progress": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    return path


def lines(n: int, bad: dict[int, str] | None = None) -> str:
    """n JSON Lines records of text, with some lines (1-based) replaced by `bad` text."""
    out = [json.dumps({"text": f"the cat sat on a mat {i}"}) for i in range(n)]
    for lineno, text in (bad or {}).items():
        out[lineno - 1] = text
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------ YAML aliases
BOMB = """\
data:
  train: {path: corpus.txt}
model:
  arch: gpt2
  config:
    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _limit_memory() -> None:  # runs in the child: 2 GiB of address space, not 5 GB and more
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_alias_bomb_is_refused_in_bounded_memory(tmp_path):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    p = subprocess.run(
        [sys.executable, "-m", "llmtrain", "validate", "bomb.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_memory,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr == (
        "bomb.yaml:11:8: model.config.f: expands to more than 100,000 values through YAML "
        "aliases (*name); a config that large is refused: write the values out, or alias less\n"
    )


def test_recursive_alias_and_set_bomb_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("hello\n")
    Path("rec.yaml").write_text("data: &d\n  train: {path: corpus.txt}\n  more: [*d]\n")
    with pytest.raises(ConfigError) as e:
        load_config("rec.yaml")
    assert e.value.messages == [
        "rec.yaml:1:7: data.more.0: an alias refers to the mapping or list that contains it"
    ]
    Path("ok.yaml").write_text("data:\n  train: {path: corpus.txt}\ntrain: {max_steps: 1}\n")
    levels = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcd", "bcde", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    bomb = "model.config_overrides={" + ", ".join(levels) + "}"
    with pytest.raises(ConfigError, match=r"^--set model\.config_overrides=.*expands to more"):
        load_config("ok.yaml", [bomb])
    # Aliases within the bound still work (and merge keys).
    Path("alias.yaml").write_text(
        "base: &b {max_steps: 3}\ndata:\n  train: {path: corpus.txt}\ntrain:\n  <<: *b\n"
    )
    with pytest.raises(ConfigError, match="base: unknown key"):
        load_config("alias.yaml")


# --------------------------------------------------------------------------- labels
def labelled(tmp_path: Path, name: str, *labels) -> DataSourceConfig:
    recs = [json.dumps({"text": f"text {i}", "label": lab}) for i, lab in enumerate(labels)]
    (tmp_path / name).write_text("\n".join(recs) + "\n")
    return DataSourceConfig(path=str(tmp_path / name))


def test_one_and_quoted_one_are_not_silently_one_class(tmp_path):
    src = labelled(tmp_path, "l.jsonl", 1, 0, "1")
    with pytest.raises(LLMTrainError) as e:
        list(iter_documents(src, require_label=True))
    message = str(e.value)
    assert "l.jsonl:3: the label '1' is a string" in message
    assert "l.jsonl:1 has the integer label 1" in message
    assert "one corpus uses one label type" in message
    # Integers stay integers (not strings) when the task needs labels.
    docs = list(iter_documents(labelled(tmp_path, "i.jsonl", 2, 10), require_label=True))
    assert [d.label for d in docs] == [2, 10]


@pytest.mark.parametrize(
    ("label", "shown"),
    [([1, 2], "[1, 2] is a list"), (True, "true is a boolean"), (1.5, "1.5 is a float"),
     ({"a": 1}, '{"a": 1} is a mapping')],
)  # fmt: skip
def test_lists_booleans_floats_mappings_are_refused_as_labels(tmp_path, label, shown):
    src = labelled(tmp_path, "l.jsonl", "x", label)
    with pytest.raises(LLMTrainError) as e:
        list(iter_documents(src, require_label=True))
    assert (
        f"l.jsonl:2: field 'label': the label {shown}; a label must be a string or an integer"
        in (str(e.value))
    )
    assert "on_error: skip" in str(e.value)
    skipping = src.model_copy(update={"on_error": "skip"})
    assert [d.label for d in iter_documents(skipping, require_label=True)] == ["x"]


def test_integer_labels_sort_as_numbers_and_eval_must_match_their_type(tmp_path):
    wp = wordpiece_tokenizer()
    train = labelled(tmp_path, "train.jsonl", 10, 2, 1, 2)
    cfg = make_cfg(
        tmp_path,
        task="sequence-classification",
        data={"train": train.model_dump(), "chunk": {"seq_len": 8, "mode": "truncate"}},
    )
    store = ensure_stores(cfg, wp, progress=False).stores["train"]
    assert store.label_names == ["1", "2", "10"] and store.meta["label_type"] == "integer"
    assert [store[i]["label"] for i in range(4)] == [2, 1, 0, 1]
    labelled(tmp_path, "eval.jsonl", "2", "1")
    cfg.data.eval = DataSourceConfig(path=str(tmp_path / "eval.jsonl"))
    with pytest.raises(LLMTrainError, match=r"eval\.jsonl:1: the label '2' is a string, but "
                       r"data\.train's labels are integers"):  # fmt: skip
        ensure_stores(cfg, wp, progress=False)


# ------------------------------------------------------------------- small config errors
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.config.n_layer=0",
         "model.config.n_layer: must be at least 1: a model needs a layer (got 0)"),
        ("run.seed=-1", "run.seed: must be an integer in [0, 4294967295] (got -1)"),
        ("data.chunk.overlap=4",
         "data.chunk.overlap: only applies to mode: window (pack never repeats tokens, got "
         "overlap 4); remove it or set data.chunk.mode: window"),
    ],
)  # fmt: skip
def test_small_config_errors(tmp_path, tok_dir, override, message):
    (tmp_path / "c.jsonl").write_text(lines(4))
    cfg = write_config(tmp_path, tok_dir, tmp_path / "c.jsonl")
    r = runner.invoke(app, ["validate", str(cfg), "--set", override])
    assert r.exit_code == 2 and r.stderr == f"--set {override}: {message}\n", r.output


def test_zero_layers_refused_under_any_name(tmp_path, tok_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text(lines(4))
    Path("b.yaml").write_text(
        "model:\n  arch: bert\n  config:\n    num_hidden_layers: 0\n"
        "data:\n  train: {path: c.jsonl}\ntrain: {max_steps: 1}\n"
        f"tokenizer: {{path: {tok_dir}}}\n"
    )
    r = runner.invoke(app, ["validate", "b.yaml"])
    assert r.exit_code == 2
    assert r.stderr == (
        "b.yaml:4:5: model.config.num_hidden_layers: must be at least 1: a model needs a "
        "layer (got 0)\n"
    )


def test_chunk_refuses_seq_len_above_the_model_positions(tmp_path, tok_dir):
    (tmp_path / "c.jsonl").write_text(lines(20))
    cfg = write_config(tmp_path, tok_dir, tmp_path / "c.jsonl", data={"chunk": {"seq_len": 128}})
    r = runner.invoke(app, ["chunk", str(cfg)])
    assert r.exit_code == 2, r.output
    assert "data.chunk.seq_len: 128 is above the model's position limit n_positions=64" in (
        r.stderr
    )
    assert not (tmp_path / "run" / "store").exists()


# --------------------------------------------------------------------- on_error: skip
def test_skipped_records_are_counted_in_chunk_and_fit(tmp_path, tok_dir, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)  # only the skip note, please
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    (tmp_path / "c.jsonl").write_text(lines(40, {3: "{not json", 7: '{"body": "x"}'}))
    cfg = write_config(
        tmp_path,
        tok_dir,
        tmp_path / "c.jsonl",
        data={"train": {"path": str(tmp_path / "c.jsonl"), "on_error": "skip"}},
    )
    r = runner.invoke(app, ["chunk", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["splits"]["train"]["skipped_records"] == 2
    assert out["splits"]["train"]["documents"] == 38
    note = "warning: data.train: 2 bad records skipped (on_error: skip), 38 documents kept in train"
    assert out["notes"] == [note] and note in r.stderr
    human = runner.invoke(app, ["chunk", str(cfg)])  # reused: still said
    assert human.exit_code == 0 and note in human.stdout
    fit = runner.invoke(app, ["fit", str(cfg)])
    assert fit.exit_code == 0, fit.output
    assert note in fit.stderr


# -------------------------------------------------------------------- nan_policy: skip
def _nan_at(monkeypatch, steps: set[int]) -> None:
    """The window losses of these steps (1-based) become NaN, as a diverging run's would."""
    real, calls = loop.forward_backward, [0]

    def flaky(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls[0] += 1
        return loss * float("nan") if calls[0] in steps else loss

    monkeypatch.setattr(loop, "forward_backward", flaky)


def test_nan_skip_ends_with_a_summary(tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, {2})
    cfg = make_cfg(tmp_path, steps=4, train={"nan_policy": "skip"})
    _, result = run_train(cfg, random_store(32))
    assert result.step == 4 and result.final_dir is not None and result.final_dir.is_dir()
    err = capsys.readouterr().err
    assert "warning: train.nan_policy: skip skipped 1 of 4 steps (non-finite loss: 2)\n" in err
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = [e for e in events if e.get("event") == "nonfinite_summary"]
    assert summary == [{"event": "nonfinite_summary", "step": 4, "skipped": 1, "steps": 4}]


def test_nan_skip_of_most_steps_is_a_loud_warning(tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, {2, 3, 4})
    cfg = make_cfg(tmp_path, steps=4, train={"nan_policy": "skip"})
    run_train(cfg, random_store(32))
    err = capsys.readouterr().err
    assert (
        "warning: train.nan_policy: skip skipped 3 of 4 steps (non-finite loss: 2, 3, 4): MOST "
        "OF THE RUN DID NOT TRAIN, final/ holds a barely trained model; lower optim.lr or "
        "check the data"
    ) in err.replace("\n", "")


# ------------------------------------------------------------------------------ warmup
def test_default_warmup_follows_the_run_length(tmp_path):
    assert OptimConfig().warmup_steps is None
    assert [resolve_warmup(OptimConfig(), n) for n in (1, 20, 1000)] == [1, 1, 50]
    assert resolve_warmup(OptimConfig(warmup_steps=7), 20) == 7
    cfg = make_cfg(tmp_path, steps=4, optim={"warmup_steps": None, "schedule": "constant"})
    run_train(cfg, random_store(32))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r.get("split") == "train"]
    assert lrs == [1e-2] * 4  # the peak from step 1: the old default (100 steps) gave 1e-4


def test_explicit_warmup_longer_than_an_epochs_run_is_an_error(tmp_path):
    cfg = make_cfg(tmp_path, train={"max_steps": None, "epochs": 1.0}, optim={"warmup_steps": 100})
    with pytest.raises(
        LLMTrainError, match=r"^optim\.warmup_steps: 100 is longer than the run's 4"
    ):
        run_train(cfg, random_store(32))  # 32 sequences / global 8 = 4 steps


def test_banner_shows_the_resolved_warmup(tmp_path):
    from llmtrain.commands.fit import banner
    from llmtrain.engine.distributed import DistInfo
    from llmtrain.engine.model import build_model
    from llmtrain.pipeline import Plan

    cfg = make_cfg(tmp_path, steps=40, optim={"warmup_steps": None})
    model = build_model(cfg, FakeTokenizer(), None)
    out = Console(file=io.StringIO(), width=200)
    out.print(banner(Plan(cfg, model, torch.device("cpu"), 2, 32, DistInfo())))
    assert "40 (constant, warmup 2 (default: 5% of 40 steps))" in out.file.getvalue()


# --------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("command", [[], ["fit"], ["chunk"], ["probe-batch"], ["validate"]])
def test_flags_are_not_shown_as_taking_a_bool(command):
    r = runner.invoke(app, [*command, "--help"], terminal_width=120)
    assert r.exit_code == 0
    assert "<bool>" not in r.stdout and "--help" in r.stdout


def test_probe_batch_reuses_its_cache_and_says_when_global_batch_caps_it(
    tmp_path, tok_dir, monkeypatch
):
    from llmtrain.probe import search

    (tmp_path / "c.jsonl").write_text(lines(20))
    cfg = write_config(
        tmp_path,
        tok_dir,
        tmp_path / "c.jsonl",
        batch={"micro_batch": "auto", "probe": {"memory_limit": "1TiB", "max_micro": 16}},
    )
    first = runner.invoke(app, ["probe-batch", str(cfg), "--json"])
    assert first.exit_code == 0, first.output
    measured = json.loads(first.stdout)
    assert measured["cached"] is False and measured["micro_batch"] == 4
    assert measured["capped_by"] == "global_batch"

    def no_trials(*a, **k):
        raise AssertionError("a cache hit must not run trials")

    monkeypatch.setattr(search, "run_trial", no_trials)
    again = runner.invoke(app, ["probe-batch", str(cfg)], terminal_width=200)
    assert again.exit_code == 0, again.output
    assert "cached result from" in again.stdout and "--force measures again" in again.stdout
    assert "capped by batch.global_batch=4, not by memory" in again.stdout
    forced = runner.invoke(app, ["probe-batch", str(cfg), "--json", "--force"])
    assert forced.exit_code == 1 and "a cache hit must not run trials" in forced.stderr


def test_explicit_workers_beat_tokenizers_parallelism_false(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    note = set_workers(None)
    assert note is not None and note.startswith("TOKENIZERS_PARALLELISM=false in the environment")
    assert set_workers(2) is None
    import os

    assert os.environ["TOKENIZERS_PARALLELISM"] == "true" and os.environ["RAYON_NUM_THREADS"] == "2"
    assert set_workers(None) is None  # what set_workers wrote is not "the environment"
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    assert set_workers(None).startswith("RAYON_NUM_THREADS=1 in the environment")
    monkeypatch.delenv("RAYON_NUM_THREADS")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    (tmp_path / "c.jsonl").write_text(lines(20))
    cfg = write_config(tmp_path, tok_dir, tmp_path / "c.jsonl")
    forced = json.loads(runner.invoke(app, ["chunk", str(cfg), "--json"]).stdout)
    assert any(n.startswith("TOKENIZERS_PARALLELISM=false") for n in forced["notes"])
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    r = runner.invoke(app, ["chunk", str(cfg), "--json", "--force", "--workers", "2"])
    assert json.loads(r.stdout)["notes"] == [] and os.environ["TOKENIZERS_PARALLELISM"] == "true"
