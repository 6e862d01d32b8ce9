"""`llmtrain chunk` never imports torch (the largest fixed cost of a chunk process, which the
bare tokenizer never pays), while the model checks that need no torch still fire."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chunk_helpers import write_jsonl

from llmtrain.config import load_config
from llmtrain.errors import ConfigError

# Runs the CLI in one fresh process (jsonl, Parquet, a reuse), then reports on stderr whether
# torch was imported; a fresh process, because this test process has torch already.
PROBE = """
import json, sys
from llmtrain.cli import app
codes = []
for args in sys.argv[1:]:
    try:
        app(json.loads(args))
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def _config(tmp_path: Path, tok_dir: Path, corpus: Path, name: str, **model) -> Path:
    cfg = {
        "run": {"output_dir": str(tmp_path / name)},
        "model": model or {"arch": "gpt2", "config": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
        "train": {"max_steps": 1},
        "tokenizer": {"path": str(tok_dir)},
        "data": {"train": {"path": str(corpus)}, "eval_fraction": 0.2, "chunk": {"seq_len": 32}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_chunk_never_imports_torch(tmp_path, tok_dir):
    jsonl = write_jsonl(tmp_path / "train.jsonl", 40)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    runs = [
        ["chunk", str(_config(tmp_path, tok_dir, jsonl, "j")), "--json"],
        ["chunk", str(_config(tmp_path, tok_dir, tmp_path / "train.parquet", "p")), "--json"],
        ["chunk", str(tmp_path / "p.yaml")],  # reuse: the checksum path
    ]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(json.dumps, runs)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0], "torch": False}, proc.stderr
    assert (tmp_path / "p" / "store").is_dir() and "up to date" in proc.stdout


def _pretrained(tmp_path: Path, positions: int) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    values = {"model_type": "roberta", "max_position_embeddings": positions, "num_hidden_layers": 1}
    (d / "config.json").write_text(json.dumps(values))
    return d


@pytest.mark.parametrize("check_model", [True, "light"])
def test_position_limits_fire_without_the_model_checks(tmp_path, tok_dir, check_model):
    """A pretrained config.json's limit (with roberta's padding offset) and one written under
    model.config are checked at chunk's validation (check_model="light") as at fit's."""
    corpus = write_jsonl(tmp_path / "train.jsonl", 4)
    model = {"pretrained": str(_pretrained(tmp_path, 32))}
    with pytest.raises(ConfigError, match=r"32 is above .* max_position_embeddings=32 \(minus 2"):
        load_config(_config(tmp_path, tok_dir, corpus, "a", **model), check_model=check_model)
    written = {"arch": "gpt2", "config": {"n_layer": 1, "n_positions": 16}}
    with pytest.raises(ConfigError, match="32 is above the model's position limit n_positions=16"):
        load_config(_config(tmp_path, tok_dir, corpus, "b", **written), check_model=check_model)
    depthless = {"arch": "gpt2", "config": {"n_layer": 0}}
    with pytest.raises(ConfigError, match="n_layer: must be at least 1"):
        load_config(_config(tmp_path, tok_dir, corpus, "c", **depthless), check_model=check_model)


def test_what_needs_the_class_waits_for_fit_and_validate(tmp_path, tok_dir):
    """GPT-2's default 1024 positions and the size bound come from transformers' class (torch):
    chunk builds the store, fit and validate refuse."""
    corpus = write_jsonl(tmp_path / "train.jsonl", 4)
    cfg = _config(tmp_path, tok_dir, corpus, "d")
    big = ["data.chunk.seq_len=2048", "model.config.n_embd=1000000"]
    assert load_config(cfg, big, check_model="light").data.chunk.seq_len == 2048
    with pytest.raises(ConfigError) as e:
        load_config(cfg, big)
    text = "\n".join(e.value.messages)
    assert "position limit n_positions=1024" in text and "builds a model of" in text


def test_a_trained_runs_config_skips_the_model_checks(tmp_path, tok_dir):
    """check_model=False (how predict / evaluate / generate read a run's config) checks no
    model, so a base model directory moved after training is no error there; chunk's "light"
    validation names it."""
    corpus = write_jsonl(tmp_path / "train.jsonl", 4)
    cfg = _config(tmp_path, tok_dir, corpus, "e", pretrained=str(tmp_path / "moved"))
    assert load_config(cfg, check_model=False).model.pretrained == str(tmp_path / "moved")
    with pytest.raises(ConfigError, match=r"model\.pretrained: no such directory"):
        load_config(cfg, check_model="light")
