#!/usr/bin/env python3
"""LoRA and QLoRA at scale: `llmtrain fit` against a plain transformers + peft loop.

One invocation saves a Llama-shaped stand-in with save_pretrained (bf16, sharded; 24 x 1536,
vocab 32k, untied head: 0.78B parameters by default; `--small` for a 2-layer model that checks
the script in a minute) and a BPE tokenizer beside it, then runs, each in its own subprocess:

  plain-bf16   the ~20-line loop: from_pretrained(bf16), gradient checkpointing, peft LoRA r 16
               on all linear layers, AdamW, bf16 autocast, random ids
  plain-nf4    the same loop with BitsAndBytesConfig(nf4, double quant, bf16 compute)
  lora-bf16    `llmtrain fit` with the same LoRA (frozen base bf16)
  qlora        `llmtrain fit` with model.quantize nf4
  full-8bit    `llmtrain fit`, every weight trained, optim.name adamw8bit

at each shape of `--shapes` (default seq 16 micro 1, the weight-dominated shape of an 8B run
on a GPU, and seq 512 micro 1). Each child is sampled from outside through /proc/PID/status
(VmRSS and RssAnon, every 20 ms) and its stdout splits its life into phases: `load` until the
model is built (the plain loop prints a marker; llmtrain prints its plan), `train` until the
last step's log line, then `save` (final/). Reported per run: peak VmRSS and RssAnon of each
phase, tokens/s (median of the steps after the first), the weights' bytes by role, and the
ratios against the matching plain loop (lora-bf16 / plain-bf16, qlora / plain-nf4): training
by VmRSS (the plain loop keeps its bf16 weights as mapped file pages, which RssAnon leaves out),
loading by RssAnon.

`--cap-mib N` also finds, for each run, the longest seq_len (a multiple of 256, micro 1) that
loads and trains 2 steps without its VmRSS passing N MiB (the child is killed when it does;
writing final/ afterwards is not capped: it happens on the host, and for QLoRA it holds the
dequantized base).

  python scripts/bench_scale.py --small                  # a quick check that it all runs
  python scripts/bench_scale.py --json-out scale.json    # the benchmark (minutes, ~8 GB RAM)
  python scripts/bench_scale.py --cap-mib 6144           # + the longest seq under 6 GiB

Prints a table (stderr) and one JSON object (stdout; also `--json-out FILE`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SHAPES = {
    "default": {
        "hidden_size": 1536,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "vocab_size": 32000,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 2000,
    },
}
RUNS = ("plain-bf16", "plain-nf4", "lora-bf16", "qlora", "full-8bit")
PLAIN_OF = {"lora-bf16": "plain-bf16", "qlora": "plain-nf4"}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
MARK_TRAIN = "PHASE train"


def say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- the plain loop
def child_plain(args: argparse.Namespace) -> None:
    """The reference: what a transformers + peft tutorial writes (bf16 base, LoRA r 16)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = None
    if args.nf4:
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, quantization_config=q
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    # from_pretrained returns eval mode, where transformers skips gradient checkpointing (it
    # checkpoints only `if self.training`): without this the loop recomputes nothing, a third
    # less compute and more activation memory than the checkpointed run it is compared with
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    print(json.dumps({"weights": weight_roles(model)}), flush=True)
    print(MARK_TRAIN, flush=True)
    vocab = model.get_input_embeddings().weight.shape[0]
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (args.micro, args.seq))
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        print(f"step loss {loss.item():.4f}", flush=True)
    tps = [args.micro * args.seq / t for t in times[1:]] or [args.micro * args.seq / times[0]]
    print(json.dumps({"tokens_per_s": statistics.median(tps)}), flush=True)


def weight_roles(model: Any) -> str:
    """Bytes of the trainable and the frozen weights as stored (4-bit: the packed bytes), in
    the words of llmtrain's plan."""
    roles = {True: 0, False: 0}
    for p in model.parameters():
        roles[p.requires_grad] += p.numel() * p.element_size()
    return f"{roles[True] / 2**20:.1f} MiB trainable + {roles[False] / 2**20:.1f} MiB frozen"


