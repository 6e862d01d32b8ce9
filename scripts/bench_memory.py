#!/usr/bin/env python3
"""Memory at real scale: `llmtrain fit` against a plain transformers step, same model and batch.

One invocation trains a Llama shape with a 128k vocabulary (2 layers × 256, vocab 128,256,
micro-batch 4, fp32 — where the logits are the largest tensor of the step) two ways, each run
in its own subprocess so that its peak is its own:

  llmtrain  `llmtrain fit` (the CLI, in the child process) on a generated config: pack mode,
            global batch = micro-batch (k 1), once per `--loss-chunk` value (default auto;
            `--loss-chunk auto off` also shows the plain-logits path: tools llmtrain:auto,
            llmtrain:off)
  plain     `model(input_ids, labels=ids).loss.backward()` + `torch.optim.AdamW.step()`, the
            step of a transformers tutorial, on random ids of the same shape

at each `--seqs` length, and prints peak memory, tokens/s and their ratios. Peak = the
child's own peak RSS (getrusage maxrss at exit: the whole process's life) on CPU,
`torch.cuda.max_memory_reserved` on CUDA. Tokens/s = the median over the steps after the first
(llmtrain: its own metrics.jsonl `tokens_per_s`).

Then the longest sequence (at the same micro-batch) whose peak fits under `--limit` (default
6 GiB, what `batch.probe.memory_limit: 6GiB` gives the probe): a line through each tool's two
measured peaks predicts it, and runs at the predicted length (in steps of `--seq-step`) confirm
it from both sides — on CPU for the plain step only unless `--verify-longest`, because a
llmtrain step at ~20k tokens × 4 takes minutes on a small CPU; its fitting at the longest
measured length is then the measured lower bound.

A run whose predicted peak exceeds 80% of MemAvailable is not started (reported as such), so
the benchmark never pushes a shared machine into swap or the OOM killer.

    python scripts/bench_memory.py                          # CPU, seqs 1024 4096, 6 GiB
    python scripts/bench_memory.py --device cuda --loss-chunk off   # the same on a GPU
    python scripts/bench_memory.py --tiny                   # seconds: the CPU-safe smoke run
    python scripts/bench_memory.py --lce                    # the loss head alone: ours vs torch

`--lce` compares the output projection + cross-entropy alone on the same shape's head
(hidden 256 × vocab 128,256; tokens = micro × each seq), each variant in its own subprocess:
`ours` (llmtrain.engine.loss.linear_cross_entropy, chunk = `loss_chunk: auto`), `torch`
(torch 2.13's F.linear_cross_entropy with LinearCrossEntropyOptions(batch_chunk_size=the same
chunk)), `torch-auto` (its own chunking heuristic) and `plain` (F.linear then F.cross_entropy).
Peak = the child's VmHWM minus its VmHWM once the inputs exist (CPU), or
max_memory_allocated minus the inputs (CUDA); tokens/s over the steps after the first; and, in
the parent, fp64 exactness of the loss and of the gradients of hidden, weight and bias against
`plain` (max |a − b| / max |b|).

Prints a table (stderr) and one JSON object (stdout; also `--json-out FILE`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SELF = str(Path(__file__).resolve())
CORPUS = REPO / "configs" / "data" / "tinyshakespeare.txt"
GiB = 2**30

# The shape. intermediate 4 × hidden; head_dim 64. Untied, as Llama 3.
SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 128_256,
    "tie_word_embeddings": False,
}
TINY = {**SHAPE, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 8192}


def say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the children
def model_config(shape: dict[str, Any], seq: int) -> dict[str, Any]:
    return {**shape, "max_position_embeddings": max(seq, 128)}


def child_plain(args: argparse.Namespace) -> dict[str, Any]:
    """The plain step: a transformers model's own loss, backward, AdamW."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(**model_config(json.loads(args.shape), args.seq), use_cache=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, args.token_range, (args.micro, args.seq), generator=gen).to(device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times
    return {"tokens_per_s": args.micro * args.seq / statistics.median(steady), **cuda_peaks(device)}


