"""A reused token store is verified, and a killed build leaves nothing behind (issue 12, items
4 and 9): edited data is an error in `chunk` and `fit`, never "up to date"; the output says
which check ran (full or sampled); `kill -9` during `chunk` leaves no `.tmp-*` for good."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from chunk_helpers import write_jsonl
from typer.testing import CliRunner

from llmtrain.cli import app
from llmtrain.data import store as store_module
from llmtrain.data.store import SAMPLE_BLOCK, SAMPLE_BLOCKS, TokenStore, TokenStoreWriter
from llmtrain.errors import LLMTrainError

runner = CliRunner()


def config(tmp_path: Path, tok_dir: Path, **data) -> Path:
    cfg = {
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
        "model": {"arch": "gpt2", "config": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
        "tokenizer": {"path": str(tok_dir)},
        "data": {
            "train": {"path": str(tmp_path / "train.jsonl")},
            "chunk": {"seq_len": 32},
            **data,
        },
        "batch": {"global_batch": 4, "micro_batch": 2},
        "train": {"max_steps": 1, "precision": "fp32"},
        "log": {"progress": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    return path


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place: same size, so only a checksum can tell."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_edited_store_is_not_up_to_date(tmp_path, tok_dir):
    write_jsonl(tmp_path / "train.jsonl", 60)
    cfg = config(tmp_path, tok_dir)
    assert runner.invoke(app, ["chunk", str(cfg)]).exit_code == 0
    reused = runner.invoke(app, ["chunk", str(cfg), "--json"])
    out = json.loads(reused.stdout)
    assert out["up_to_date"] and out["verified"] == "full"
    assert out["splits"]["train"]["verified"] == "full"
    human = runner.invoke(app, ["chunk", str(cfg)], terminal_width=200)
    assert "up to date, reused; checksums verified: full (sha256 of every file)" in human.stdout
    tokens = tmp_path / "run" / "store" / "train" / "tokens.bin"
    flip_byte(tokens, tokens.stat().st_size // 2)
    r = runner.invoke(app, ["chunk", str(cfg)])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert f"{tokens}: checksum mismatch (sha256 of the whole file" in r.stderr
    assert "--force" in r.stderr
    # fit reuses through the same path: it refuses to train on the edited data.
    fit = runner.invoke(app, ["fit", str(cfg)])
    assert fit.exit_code == 1 and "checksum mismatch" in fit.stderr, fit.output
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert runner.invoke(app, ["chunk", str(cfg), "--force"]).exit_code == 0


def test_large_store_uses_the_sampled_check_and_says_so(tmp_path, tok_dir, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", 60)
    cfg = config(tmp_path, tok_dir)
    assert runner.invoke(app, ["chunk", str(cfg)]).exit_code == 0
    monkeypatch.setattr(store_module, "FULL_VERIFY_MAX_BYTES", 0)  # every store is "large"
    out = json.loads(runner.invoke(app, ["chunk", str(cfg), "--json"]).stdout)
    assert out["verified"] == "sampled"
    human = runner.invoke(app, ["chunk", str(cfg)], terminal_width=200)
    assert "checksums verified: sampled (sizes + 64 blocks per file" in human.stdout
    full = runner.invoke(app, ["chunk", str(cfg), "--json", "--set", "data.store_verify=full"])
    assert json.loads(full.stdout)["verified"] == "full"
    flip_byte(tmp_path / "run" / "store" / "train" / "index.npy", 200)
    r = runner.invoke(app, ["chunk", str(cfg)])
    assert r.exit_code == 1 and "index.npy: checksum mismatch (sampled blocks" in r.stderr


def big_store(path: Path) -> Path:
    """A store whose tokens.bin (5 MiB) is larger than the sampled blocks together (4 MiB)."""
    w = TokenStoreWriter(path, vocab_size=1000)
    n, seq = 5 << 19, 512  # 2.6M uint16 tokens
    tokens = np.arange(n, dtype=np.int64) % 1000
    w.append(tokens, [seq] * (n // seq), np.arange(n // seq), [-1] * (n // seq))
    w.close()
    return path / "tokens.bin"


def test_sampled_check_reads_spread_blocks_and_full_reads_everything(tmp_path):
    tokens = big_store(tmp_path / "st")
    size = tokens.stat().st_size
    assert size > SAMPLE_BLOCKS * SAMPLE_BLOCK
    assert TokenStore.open(tmp_path / "st", verify="sampled").verified == "sampled"
    # Between two sampled blocks: the sampled check cannot see it (documented), full does.
    gap = (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
    flip_byte(tokens, SAMPLE_BLOCK + (gap - SAMPLE_BLOCK) // 2)
    TokenStore.open(tmp_path / "st", verify="sampled")
    with pytest.raises(LLMTrainError, match=r"tokens\.bin: checksum mismatch \(sha256"):
        TokenStore.open(tmp_path / "st", verify="auto")  # 5 MiB is below the auto threshold
    # Inside a sampled block (the last one ends the file): caught.
    flip_byte(tokens, size - 1)
    with pytest.raises(LLMTrainError, match=r"tokens\.bin: checksum mismatch \(sampled"):
        TokenStore.open(tmp_path / "st", verify="sampled")


def test_store_without_sampled_checksums_is_verified_in_full(tmp_path):
    tokens = big_store(tmp_path / "st")
    meta_path = tmp_path / "st" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for entry in meta["files"].values():
        del entry["sample_sha256"]  # as written before the sampled checksums existed
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "st" / ".llmtrain").unlink()  # nor a mark: both came later
    assert TokenStore.open(tmp_path / "st", verify="sampled").verified == "full"
    flip_byte(tokens, 12345)
    with pytest.raises(LLMTrainError, match="checksum mismatch"):
        TokenStore.open(tmp_path / "st", verify="sampled")


# A `chunk --force` that stops, deterministically, once its store writer is open: reading the
# corpus never returns. The test then kills it with SIGKILL, as a scheduler or the OOM killer
# would; nothing of llmtrain runs after that.
HANG = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import llmtrain.data.encode as encode

    ready = Path(sys.argv[1])

    def hang(*args, **kwargs):
        ready.write_text("writing")
        time.sleep(600)
        yield from ()

    encode.iter_documents = hang
    from llmtrain.cli import main
    sys.argv = ["llmtrain", "chunk", sys.argv[2], "--force"]
    main()
    """
)


def test_kill_9_during_chunk_leaves_no_temporary_directory(tmp_path, tok_dir):
    write_jsonl(tmp_path / "train.jsonl", 40)
    cfg = config(tmp_path, tok_dir)
    assert runner.invoke(app, ["chunk", str(cfg)]).exit_code == 0
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", HANG, str(ready), str(cfg)])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the chunk process never started writing"
        root = tmp_path / "run" / "store"
        temp = root / f".tmp-train-{child.pid}"
        assert temp.is_dir()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert temp.is_dir()  # kill -9 ran no cleanup
    r = runner.invoke(app, ["chunk", str(cfg)])
    assert r.exit_code == 0, r.output
    assert not [p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".llmtrain"]
    assert "up to date" in r.stdout  # the old store survived the killed rebuild
    assert f"removed what a killed build left in {root}: .tmp-train-{child.pid}" in r.stdout