# --------------------------------------------------------------------------- preparation
def make_model(work: Path, shape: dict[str, int]) -> Path:
    """The stand-in (bf16, sharded) and a BPE tokenizer trained on the corpus, side by side."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = work / "model"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    hf = LlamaConfig(max_position_embeddings=32768, tie_word_embeddings=False, **shape)
    with torch.device("cpu"):
        model = LlamaForCausalLM(hf).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="500MB")
    say(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters → {path}")
    del model
    make_tokenizer(work / "corpus.txt", path, shape["vocab_size"])
    return path


def make_corpus(path: Path, words: int) -> Path:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lexicon = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(3000)]
    lines = (" ".join(rng.choices(lexicon, k=40)) + "." for _ in range(words // 40))
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def make_tokenizer(corpus: Path, out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(corpus)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(out)


def fit_config(work: Path, run: str, seq: int, micro: int, steps: int) -> dict[str, Any]:
    model: dict[str, Any] = {"pretrained": str(work / "model"), "gradient_checkpointing": True}
    optim: dict[str, Any] = {"lr": 2e-4, "warmup_steps": 0, "schedule": "constant"}
    if run == "full-8bit":
        optim["name"] = "adamw8bit"  # bitsandbytes' AdamW8bit (issue #18 item 4)
    else:
        model["peft"] = LORA
    if run == "qlora":
        model["quantize"] = {"bits": 4, "type": "nf4", "double_quant": True}
    return {
        "run": {"name": run, "output_dir": str(work / "runs" / f"{run}-{seq}"), "device": "cpu"},
        "model": model,
        "tokenizer": {"path": str(work / "model")},
        "data": {
            "train": {"path": str(work / "corpus.txt")},
            "store": str(work / f"store-{seq}"),
            "chunk": {"seq_len": seq, "mode": "pack"},
        },
        "batch": {"global_batch": micro, "micro_batch": micro},
        "optim": optim,
        "train": {
            "max_steps": steps,
            "precision": "bf16",
            "log_every": 1,
            "save_every": None,
            "eval_every": None,
        },
        "log": {"progress": False},
    }


# ------------------------------------------------------------------------------ sampling
def read_status(pid: int) -> dict[str, int] | None:
    """VmRSS and RssAnon of `pid` in bytes (None once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            found[key] = int(value.split()[0]) * 1024
    return found or None


def sample(cmd: list[str], steps: int, cap: int | None = None) -> dict[str, Any]:
    """Run `cmd`, sample it every 20 ms, split by phase; kill it when VmRSS passes `cap`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    phase: dict[str, Any] = {"now": "load", "lines": [], "steps": 0, "last": steps}
    reader = threading.Thread(target=_read_stdout, args=(proc, phase), daemon=True)
    reader.start()
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    peaks: dict[str, dict[str, int]] = {}
    over = False
    while proc.poll() is None:
        status = read_status(proc.pid)
        if status:
            slot = peaks.setdefault(phase["now"], {"VmRSS": 0, "RssAnon": 0})
            for key, value in status.items():
                slot[key] = max(slot[key], value)
            # the cap stands for the training device's memory: loading and training count,
            # writing final/ (on the host; QLoRA dequantizes the base there) does not
            if cap is not None and phase["now"] != "save" and status.get("VmRSS", 0) > cap:
                over = True
                proc.kill()
        time.sleep(0.02)
    reader.join(timeout=5)
    return {
        "rc": proc.returncode,
        "over_cap": over,
        "peaks": peaks,
        "lines": phase["lines"],
        "stderr_tail": "".join(errors[-5:]).strip(),
    }


def _read_stdout(proc: subprocess.Popen, phase: dict[str, Any]) -> None:
    """Phase switches: the plan (llmtrain) or the marker (plain) → train; the last step → save."""
    for line in proc.stdout:
        phase["lines"].append(line.rstrip("\n"))
        if line.startswith(MARK_TRAIN) or "llmtrain fit" in line:
            phase["now"] = "train"
        elif line.startswith("step "):
            phase["steps"] += 1
            if phase["steps"] >= phase["last"]:
                phase["now"] = "save"


def run_one(
    work: Path, run: str, seq: int, micro: int, steps: int, cap: int | None = None
) -> dict[str, Any]:
    if run.startswith("plain"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--model",
            str(work / "model"),
            "--seq",
            str(seq),
            "--micro",
            str(micro),
            "--steps",
            str(steps),
        ]
        cmd += ["--nf4"] if run == "plain-nf4" else []
        result = sample(cmd, steps, cap)
        found = [json.loads(line) for line in result["lines"] if line.startswith("{")]
        for item in found:
            result.update(item)
        return result
    config = work / f"{run}-{seq}.json"
    config.write_text(json.dumps(fit_config(work, run, seq, micro, steps)))
    chunk = [sys.executable, "-m", "llmtrain", "chunk", str(config)]
    subprocess.run(chunk, capture_output=True, check=False)
    cmd = [sys.executable, "-m", "llmtrain", "fit", str(config), "--overwrite", "--yes"]
    result = sample(cmd, steps, cap)
    result["tokens_per_s"] = fit_tokens_per_s(work / "runs" / f"{run}-{seq}")
    result["weights"] = banner_weights(result["lines"])
    return result


def fit_tokens_per_s(out: Path) -> float | None:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in records if r.get("split") == "train" and "tokens_per_s" in r]
    return statistics.median(tps[1:] or tps) if tps else None


def banner_weights(lines: list[str]) -> str | None:
    """The plan's `weights` row (bytes by role, as llmtrain stores them)."""
    for line in lines:
        if "│ weights" in line:
            return line.split("│")[2].strip()
    return None


# ------------------------------------------------------------------------------- results
def mib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Peaks per phase in MiB, tokens/s, weights; `failed` with the error's last lines."""
    row: dict[str, Any] = {
        "peaks_mib": {ph: {k: mib(v) for k, v in p.items()} for ph, p in result["peaks"].items()},
        "tokens_per_s": result.get("tokens_per_s"),
        "weights": result.get("weights"),
    }
    if result["rc"] != 0:
        row["failed"] = f"rc {result['rc']}: {result['stderr_tail'][-400:]}"
    return row


def peak(row: dict[str, Any], phase: str, key: str) -> float | None:
    return (row["peaks_mib"].get(phase) or {}).get(key)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def compare(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """llmtrain against the matching plain loop: training by VmRSS, loading by RssAnon."""
    out = {}
    for run, plain in PLAIN_OF.items():
        if run in rows and plain in rows:
            a, b = rows[run], rows[plain]
            out[f"{run} / {plain}"] = {
                "train_vmrss": ratio(peak(a, "train", "VmRSS"), peak(b, "train", "VmRSS")),
                "load_rssanon": ratio(peak(a, "load", "RssAnon"), peak(b, "load", "RssAnon")),
                "tokens_per_s": ratio(a["tokens_per_s"], b["tokens_per_s"]),
            }
    return out


def longest_under(work: Path, run: str, cap: int, top: int) -> dict[str, Any]:
    """The longest multiple of 256 that trains 2 steps under `cap`: doubling, then bisection."""
    fits = lambda seq: run_one(work, run, seq, 1, 2, cap)["rc"] == 0  # noqa: E731
    lo, hi = 0, 256
    while hi <= top and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, top + 256)
    while hi - lo > 256:
        mid = (lo + hi) // 512 * 256
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"longest_seq": lo or None, "cap_mib": mib(cap), "searched_up_to": top}


