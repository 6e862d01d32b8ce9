"""Tiny trained runs for the tests of predict / evaluate / generate / report: a BERT
classifier on window-chunked labelled documents and a GPT-2 on packed text, each trained by
`llmtrain.pipeline.fit` (tokenizer trained, stores built, checkpoints, final/) in a few seconds.

Each run is trained once per test session and shared (read-only) by the test modules.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)  # tiny models; threads only contend on a shared CPU

TOPICS = {
    "sport": ["match", "goal", "team", "player", "coach", "score", "league", "cup"],
    "science": ["atom", "energy", "cell", "experiment", "theory", "particle", "lab", "data"],
    "music": ["song", "album", "band", "guitar", "concert", "melody", "singer", "drum"],
}
FILLER = ["the", "a", "of", "and", "to", "in", "with", "on", "by", "is", "was", "this"]
SENTENCE = "the cat sat on a mat and the dog ran to the red ball while birds sang"

_CACHE: dict[str, Path] = {}


def topic_text(rng: random.Random, topic: str, words: int) -> str:
    vocab = TOPICS[topic]
    return " ".join(
        rng.choice(vocab) if rng.random() < 0.4 else rng.choice(FILLER) for _ in range(words)
    )


def write_topics(path: Path, n: int, seed: int, *, prefix: str) -> Path:
    """n labelled documents of 5-90 words (several need more than one 32-token window)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            topic = list(TOPICS)[i % len(TOPICS)]
            text = topic_text(rng, topic, rng.randint(5, 90))
            f.write(json.dumps({"id": f"{prefix}-{i}", "text": text, "label": topic}) + "\n")
    return path


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return path


def _fit(config: Path) -> None:
    from llmtrain.config import load_config
    from llmtrain.pipeline import fit

    fit(load_config(config))


def classifier_config(root: Path, **train: Any) -> dict[str, Any]:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    return {
        "run": {
            "name": "clf",
            "output_dir": str(root / "run"),
            "seed": 0,
            "device": "cpu",
            "threads": 1,
        },
        "model": {
            "task": "sequence-classification",
            "arch": "bert",
            "config": {
                "num_hidden_layers": 1,
                "hidden_size": 32,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 32,
            },
        },
        "tokenizer": {"train": {"kind": "wordpiece", "vocab_size": 200}},
        "data": {
            "train": {
                "path": str(write_topics(data / "train.jsonl", 24, 0, prefix="tr")),
                "id_field": "id",
            },
            "eval": {
                "path": str(write_topics(data / "eval.jsonl", 12, 1, prefix="ev")),
                "id_field": "id",
            },
            "chunk": {"seq_len": 32, "mode": "window", "overlap": 8},
        },
        "batch": {"global_batch": 8, "micro_batch": 4},
        # tuned to learn part of the task: window and document accuracy differ (0.7 / 0.67)
        "optim": {"lr": 3e-2, "warmup_steps": 3, "schedule": "linear", "weight_decay": 0.01},
        "train": {
            "max_steps": 14,
            "precision": "fp32",
            "loss_normalization": "sequences",
            "eval_every": 5,
            "save_every": 5,
            "log_every": 2,
            **train,
        },
        "log": {"progress": False},
    }


def write_corpus(path: Path, lines: int = 240) -> Path:
    """Paragraphs of a tiny repetitive language (SENTENCE rotated): learnable in a few steps."""
    words = SENTENCE.split(" ")
    text = []
    for i in range(lines):
        start = i % len(words)
        text.append(" ".join(words[start:] + words[:start]) + ".")
        if i % 3 == 2:
            text.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text), encoding="utf-8")
    return path


def tiny_lm_config(
    output_dir: Path, corpus: Path, *, name: str, eval_fraction: float | None = None, **train: Any
) -> dict[str, Any]:
    """A 1-layer GPT-2 with a 128-token BPE on `corpus`, packed at 32 tokens, micro 4 × k 2,
    fp32; `train` gives the train section's keys (max_steps, eval_every, ...)."""
    data: dict[str, Any] = {
        "train": {"path": str(corpus), "split": "paragraphs"},
        "chunk": {"seq_len": 32, "mode": "pack"},
    }
    if eval_fraction is not None:
        data["eval_fraction"] = eval_fraction
    return {
        "run": {
            "name": name,
            "output_dir": str(output_dir),
            "seed": 0,
            "device": "cpu",
            "threads": 1,
        },
        "model": {
            "task": "causal-lm",
            "arch": "gpt2",
            "config": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32},
        },
        "tokenizer": {"train": {"kind": "bpe", "vocab_size": 128}},
        "data": data,
        "batch": {"global_batch": 8, "micro_batch": 4},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "schedule": "cosine"},
        "train": {"precision": "fp32", **train},
        "log": {"progress": False},
    }


def lm_config(root: Path, **train: Any) -> dict[str, Any]:
    corpus = write_corpus(root / "data" / "corpus.txt")
    train = {"max_steps": 6, "eval_every": 3, "save_every": 3, "log_every": 2, **train}
    return tiny_lm_config(root / "run", corpus, name="lm", eval_fraction=0.2, **train)


def trained(kind: str, tmp_path_factory: Any) -> Path:
    """The run directory of the shared `classifier` or `lm` run (trained on first use)."""
    if kind not in _CACHE:
        root = tmp_path_factory.mktemp(f"trained-{kind}")
        cfg = classifier_config(root) if kind == "classifier" else lm_config(root)
        _fit(write_config(root / "config.yaml", cfg))
        _CACHE[kind] = root / "run"
    return _CACHE[kind]


def records(run_dir: Path, split: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def refused_by_validate(config: Path) -> str:
    """`llmtrain validate config` must refuse it (exit 2, no traceback); its output, with
    white space folded, for the message assertions."""
    from typer.testing import CliRunner

    from llmtrain.cli import app

    res = CliRunner().invoke(app, ["validate", str(config)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return " ".join(res.output.split())
