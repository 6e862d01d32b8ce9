#!/usr/bin/env python3
"""What checksums and pickle-free loading cost a checkpoint, against the previous format.

In one invocation, on a model of `--mparams` million fp32 parameters with AdamW state:

  llmtrain  `save_checkpoint` (safetensors + weights-only .pt + checksums.json, fsync,
            rename) and `read_checkpoint` + `apply_checkpoint` (sha256 of every file, then
            weights_only loads)
  baseline  the same files written the way the previous format did (save_model +
            torch.save, through the same atomic_dir), read with torch.load(weights_only=False)
            and load_model: no hashing

Each is timed `--repeat` times (best kept); the page cache is warm for both, as it is right
after a save. The ratio is llmtrain / baseline.

  python scripts/bench_checkpoint.py [--mparams 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from llmtrain.engine import checkpoint as ckpt
from llmtrain.util.atomic import atomic_dir


def make(mparams: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 1024
    layers = max(1, round(mparams * 1e6 / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mparams", type=float, default=50.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, optimizer = make(args.mparams)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    root = Path(tempfile.mkdtemp())
    state = ckpt.TrainState(step=1, micro_batch=1)

    def save_new() -> None:
        ckpt.save_checkpoint(
            root / "new", 1, model=model, optimizer=optimizer, train_state=state,
            parts={"scaler": scaler, "rng": ckpt.RngState()}, keep=1,
        )  # fmt: skip

    def save_old() -> None:
        with atomic_dir(root / "old" / "step-00000001") as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({**state.to_dict(), "rng": torch.get_rng_state()}, tmp / "state.pt")

    def load_new() -> None:
        found = ckpt.read_checkpoint(ckpt.checkpoint_path(root / "new", 1))
        ckpt.apply_checkpoint(
            found,
            model=model,
            optimizer=optimizer,
            parts={"scaler": scaler, "rng": ckpt.RngState()},
            device=torch.device("cpu"),
        )

    def load_old() -> None:
        path = root / "old" / "step-00000001"
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        torch.load(path / "state.pt", weights_only=False)
        load_model(model, str(path / "model.safetensors"))

    rows = []
    for what, new, old in (("save", save_new, save_old), ("load", load_new, load_old)):
        t_new, t_old = best(new, args.repeat), best(old, args.repeat)
        rows.append((what, t_new, t_old))
    size = sum(p.stat().st_size for p in (root / "new").rglob("*") if p.is_file())
    print(f"checkpoint: {args.mparams:g}M parameters, {size / 2**20:.0f} MiB on disk")
    for what, t_new, t_old in rows:
        print(
            f"{what}: llmtrain {t_new:.2f} s, baseline {t_old:.2f} s, ratio {t_new / t_old:.2f}×"
            f" ({size / 2**20 / t_new:.0f} MiB/s)"
        )


if __name__ == "__main__":
    main()