def print_table(shapes: dict[str, dict[str, dict[str, Any]]]) -> None:
    say(
        f"{'shape':<12}{'run':<12}{'load RssAnon':>13}{'train VmRSS':>12}{'train Anon':>11}"
        f"{'tok/s':>9}  weights"
    )
    for shape, rows in shapes.items():
        for run, row in rows.items():
            if "failed" in row:
                say(f"{shape:<12}{run:<12}  FAILED {row['failed'].splitlines()[-1][:80]}")
                continue
            cells = [
                peak(row, "load", "RssAnon"),
                peak(row, "train", "VmRSS"),
                peak(row, "train", "RssAnon"),
            ]
            tps = row["tokens_per_s"]
            say(
                f"{shape:<12}{run:<12}"
                + "".join(f"{c or 0:>12.0f} " for c in cells)
                + f"{tps or 0:>8.0f}  {row['weights']}"
            )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a 2-layer model: checks the script")
    ap.add_argument("--shapes", default="16x1,512x1", help="seq x micro, comma-separated")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"a subset of {','.join(RUNS)}")
    ap.add_argument("--cap-mib", type=int, default=None, help="also: longest seq under this")
    ap.add_argument("--cap-top", type=int, default=16384, help="longest seq tried with --cap-mib")
    ap.add_argument("--work", default=None, help="working directory (default: a temp dir)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--nf4", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main() -> None:
    args = parse()
    if args.child:
        return child_plain(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES["small" if args.small else "default"]
    top = args.cap_top if args.cap_mib else 512
    make_corpus(work / "corpus.txt", words=max(200_000, 4 * top * args.steps))
    make_model(work, shape)
    runs = [r for r in args.runs.split(",") if r]
    report: dict[str, Any] = {"model": shape, "steps": args.steps, "shapes": {}, "ratios": {}}
    for spec in args.shapes.split(","):
        seq, micro = (int(x) for x in spec.split("x"))
        rows = {}
        for run in runs:
            say(f"{run} seq {seq} micro {micro} ...")
            rows[run] = summarize(run_one(work, run, seq, micro, args.steps))
        report["shapes"][spec] = rows
        report["ratios"][spec] = compare(rows)
    if args.cap_mib:
        cap = args.cap_mib * 2**20
        report["longest"] = {run: longest_under(work, run, cap, args.cap_top) for run in runs}
    print_table(report["shapes"])
    say(json.dumps(report["ratios"], indent=1))
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return None


if __name__ == "__main__":
    main()
