"""The run directory's boundaries (issue 22, parts 1-4), by class of failure:

1. nothing outside what llmtrain created is deleted or written: owner marks, no write
   through a symbolic link, no output over an input or a run's own file;
2. what is read from a run is confined to it: checksums.json names, links in a checkpoint
   or final/;
3. resume never trains on changed data without saying so: the run's data record;
4. stale temporaries are swept in the run root and checkpoints/.

Each test reproduces the failure first seen against main (it fails there)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import classifier_config, tiny_lm_config, write_config, write_corpus
from typer.testing import CliRunner

from llmtrain.cli import app
from llmtrain.engine import checkpoint as ckpt
from llmtrain.errors import LLMTrainError

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line(res, code: int) -> str:
    """The command failed with `code` and said why in one line, no traceback."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    return res.stderr


def lm_setup(where: Path, corpus: Path, **train) -> Path:
    train = {"max_steps": 8, "save_every": 4, "log_every": 1, **train}
    cfg = tiny_lm_config(where / "run", corpus, name="bounds", **train)
    where.mkdir(parents=True, exist_ok=True)
    return write_config(where / "config.yaml", cfg)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run of 8 steps (checkpoints at 4 and 8) on its own corpus; returns its root."""
    root = tmp_path_factory.mktemp("finished")
    corpus = write_corpus(root / "corpus.txt")
    res = cli("fit", str(lm_setup(root, corpus)))
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture
def copy(finished, tmp_path) -> tuple[Path, Path]:
    """A private copy of the finished run and its config (on the same corpus, which no test
    of the copy edits): (config, run dir)."""
    shutil.copytree(finished / "run", tmp_path / "run")
    return lm_setup(tmp_path, finished / "corpus.txt"), tmp_path / "run"


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# ------------------------------------------------- 1. only what llmtrain made is replaced
def test_chunk_force_never_replaces_a_folder_that_is_not_a_store(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "thesis.tex").write_text("years of work")
    (mine / "notes.txt").write_text("mine")
    cfg = tiny_lm_config(tmp_path / "run", corpus, name="x", max_steps=1)
    cfg["data"]["store"] = str(mine)
    config = write_config(tmp_path / "c.yaml", cfg)
    for extra in ([], ["--force"]):
        err = one_line(cli("chunk", str(config), *extra), 1)
        assert f"{mine}: not a store folder llmtrain made" in err and err.count("\n") == 1
    assert tree(mine) == {"train/thesis.tex": b"years of work", "notes.txt": b"mine"}


def test_a_split_folder_that_is_not_a_store_is_not_replaced(tmp_path):
    from llmtrain.data.store import TokenStoreWriter

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "data.csv").write_text("x")
    with pytest.raises(LLMTrainError, match=r"train: not a directory llmtrain made"):
        TokenStoreWriter(tmp_path / "train", vocab_size=10)
    assert (tmp_path / "train" / "data.csv").read_text() == "x"


def test_a_store_of_before_marks_is_still_reused(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_lm_config(tmp_path / "run", corpus, name="x", max_steps=1)
    config = write_config(tmp_path / "c.yaml", cfg)
    assert cli("chunk", str(config)).exit_code == 0
    for mark in (tmp_path / "run" / "store").rglob(".llmtrain"):
        mark.unlink()  # as an older llmtrain left it: recognised by train/meta.json
    res = cli("chunk", str(config), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["up_to_date"]


@pytest.mark.parametrize("extra", [[], ["--overwrite", "--yes"]])
def test_fit_never_writes_over_or_deletes_outputs_it_did_not_make(tmp_path, extra):
    corpus = write_corpus(tmp_path / "corpus.txt")
    config = lm_setup(tmp_path, corpus)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "photo.jpg").write_bytes(b"\xff\xd8")
    (run / "metrics.jsonl").write_text("my own log\n")
    before = tree(run)
    err = one_line(cli("fit", str(config), *extra), 1)
    assert f"{run}: not a run directory llmtrain made" in err and "metrics.jsonl" in err
    assert tree(run) == before


def test_a_run_of_before_marks_is_adopted(copy):
    config, run = copy
    (run / ".llmtrain").unlink()  # as an older llmtrain left it: it has config.resolved.yaml
    res = cli("fit", str(config), "--resume", "auto", "--set", "train.max_steps=9")
    assert res.exit_code == 0, res.output
    assert json.loads((run / ".llmtrain").read_text())["kind"] == "run"


@pytest.mark.parametrize("name", ["metrics.jsonl", "llmtrain.lock", "checkpoints"])
def test_no_write_follows_a_symlink_out_of_the_run(copy, tmp_path, name):
    config, run = copy
    outside = tmp_path / "outside"
    os.replace(run / name, outside) if (run / name).exists() else outside.write_text("keep\n")
    (run / name).symlink_to(outside)
    before = tree(outside) if outside.is_dir() else outside.read_bytes()
    err = one_line(cli("fit", str(config), "--resume", "auto", "--set", "train.max_steps=9"), 1)
    assert f"{run / name}: a symbolic link" in err and err.count("\n") == 1
    assert (tree(outside) if outside.is_dir() else outside.read_bytes()) == before


def test_each_writer_refuses_a_link_by_itself(tmp_path):
    """The writers check too, not only `fit`'s claim of the run directory up front."""
    from llmtrain.engine.metrics import MetricsWriter, truncate_after

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "log").write_text('{"step": 9}\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(outside / "log")
    (run / "checkpoints").symlink_to(outside)
    with pytest.raises(LLMTrainError, match="a symbolic link"):
        truncate_after(run / "metrics.jsonl", 1)
    with pytest.raises(LLMTrainError, match="a symbolic link"):
        MetricsWriter(
            run / "metrics.jsonl", enabled=True, jsonl=True, tensorboard=False, fresh=True
        )
    model = torch.nn.Linear(2, 2)
    with pytest.raises(LLMTrainError, match="a symbolic link"):
        ckpt.save_checkpoint(
            run,
            1,
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_state=ckpt.TrainState(step=1, micro_batch=1),
            parts={},
            keep=2,
        )
    assert tree(outside) == {"log": b'{"step": 9}\n'}


def test_the_default_store_may_not_be_a_link_a_named_data_store_may(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_lm_config(tmp_path / "run", corpus, name="x", max_steps=1)
    (tmp_path / "disk").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "store").symlink_to(tmp_path / "disk")
    config = write_config(tmp_path / "c.yaml", cfg)
    err = one_line(cli("chunk", str(config)), 1)
    assert f"{tmp_path / 'run' / 'store'}: a symbolic link" in err
    assert not any((tmp_path / "disk").iterdir())
    (tmp_path / "named").symlink_to(tmp_path / "disk")
    cfg["data"]["store"] = str(tmp_path / "named")  # the user's own choice of place
    res = cli("chunk", str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "disk" / "train" / "meta.json").is_file()


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoints"])
def test_overwrite_removes_a_link_never_its_target(copy, tmp_path, name):
    run = copy[1]
    outside = tmp_path / "outside"
    os.replace(run / name, outside)
    (run / name).symlink_to(outside)
    before = tree(outside) if outside.is_dir() else outside.read_bytes()
    from llmtrain.rundir.provenance import clear_run

    assert run / name in clear_run(run)
    assert (tree(outside) if outside.is_dir() else outside.read_bytes()) == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".old-")]
    assert not os.path.lexists(run / name)