def child_llmtrain(args: argparse.Namespace) -> dict[str, Any]:
    """`llmtrain fit CONFIG`, exactly as the command line runs it, in this process."""
    import torch

    from llmtrain.cli import app

    code = app(["fit", args.config], standalone_mode=False)  # click returns typer.Exit's code
    if code not in (0, None):
        raise SystemExit(f"llmtrain fit exited with {code}")
    out = Path(json.loads(Path(args.config).with_suffix(".json").read_text())["output_dir"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r.get("split") == "train"]
    steady = rates[1:] or rates
    return {"tokens_per_s": statistics.median(steady), **cuda_peaks(torch.device(args.device))}


def cuda_peaks(device: Any) -> dict[str, Any]:
    import torch

    if device.type != "cuda":
        return {}
    return {
        "cuda_reserved": torch.cuda.max_memory_reserved(device),
        "cuda_allocated": torch.cuda.max_memory_allocated(device),
        "gpu": torch.cuda.get_device_name(device),
    }


# ------------------------------------------------------------------ --lce: the loss head alone
LCE_VARIANTS = ("ours", "torch", "torch-auto", "plain")


def lce_fn(variant: str, chunk: int):
    """loss(hidden, weight, bias, targets), summed over tokens, for one variant."""
    import torch
    import torch.nn.functional as F

    from llmtrain.engine.loss import linear_cross_entropy

    if variant == "ours":
        return lambda h, w, b, t: linear_cross_entropy(h, w, b, t, chunk=chunk, own=True)
    if variant == "plain":
        return lambda h, w, b, t: F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    opts = (
        torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, chunking_method=None)
        if variant == "torch"
        else torch.nn.LinearCrossEntropyOptions()
    )
    return lambda h, w, b, t: F.linear_cross_entropy(
        h, w, t, linear_bias=b, reduction="sum", options=opts
    )


def lce_inputs(tokens: int, hidden: int, vocab: int, dtype: Any, device: Any, bias: bool):
    import torch

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen, dtype=dtype).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen, dtype=dtype) * hidden**-0.5).to(device)
    b = torch.randn(vocab, generator=gen, dtype=dtype).to(device) if bias else None
    t = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    return h, w, b, t


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_lce(args: argparse.Namespace) -> dict[str, Any]:
    """One variant's forward + backward, `args.steps` times, on the head's shape."""
    import torch

    from llmtrain.engine.loss import auto_chunk

    shape, device = json.loads(args.shape), torch.device(args.device)
    vocab = shape["vocab_size"]
    h, w, b, t = lce_inputs(
        args.micro * args.seq, shape["hidden_size"], vocab, torch.float32, device, bias=False
    )
    fn = lce_fn(args.child.split(":", 1)[1], auto_chunk(vocab))
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else vm_hwm()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        fn(h, w, b, t).backward()
        h.grad = w.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else vm_hwm()
    return {"tokens_per_s": h.shape[0] / statistics.median(steady), "loss_peak_bytes": peak - base}


def lce_exactness(tokens: int = 96, hidden: int = 32, vocab: int = 1000) -> dict[str, Any]:
    """fp64: each variant's loss and gradients against `plain` (relative max difference)."""
    import torch

    out: dict[str, Any] = {}
    grads: dict[str, tuple] = {}
    for variant in LCE_VARIANTS[::-1]:  # plain first: the reference
        h, w, b, t = lce_inputs(tokens, hidden, vocab, torch.float64, torch.device("cpu"), True)
        loss = lce_fn(variant, 16)(h, w, b, t)
        grads[variant] = (loss.detach(), *torch.autograd.grad(loss, (h, w, b)))
        ref = grads["plain"]
        diffs = [
            float((a - r).abs().max() / r.abs().max())
            for a, r in zip(grads[variant], ref, strict=True)
        ]
        out[variant] = dict(zip(("loss", "hidden", "weight", "bias"), diffs, strict=True))
    return out


