#!/usr/bin/env python3
"""Benchmark the probe (issue #5's GPU check): probe, brute-force the truth, then train on it.

One invocation, on one device, with one config:

  1. probe   `probe_for_config` (no cache): time, trials, answer — exactly what `fit` and
             `llmtrain probe-batch` run;
  2. truth   brute force with the same trial and pass rule: every m above the answer until
             two in a row fail (peaks grow with m), so truth = the largest passing m; the
             probe's promise is 0.9·truth ≤ answer ≤ truth;
  3. fit     `llmtrain fit` for `--fit-steps` optimizer steps at micro_batch = answer
             (global batch = answer × k), which must finish without an out-of-memory error.

    # the issue's GPU row: GPT-2 124M, seq 1024, bf16 (tokenizer trained on the stand-in corpus)
    python scripts/bench_probe.py configs/gpt2-124m.yaml
    # the same pipeline on CPU with a tiny shape and a memory limit (minutes, not hours)
    python scripts/bench_probe.py configs/gpt2-124m.yaml --tiny

Prints a table (stderr) and one JSON line (stdout). Figures go to docs/benchmarks.md, "probe".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmtrain.commands.probe import render_table
from llmtrain.config import load_config
from llmtrain.data.batching import grad_accum
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.engine.distributed import resolve_device
from llmtrain.engine.model import build_model
from llmtrain.pipeline import fit
from llmtrain.probe.memory import backend_for, fmt_bytes
from llmtrain.probe.plan import memory_limit, probe_for_config, setup_from_config
from llmtrain.probe.result import Trial
from llmtrain.probe.trial import run_trial

TINY = [
    "model.config.n_layer=2",
    "model.config.n_head=2",
    "model.config.n_embd=64",
    "tokenizer.train.vocab_size=2048",
    "data.chunk.seq_len=128",
    "train.precision=fp32",
    "run.device=cpu",
    "batch.probe.memory_limit=700MiB",
    "batch.global_batch=256",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="an llmtrain YAML config (configs/gpt2-124m.yaml)")
    ap.add_argument("--set", action="append", default=[], help="extra KEY=VALUE overrides")
    ap.add_argument("--tiny", action="store_true", help="a tiny CPU shape (see TINY)")
    ap.add_argument("--fit-steps", type=int, default=50)
    ap.add_argument("--out", default=None, help="run directory (default: a temp dir)")
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_probe_"))
    overrides = [*(TINY if args.tiny else []), *args.set, f"run.output_dir={out}"]
    cfg = load_config(args.config, overrides)
    if args.tiny:
        torch.set_num_threads(1)  # shared CPUs: one thread keeps timings and peaks stable
    device = resolve_device(cfg.run.device)

    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer, None).to(device)

    t0 = time.perf_counter()
    result = probe_for_config(cfg, model, device, use_cache=False)
    probe_s = time.perf_counter() - t0
    answer, budget = result.micro_batch, result.budget_bytes

    # brute force above the answer, same measurement and rule
    setup = setup_from_config(cfg, model, device)
    backend = backend_for(device, memory_limit(cfg))
    scan: list[Trial] = []
    m, fails = answer + 1, 0
    t0 = time.perf_counter()
    while fails < 2 and m <= result.max_micro:
        trial = run_trial(setup, backend, m, budget)
        scan.append(trial)
        fails = 0 if trial.ok else fails + 1
        m += 1
    brute_s = time.perf_counter() - t0
    truth = max([answer, *(t.micro_batch for t in scan if t.ok)])
    n_params = sum(p.numel() for p in model.parameters())
    del model, setup
    backend.release(collect=True)

    # train at the answer
    k = grad_accum(cfg.batch.global_batch, answer)
    fit_cfg = load_config(
        args.config,
        [
            *overrides,
            f"batch.micro_batch={answer}",
            f"train.max_steps={args.fit_steps}",
            "train.epochs=null",
            f"optim.warmup_steps={args.fit_steps // 10}",
            "train.eval_every=null",
            f"train.save_every={args.fit_steps}",
            "log.progress=false",
        ],
    )
    t0 = time.perf_counter()
    fit_error = None
    try:
        fit(fit_cfg)
    except Exception as e:  # an OOM here is the finding, not a crash of the benchmark
        fit_error = f"{type(e).__name__}: {e}"[:300]
    fit_s = time.perf_counter() - t0
    ooms = 0
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        ooms = sum(1 for e in events if "oom" in str(e.get("event", "")).lower())

    row = {
        "device": result.device,
        "model": f"{cfg.model.arch} {n_params / 1e6:.1f}M",
        "seq_len": cfg.data.chunk.seq_len,
        "precision": cfg.train.precision,
        "capacity": fmt_bytes(result.capacity_bytes),
        "margin": result.margin,
        "probe_s": round(probe_s, 2),
        "trials": [(t.micro_batch, t.ok) for t in result.trials],
        "answer": answer,
        "truth": truth,
        "ratio": round(answer / truth, 3),
        "brute_trials": len(scan),
        "brute_s": round(brute_s, 2),
        "fit_steps": args.fit_steps,
        "fit_micro": answer,
        "fit_grad_accum": k,
        "fit_s": round(fit_s, 1),
        "fit_error": fit_error,
        "fit_oom_events": ooms,
    }
    print(render_table(result).title, file=sys.stderr)
    for key, value in row.items():
        print(f"{key:>16}: {value}", file=sys.stderr)
    print(json.dumps(row))
    return 0 if fit_error is None and answer <= truth else 1


if __name__ == "__main__":
    sys.exit(main())