def test_a_tokenizer_folder_that_is_not_ours_is_not_replaced(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    config = lm_setup(tmp_path, corpus)
    mine = tmp_path / "run" / "tokenizer"
    mine.mkdir(parents=True)
    (mine / "vocab.txt").write_text("my vocabulary")
    err = one_line(cli("fit", str(config)), 1)
    assert f"{mine}: not a directory llmtrain made" in err
    assert tree(mine) == {"vocab.txt": b"my vocabulary"}


def test_no_output_is_written_over_an_input_or_a_run_file(finished, tmp_path):
    run = finished / "run"
    docs = tmp_path / "x.txt"
    docs.write_text("alpha beta\n\ngamma delta\n")
    link = tmp_path / "link.txt"
    link.symlink_to(docs)
    config = run / "config.resolved.yaml"
    before = (docs.read_bytes(), config.read_bytes(), (run / "metrics.jsonl").read_bytes())
    cases = [
        (("predict", str(run), "--input", str(docs), "--output", str(docs)), "is the input"),
        (("predict", str(run), "--input", str(docs), "--output", str(link)), "is the input"),
        (("predict", str(run), "--input", str(docs), "--output", str(config)), "belongs to"),
        (("report", str(run), "--output", str(run / "metrics.jsonl")), "is the input"),
        (("report", str(run), "--output", str(run / "final" / "x.png")), "belongs to"),
    ]
    for args, said in cases:
        err = one_line(cli(*args), 2)
        assert said in err and err.count("\n") == 1, (args, err)
    after = (docs.read_bytes(), config.read_bytes(), (run / "metrics.jsonl").read_bytes())
    assert after == before


def test_a_corpus_inside_the_runs_own_files_is_refused(copy, finished):
    config, run = copy
    corpus = run / "checkpoints" / "corpus.txt"  # --overwrite would delete it
    shutil.copy2(finished / "corpus.txt", corpus)
    cfg = json.loads(config.read_text())
    cfg["data"]["train"]["path"] = str(corpus)
    write_config(config, cfg)
    for extra in ([], ["--overwrite", "--yes"]):
        err = one_line(cli("fit", str(config), *extra), 2)
        assert f"data.train: {corpus} is inside the run's own checkpoints" in err
    assert corpus.read_bytes() == (finished / "corpus.txt").read_bytes()


def test_a_run_inside_its_corpus_folder_is_refused(tmp_path):
    write_corpus(tmp_path / "docs" / "a.txt")
    cfg = tiny_lm_config(tmp_path / "docs" / "run", tmp_path / "docs", name="x", max_steps=1)
    err = one_line(cli("fit", str(write_config(tmp_path / "c.yaml", cfg))), 2)
    assert f"data.train: the corpus folder {tmp_path / 'docs'} holds run.output_dir" in err
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["a.txt"]


def test_an_empty_output_dir_is_refused_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_lm_config(tmp_path / "run", corpus, name="x", max_steps=1)
    cfg["run"]["output_dir"] = ""
    config = write_config(tmp_path / "c.yaml", cfg)
    for command in ("validate", "chunk"):
        err = one_line(cli(command, str(config)), 2)
        assert "run.output_dir: must name a directory (got an empty path)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "corpus.txt"]


# ----------------------------------------------------- 2. what is read stays in the run
def _manifest(directory: Path, names: dict[str, Path]) -> None:
    files = {
        name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for name, p in names.items()
    }
    (directory / "checksums.json").write_text(json.dumps({"format": 2, "files": files}))


@pytest.mark.parametrize("name", ["../outside.bin", "{abs}", "a/../../outside.bin", "./x"])
def test_checksums_names_must_stay_inside_the_checkpoint(tmp_path, name):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    ck = tmp_path / "ck"
    ck.mkdir()
    name = name.format(abs=outside)
    _manifest(ck, {name: outside})  # size and sha256 match what the name leads to
    with pytest.raises(ckpt.CheckpointRejected, match="not a plain relative path"):
        ckpt.verify_manifest(ck, required=())


def test_a_link_inside_a_checkpoint_is_refused_and_resume_falls_back(copy, tmp_path):
    config, run = copy
    newest = run / "checkpoints" / "step-00000008" / "model.safetensors"
    shutil.copy2(newest, tmp_path / "elsewhere.safetensors")
    newest.unlink()
    newest.symlink_to(tmp_path / "elsewhere.safetensors")  # same bytes: checksums would pass
    res = cli("fit", str(config), "--resume", "auto", "--set", "train.max_steps=9")
    assert res.exit_code == 0, res.output
    assert f"skipping {newest}: unreadable checkpoint (a symbolic link" in res.stderr
    # resumed from step 4: step 8 was trained and saved again, over the refused checkpoint
    assert not newest.is_symlink() and ckpt.read_checkpoint(newest.parent).train.step == 8


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("evaluate", "final/model.safetensors"),
        ("evaluate", "final/tokenizer.json"),
        ("evaluate", "final"),
        ("evaluate", "config.resolved.yaml"),
        ("report", "metrics.jsonl"),
    ],
)
def test_what_is_read_from_a_run_never_comes_through_a_link(copy, tmp_path, command, name):
    _, run = copy
    real = tmp_path / "elsewhere"
    os.replace(run / name, real)
    (run / name).symlink_to(real)  # the same bytes: only the link is wrong
    err = one_line(cli(command, str(run), *(["--json"] if command == "report" else [])), 1)
    assert f"{run / name}: " in err and "a symbolic link" in err, err