def run_lce(args: argparse.Namespace) -> None:
    """The --lce mode's parent: exactness here, each variant's peak and speed in a child."""
    bench = Bench(args, Path(tempfile.gettempdir()))
    result: dict[str, Any] = {"fp64_rel_diff_vs_plain": lce_exactness(), "runs": []}
    for seq in sorted(args.seqs):
        for variant in LCE_VARIANTS:
            argv = [
                "--child",
                f"lce:{variant}",
                "--seq",
                str(seq),
                "--micro",
                str(args.micro),
                "--steps",
                str(args.steps),
                "--shape",
                args.shape,
                "--device",
                args.device,
            ]
            child, maxrss, seconds = bench.spawn(argv)
            result["runs"].append(
                {
                    "variant": variant,
                    "tokens": args.micro * seq,
                    **child,
                    "maxrss_bytes": maxrss,
                    "seconds": round(seconds, 2),
                }
            )
            say(
                f"lce {variant:>10} tokens {args.micro * seq:>6}: loss peak "
                f"{child['loss_peak_bytes'] / 2**20:8.1f} MiB, {child['tokens_per_s']:,.0f} tok/s"
            )
    for variant, d in result["fp64_rel_diff_vs_plain"].items():
        say(f"lce {variant:>10} fp64 vs plain: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
    text = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)


