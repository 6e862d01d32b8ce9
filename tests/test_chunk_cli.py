"""`llmtrain chunk` end to end: --json shape, reuse/--force, damaged stores, bad corpora."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chunk_helpers import write_jsonl
from typer.testing import CliRunner

from llmtrain.cli import app

SPLIT_KEYS = {
    "documents",
    "tokens_in",
    "tokens_out",
    "chunks",
    "pad_tokens",
    "dropped_tokens",
    "seq_len",
    "mode",
    "overlap",
    "seconds",
}


def config(tmp_path: Path, tok_dir: Path, **data) -> Path:
    cfg = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"arch": "gpt2", "config": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
        "train": {"max_steps": 1},
        "tokenizer": {"path": str(tok_dir)},
        "data": {
            "train": {"path": str(tmp_path / "train.jsonl")},
            "chunk": {"seq_len": 32},
            **data,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def chunk(*args: str):
    return CliRunner().invoke(app, ["chunk", *args])


def test_json_shape_and_reuse(tmp_path, tok_dir):
    write_jsonl(tmp_path / "train.jsonl", 120)
    cfg = config(tmp_path, tok_dir, eval_fraction=0.25)
    r = chunk(str(cfg), "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert set(out["splits"]) == {"train", "eval"}
    for split in out["splits"].values():
        assert set(split) >= SPLIT_KEYS
        assert split["mode"] == "pack" and split["seq_len"] == 32 and split["overlap"] == 0
        assert split["pad_tokens"] == 0 and split["up_to_date"] is False
        assert split["tokens_out"] + split["dropped_tokens"] == split["tokens_in"]
        assert split["chunks"] * 32 == split["tokens_out"]
    assert out["splits"]["train"]["documents"] + out["splits"]["eval"]["documents"] == 120
    again = json.loads(chunk(str(cfg), "--json").stdout)
    assert again["up_to_date"] and again["splits"]["train"]["up_to_date"] is True
    forced = chunk(str(cfg), "--json", "--force", "--workers", "1")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["up_to_date"] is False


def test_human_table(tmp_path, tok_dir):
    write_jsonl(tmp_path / "train.jsonl", 30)
    cfg = config(tmp_path, tok_dir)
    r = chunk(str(cfg), "--set", "data.chunk.mode=window", "--set", "data.chunk.overlap=8")
    assert r.exit_code == 0, r.stderr
    assert "train" in r.stdout and "tokens" in r.stdout and "built" in r.stdout
    assert (
        "up to date"
        in chunk(
            str(cfg), "--set", "data.chunk.mode=window", "--set", "data.chunk.overlap=8"
        ).stdout
    )


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", r"no documents in .*train\.jsonl"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"train\.jsonl:2: invalid UTF-8"),
        (b'{"text": "ok"}\n{"text": "ok"}\n{"text": \n', r"train\.jsonl:3: not valid JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', r"train\.jsonl:2: missing field 'text'"),
    ],
)
def test_bad_corpus_is_a_clear_error(tmp_path, tok_dir, content, pattern):
    (tmp_path / "train.jsonl").write_bytes(content)
    r = chunk(str(config(tmp_path, tok_dir)))
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    import re

    assert re.search(pattern, r.stderr), r.stderr


def _truncate(store: Path) -> None:
    t = store / "tokens.bin"
    t.write_bytes(t.read_bytes()[:-10])


def _edit_meta(store: Path) -> None:
    (store / ".llmtrain").unlink()  # a store of before marks: only the structural checks
    m = json.loads((store / "meta.json").read_text())
    m["num_tokens"] += 3
    (store / "meta.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (_truncate, r"tokens\.bin: \d+ bytes, meta\.json says \d+"),
        (_edit_meta, r"meta\.json: num_tokens disagrees"),
        (lambda s: (s / "doc_ids.npy").unlink(), r"doc_ids\.npy: missing"),
    ],
)
def test_damaged_store_exit_1(tmp_path, tok_dir, damage, pattern):
    write_jsonl(tmp_path / "train.jsonl", 40)
    cfg = config(tmp_path, tok_dir)
    assert chunk(str(cfg)).exit_code == 0
    damage(tmp_path / "run" / "store" / "train")
    r = chunk(str(cfg))
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "--force" in r.stderr
    import re

    assert re.search(pattern, r.stderr), r.stderr
    assert chunk(str(cfg), "--force").exit_code == 0


def test_real_process_json_and_damage(tmp_path, tok_dir):
    """The installed entry point: one JSON object on stdout; a damaged store is exit 1."""
    write_jsonl(tmp_path / "train.jsonl", 20)
    cfg = config(tmp_path, tok_dir)
    cmd = [sys.executable, "-m", "llmtrain", "chunk", str(cfg)]
    p = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["splits"]["train"]["documents"] == 20
    _truncate(tmp_path / "run" / "store" / "train")
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


def test_chunk_module_imports_neither_torch_nor_transformers():
    code = (
        "import sys, llmtrain.commands.chunk, llmtrain.data.store_cache, llmtrain.data.chunking\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