# ---------------------------------------------- 3. resume never trains on changed data
def test_resume_refuses_an_edited_corpus_until_accepted_and_records_it(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    config, run = lm_setup(tmp_path, corpus), tmp_path / "run"
    assert cli("fit", str(config)).exit_code == 0
    store_meta = (run / "store" / "train" / "meta.json").read_bytes()
    metrics = (run / "metrics.jsonl").read_bytes()
    corpus.write_text(corpus.read_text().replace("the", "a"))  # edited in place
    args = ("fit", str(config), "--resume", "auto", "--set", "train.max_steps=10")
    err = one_line(cli(*args), 2)
    assert "data corpus.train: " in err and " → " in err and "--accept-data-change" in err
    # refused before anything was rebuilt or written
    assert (run / "store" / "train" / "meta.json").read_bytes() == store_meta
    assert (run / "metrics.jsonl").read_bytes() == metrics
    res = cli(*args, "--accept-data-change")
    assert res.exit_code == 0, res.output
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    changed = [e for e in events if e.get("event") == "data_changed"]
    assert len(changed) == 1 and changed[0]["step"] == 8
    assert {"corpus.train", "store.train"} <= set(changed[0]["changes"])
    # the new data is now the run's record: a plain resume goes on
    res = cli("fit", str(config), "--resume", "auto", "--set", "train.max_steps=11")
    assert res.exit_code == 0, res.output


def test_a_store_rebuilt_elsewhere_from_the_same_data_is_the_same_data(copy, tmp_path):
    config, run = copy
    sets = ["train.max_steps=9", f"data.store={tmp_path / 'moved'}", "data.workers=2"]
    res = cli("fit", str(config), "--resume", "auto", *[x for s in sets for x in ("--set", s)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "moved" / "train" / "meta.json").is_file()  # built anew, not reused
    assert "data_changed" not in (run / "metrics.jsonl").read_text()


def _edit_label_names(store: Path, fix_mark: bool) -> None:
    meta_path = store / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["label_names"] = list(reversed(meta["label_names"]))
    text = json.dumps(meta, indent=2)
    meta_path.write_text(text)
    if fix_mark:  # the edit covers its tracks beside the data, not in the run's record
        mark = json.loads((store / ".llmtrain").read_text())
        mark["meta_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        (store / ".llmtrain").write_text(json.dumps(mark))


def test_store_metadata_is_verified_beside_the_data_and_in_the_run(tmp_path):
    root = tmp_path / "clf"
    cfg = classifier_config(root, max_steps=4, save_every=2, eval_every=2)
    config = write_config(root / "config.yaml", cfg)
    assert cli("fit", str(config)).exit_code == 0
    store = root / "run" / "store" / "train"
    original = (store / "meta.json").read_bytes()
    _edit_label_names(store, fix_mark=False)
    err = one_line(cli("chunk", str(config)), 1)
    assert f"{store / 'meta.json'}: checksum mismatch" in err
    (store / "meta.json").write_bytes(original)
    assert cli("chunk", str(config)).exit_code == 0
    _edit_label_names(store, fix_mark=True)
    err = one_line(cli("fit", str(config), "--resume", "auto", "--set", "train.max_steps=5"), 2)
    assert "data store.train: " in err


# ----------------------------------------------------- 4. stale temporaries are swept
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_are_swept_in_the_run_root_and_checkpoints(copy):
    config, run = copy
    dead = _dead_pid()
    stale = [
        run / f".tmp-final-{dead}",
        run / f".tmp-metrics.jsonl-{dead}",
        run / "checkpoints" / f".tmp-step-00000012-{dead}",
    ]
    for p in stale:
        p.mkdir() if "final" in p.name or "step" in p.name else p.write_text("x")
    live = run / ".tmp-final-1"  # pid 1 runs: another process's temporary, left alone
    live.mkdir()
    res = cli("fit", str(config), "--resume", "auto", "--set", "train.max_steps=9")
    assert res.exit_code == 0, res.output
    assert not any(os.path.lexists(p) for p in stale)
    assert live.is_dir()
    assert "removed what a killed run left" in res.stderr