# ------------------------------------------------------------------------------ the parent
@dataclass
class Run:
    tool: str  # plain | llmtrain:<loss_chunk>
    seq: int
    peak_bytes: int | None = None
    tokens_per_s: float | None = None
    seconds: float = 0.0
    skipped: str | None = None  # why it was not run
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    args: argparse.Namespace
    root: Path
    tools: list[str] = field(default_factory=list)  # "plain" first, then llmtrain:<chunk>
    tokenizer: str = ""
    runs: list[Run] = field(default_factory=list)

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(self.args.threads)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    def spawn(self, argv: list[str]) -> tuple[dict[str, Any], int, float]:
        """Run a child; (its JSON result, its peak RSS in bytes, wall seconds)."""
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, SELF, *argv],
            env=self.child_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"child {argv[:4]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return result, int(result.pop("maxrss_kb")) * 1024, time.perf_counter() - t0

    def config(self, seq: int, tag: str) -> Path:
        a = self.args
        out = self.root / f"{tag.replace(':', '-')}-{seq}"
        cfg = {
            "run": {"name": f"bench-{tag}", "output_dir": str(out), "device": a.device},
            "model": {
                "task": "causal-lm",
                "arch": "llama",
                "config": model_config(json.loads(a.shape), seq),
                "attn_implementation": "sdpa",
            },
            "tokenizer": {"path": self.tokenizer},
            "data": {
                "train": {"path": str(CORPUS), "split": "paragraphs"},
                "chunk": {"seq_len": seq, "mode": "pack"},
            },
            "batch": {"global_batch": a.micro, "micro_batch": a.micro},
            "optim": {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"},
            "train": {
                "max_steps": a.steps,
                "precision": "fp32",
                "eval_every": None,
                "save_every": None,
                "log_every": 1,
                "loss_chunk": tag.split(":")[1],
            },
            "log": {"progress": False},
        }
        path = out.with_suffix(".yaml")
        path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        path.with_suffix(".json").write_text(json.dumps({"output_dir": str(out)}))
        return path

    def measure(self, tool: str, seq: int, predicted: float | None = None) -> Run:
        """One child at one length (not started when its predicted peak cannot fit here)."""
        a = self.args
        run = Run(tool, seq)
        room = available_bytes()
        if a.device == "cpu" and predicted is not None and predicted > 0.8 * room:
            run.skipped = f"needs ≈{predicted / GiB:.1f} GiB (predicted), {room / GiB:.1f} free"
            self.runs.append(run)
            say(f"  {tool:>12} seq {seq:>6}: not run, {run.skipped}")
            return run
        common = ["--device", a.device, "--seq", str(seq), "--micro", str(a.micro)]
        if tool == "plain":
            argv = ["--child", "plain", *common, "--steps", str(a.steps), "--shape", a.shape]
            argv += ["--token-range", str(a.token_range)]
        else:
            argv = ["--child", "llmtrain", *common, "--config", str(self.config(seq, tool))]
        result, rss, run.seconds = self.spawn(argv)
        run.tokens_per_s = result.pop("tokens_per_s")
        run.peak_bytes = int(result["cuda_reserved"]) if a.device == "cuda" else rss
        run.extra = {"peak_rss": rss, **result}
        self.runs.append(run)
        say(
            f"  {tool:>12} seq {seq:>6}: peak {run.peak_bytes / GiB:6.2f} GiB  "
            f"{run.tokens_per_s:9,.0f} tok/s  ({run.seconds:.0f}s)"
        )
        return run

    def peaks(self, tool: str) -> dict[int, int]:
        return {r.seq: r.peak_bytes for r in self.runs if r.tool == tool and r.peak_bytes}


def available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def line_through(peaks: dict[int, int]) -> tuple[float, float] | None:
    """(intercept, bytes per token of seq) through the shortest and longest measured runs."""
    if len(peaks) < 2:
        return None
    (s0, p0), (s1, p1) = min(peaks.items()), max(peaks.items())
    slope = (p1 - p0) / (s1 - s0)
    return (p0 - slope * s0, slope) if slope > 0 else None


def predict_peak(peaks: dict[int, int], seq: int) -> float | None:
    """The line's peak at `seq`; with one measured run, that run's peak scaled by the length
    (an overestimate: the weights do not grow), so a run too large for the machine is caught."""
    line = line_through(peaks)
    if line is not None:
        return line[0] + line[1] * seq
    if peaks:
        s0, p0 = next(iter(peaks.items()))
        return p0 * max(1.0, seq / s0)
    return None


def predicted_longest(peaks: dict[int, int], limit: int) -> int | None:
    line = line_through(peaks)
    return int((limit - line[0]) / line[1]) if line else None


def longest(bench: Bench, tool: str, verify: bool) -> dict[str, Any]:
    """The longest seq (multiple of --seq-step) whose peak fits under --limit: predicted from
    the line, then bracketed by measured runs (`fits` passes, `fails` does not)."""
    limit, step = bench.args.limit, bench.args.seq_step
    peaks = bench.peaks(tool)
    predicted = predicted_longest(peaks, limit)
    fits = max((s for s, p in peaks.items() if p <= limit), default=None)
    fails = min((s for s, p in peaks.items() if p > limit), default=None)
    for _ in range(bench.args.max_verify if verify and predicted else 0):
        lo, hi = fits or 0, fails or math.inf
        if hi - lo <= step:
            break
        guess = predicted if fits is None or fails is None else (lo + hi) / 2
        cand = int(min(max(guess // step * step, lo + step), hi - step))
        run = bench.measure(tool, cand, predict_peak(bench.peaks(tool), cand))
        if run.peak_bytes is None:
            break
        if run.peak_bytes <= limit:
            fits = max(fits or 0, cand)
        else:
            fails = min(fails or cand, cand)
        predicted = predicted_longest(bench.peaks(tool), limit) or predicted
    return {"predicted": predicted, "fits": fits, "fails": fails}


def prepare_tokenizer(bench: Bench) -> None:
    """One BPE for every run, trained once here on the stand-in corpus. The ids only have to
    be valid: the model's vocabulary is 128,256 whatever the tokenizer holds."""
    from llmtrain.config import Config
    from llmtrain.data.tokenizer import load_tokenizer

    cfg = Config.model_validate(
        {
            "run": {"output_dir": str(bench.root / "tok")},
            "model": {"arch": "llama"},
            "tokenizer": {"train": {"kind": "bpe", "vocab_size": bench.args.token_range}},
            "data": {"train": {"path": str(CORPUS), "split": "paragraphs"}},
        }
    )
    load_tokenizer(cfg)
    bench.tokenizer = str(bench.root / "tok" / "tokenizer")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summary(bench: Bench, longest_of: dict[str, dict[str, Any]]) -> dict[str, Any]:
    a = bench.args
    rows = []
    for seq in a.seqs:
        by = {r.tool: r for r in bench.runs if r.seq == seq}
        plain = by.get("plain")
        row: dict[str, Any] = {"seq": seq, "plain": asdict(plain) if plain else None}
        for tool in bench.tools[1:]:
            mine = by.get(tool)
            row[tool] = asdict(mine) if mine else None
            row[f"{tool} peak_ratio"] = ratio(mine and mine.peak_bytes, plain and plain.peak_bytes)
            row[f"{tool} speed_ratio"] = ratio(
                mine and mine.tokens_per_s, plain and plain.tokens_per_s
            )
        rows.append(row)
    fits_plain = longest_of["plain"]["fits"]
    return {
        "device": a.device,
        "shape": json.loads(a.shape),
        "micro_batch": a.micro,
        "steps": a.steps,
        "threads": a.threads,
        "limit_bytes": a.limit,
        "tools": bench.tools,
        "rows": rows,
        "longest": longest_of,
        "longest_ratio_measured": {
            t: ratio(longest_of[t]["fits"], fits_plain) for t in bench.tools[1:]
        },
        "runs": [asdict(r) for r in bench.runs],
    }


def _cell(run: dict | None) -> str:
    if not run or not run.get("peak_bytes"):
        return "not run"
    return f"{run['peak_bytes'] / GiB:.2f}GiB {run['tokens_per_s']:,.0f}/s"


def print_table(s: dict[str, Any]) -> None:
    """Per seq: each tool's peak and tokens/s, and each llmtrain's ratios to the plain step."""
    say("")
    for row in s["rows"]:
        say(f"seq {row['seq']}: plain {_cell(row['plain'])}")
        for tool in s["tools"][1:]:
            pr, sr = row[f"{tool} peak_ratio"], row[f"{tool} speed_ratio"]
            ratios = f"peak {pr:.2f}x, speed {sr:.2f}x of plain" if pr and sr else "-"
            say(f"    {tool}: {_cell(row[tool])}  ({ratios})")
    limit = s["limit_bytes"] / GiB
    for tool, lg in s["longest"].items():
        say(
            f"longest seq under {limit:g} GiB, {tool}: fits {lg['fits']}, fails {lg['fails']}, "
            f"predicted {lg['predicted']}"
        )


def run_parent(args: argparse.Namespace) -> None:
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        bench = Bench(args, Path(tmp), tools=["plain", *(f"llmtrain:{c}" for c in args.loss_chunk)])
        prepare_tokenizer(bench)
        say(
            f"bench_memory: {args.device}, micro {args.micro}, tools {bench.tools}, "
            f"threads {args.threads}, load {load0[0]:.1f}"
        )
        bench.measure("plain", min(args.seqs) // 2)  # a second point for the plain step's line
        for seq in sorted(args.seqs):
            for tool in bench.tools:
                bench.measure(tool, seq, predict_peak(bench.peaks(tool), seq))
        # confirming a chunked llmtrain's longest on CPU would take many minutes (see above)
        cheap = {t: args.device == "cuda" or not t.endswith(":auto") for t in bench.tools}
        longest_of = {t: longest(bench, t, cheap[t] or args.verify_longest) for t in bench.tools}
        s = summary(bench, longest_of)
    s["load_before_after"] = [load0[0], os.getloadavg()[0]]
    print_table(s)
    text = json.dumps(s)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (first: warm-up)")
    p.add_argument("--limit", type=float, default=6.0, help="GiB, for the longest sequence")
    p.add_argument("--seq-step", type=int, default=64)
    p.add_argument("--max-verify", type=int, default=4, help="runs to confirm a longest seq")
    p.add_argument("--verify-longest", action="store_true", help="confirm llmtrain's on CPU too")
    p.add_argument(
        "--loss-chunk", nargs="+", default=["auto"], help="llmtrain's train.loss_chunk values"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tiny", action="store_true", help="small shapes: a smoke run in seconds")
    p.add_argument("--json-out", default=None)
    p.add_argument("--lce", action="store_true", help="the loss head alone: ours, torch's, plain")
    # the child's side
    children = ["plain", "llmtrain", *(f"lce:{v}" for v in LCE_VARIANTS)]
    p.add_argument("--child", choices=children, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--token-range", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shape is None:
        args.shape = json.dumps(TINY if args.tiny else SHAPE)
    if args.tiny and args.child is None:  # smaller defaults; what was given explicitly stays
        for key, small in (("seqs", [64, 128]), ("micro", 2), ("steps", 2), ("seq_step", 32)):
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, small)
        args.limit = min(args.limit, 0.6)
        args.max_verify = min(args.max_verify, 1)
    args.limit = int(args.limit * GiB) if args.child is None else args.limit
    return args


def main() -> None:
    args = parse()
    if args.child is None:
        run_lce(args) if args.lce else run_parent(args)
        return
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child.startswith("lce:"):
        result = child_lce(args)
    else:
        result = child_plain(args) if args.child == "plain" else child_llmtrain(args)
    # the child's own peak resident memory (Linux: kB), over its whole life
    result["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
