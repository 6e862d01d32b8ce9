"""Shared helpers for the fit tests: an in-memory TokenStore, a stand-in tokenizer, configs.

They keep the exactness tests independent of the tokenizer and chunk stages.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import numpy as np
import torch

from llmtrain.config import Config

# Tiny models gain nothing from intra-op threads, and on a shared CPU OpenMP threads that
# spin against other processes make a step up to 10× slower.
torch.set_num_threads(1)


class FakeStore:
    """The TokenStore reader API over in-memory arrays."""

    def __init__(
        self, seqs: list[np.ndarray], doc_ids=None, labels=None, starts=None, label_names=None
    ):
        self.seqs = [np.asarray(s, dtype=np.int64) for s in seqs]
        self.lengths = np.array([len(s) for s in self.seqs])
        self.doc_ids = np.asarray(doc_ids if doc_ids is not None else range(len(seqs)))
        self.labels = np.asarray(labels if labels is not None else [-1] * len(seqs))
        self._starts = starts or [np.array([0])] * len(seqs)
        self.label_names = label_names

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = int(self.labels[i]) if self.label_names is not None else None
        return {"input_ids": self.seqs[i], "doc_id": int(self.doc_ids[i]), "label": label}

    def doc_starts(self, i: int) -> np.ndarray:
        return np.asarray(self._starts[i])


class FakeTokenizer:
    pad_token_id, eos_token_id, bos_token_id = 0, 1, 1

    def __init__(self, vocab: int = 64):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def save_pretrained(self, path) -> None:
        pass


def random_store(
    n: int,
    *,
    vocab: int = 64,
    lo: int = 3,
    hi: int = 16,
    seed: int = 0,
    n_labels: int | None = None,
) -> FakeStore:
    """Variable-length sequences (ids ≥ 2 so pad/eos never occur inside)."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(2, vocab, size=int(rng.integers(lo, hi + 1))) for _ in range(n)]
    if n_labels is None:
        return FakeStore(seqs)
    labels = rng.integers(0, n_labels, size=n)
    return FakeStore(seqs, labels=labels, label_names=[f"c{i}" for i in range(n_labels)])


GPT2_TINY = {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 64}
BERT_TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 16,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
}
NO_DROPOUT = {
    "gpt2": {
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
    },
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
}


def make_cfg(
    out,
    *,
    arch: str = "gpt2",
    task: str = "causal-lm",
    micro: int = 2,
    global_batch: int = 8,
    steps: int = 3,
    precision: str = "fp64",
    dropout: bool = False,
    **sections: dict,
) -> Config:
    """A config for the fake store (data.train must name some path: the fakes ignore it)."""
    base: dict[str, Any] = {
        "run": {"name": "t", "output_dir": str(out), "seed": 0, "device": "cpu"},
        "model": {
            "task": task,
            "arch": arch,
            "config": GPT2_TINY if arch == "gpt2" else BERT_TINY,
            "config_overrides": {} if dropout else NO_DROPOUT[arch],
        },
        "data": {"train": {"path": str(out)}, "chunk": {"seq_len": 16, "mode": "truncate"}},
        "batch": {"global_batch": global_batch, "micro_batch": micro},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.1},
        "train": {
            "max_steps": steps,
            "precision": precision,
            "eval_every": None,
            "save_every": None,
            "log_every": 1,
        },
        "log": {"progress": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return Config.model_validate(base)


def run_train(cfg: Config, store, eval_store=None, *, resume=None, num_labels=None, mixture=None):
    """build_model + train on CPU; returns (model, result). `mixture`: how an epoch draws
    from `store` (a data.mixture.ConcatStore), as fit passes it for a list of sources."""
    from llmtrain.engine.loop import train
    from llmtrain.engine.model import build_model

    tok = FakeTokenizer()
    model = build_model(cfg, tok, num_labels)
    result = train(
        cfg,
        model,
        tok,
        store,
        eval_store,
        micro_batch=int(cfg.batch.micro_batch),
        device=torch.device("cpu"),
        resume=resume,
        mixture=mixture,
    )
    return model, result


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over all weights, relative to max |a| over all weights.

    Global, not per tensor: some weights have a gradient that is zero in exact arithmetic
    (e.g. BERT's attention key bias: softmax ignores a shift) and sit at ~1e-16 rounding
    noise, where a per-tensor ratio would compare noise with noise.
    """
    keys = [k for k in a if a[k].is_floating_point()]
    diff = max(float((a[k] - b[k]).abs().max()) for k in keys)
    scale = max(float(a[k].abs().max()) for k in keys)
    return diff / scale


def graph_tensors() -> int:
    """Tensors alive in this process that belong to an autograd graph."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(isinstance(o, torch.Tensor) and o.grad_fn is not None for o in gc.get_objects())
