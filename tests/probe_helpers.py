"""Small models, a trial setup and a probe config shared by the probe tests."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
)

from llmtrain import probe as P
from llmtrain.config import Config
from llmtrain.engine.step import StepSpec
from llmtrain.probe.memory import CpuMemory

CPU = torch.device("cpu")


def gpt2(n_layer=2, n_embd=64, vocab=1024, n_positions=128, dropout=0.0) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=2,
        vocab_size=vocab,
        n_positions=n_positions,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(cfg)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def make_setup(model, *, task="causal-lm", precision="fp32", loss_chunk=None, **kw) -> P.TrialSetup:
    spec = StepSpec(task, "tokens", precision, grad_clip=1.0, loss_chunk=loss_chunk)
    return P.TrialSetup(model=model, make_optimizer=adamw, device=CPU, spec=spec, **kw)


def run_probe(setup, limit, cap=256, margin=0.1):
    return P.probe_micro_batch(
        setup, CpuMemory(limit), global_batch=cap, margin=margin, max_micro=cap
    )


def probe_config(tmp_path, **batch) -> Config:
    return Config.model_validate(
        {
            "run": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
            "model": {"arch": "gpt2", "config": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
            "tokenizer": {"train": {"kind": "bpe", "vocab_size": 300, "min_frequency": 1}},
            "data": {"train": {"path": str(tmp_path / "corpus.txt")}, "chunk": {"seq_len": 32}},
            "batch": {"global_batch": 64, "micro_batch": "auto", **batch},
            "train": {"max_steps": 2, "precision": "fp32"},
        }
    )
