#!/usr/bin/env python3
"""The 8B job on one GPU (issue #18 item 9): LoRA and QLoRA of a Llama-3.1-8B-shaped model.

One invocation, in this order, each run in its own subprocess so that its peak is its own:
  1. a Llama-3.1-8B-shaped model (32 × 4096, GQA 8, vocab 128,256) with random weights,
     saved once in bf16 with save_pretrained under --out (no download; reused if present);
  2. plain:lora    a plain transformers + peft loop: base loaded in bf16, LoRA r 16 on every
                   linear layer, gradient checkpointing, AdamW over the adapters;
     plain:qlora   the same over a bitsandbytes nf4 base (BitsAndBytesConfig, double quant,
                   bf16 compute; peft's prepare_model_for_kbit_training);
     llmtrain:lora  `llmtrain fit` with model.peft (the same LoRA), bf16, checkpointing;
     llmtrain:qlora the same with model.quantize: {bits: 4, type: nf4} (recorded as skipped
                   when this llmtrain does not know the key);
  each at --seq (2048) and micro 2 (torchtune's published shape), then at 2·seq: peak GiB
  (torch.cuda.max_memory_reserved and _allocated) and tokens/s over the steps after the first;
  3. the longest sequence under --cap (24 GiB) per tool: the line through its two peaks.

torchtune's README reports 16.2 GiB (LoRA) and 7.4 GiB (QLoRA) for Llama-3.1-8B on an RTX 4090
at this shape; both are printed beside the figures. Writes one JSON file (--json-out).

    python scripts/gpu_scale.py --out /tmp/scale --json-out $OUT/gpu_scale.json   # on a GPU
    python scripts/gpu_scale.py --dry-run --out /tmp/scale-dry    # CPU: tiny shape, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
TORCHTUNE_GIB = {"lora": 16.2, "qlora": 7.4}
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128_256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY = {
    **LLAMA_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOOLS = ("plain:lora", "plain:qlora", "llmtrain:lora", "llmtrain:qlora")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def save_model(path: Path, shape: dict[str, Any], device: str) -> None:
    """Random bf16 weights, initialised on the device (fast) and saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, torch_dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    gc.collect()


# ------------------------------------------------------------------------------ the children
def peaks(device: Any) -> dict[str, Any]:
    import torch

    if device.type != "cuda":
        import resource

        return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return {
        "peak_gib": torch.cuda.max_memory_reserved(device) / GiB,
        "allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
    }


def plain_model(args: argparse.Namespace, quantized: bool) -> Any:
    """The tutorial way: from_pretrained in bf16 (or nf4), then peft's LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": {"": args.device}}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    model.config.use_cache = False
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def child_plain(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = torch.device(args.device)
    model = plain_model(args, args.child.endswith("qlora"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    result: dict[str, Any] = {}
    for seq in args.seqs:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            ids = torch.randint(0, args.vocab, (args.micro, seq), generator=gen).to(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        steady = times[1:] or times
        result[str(seq)] = {
            "tokens_per_s": args.micro * seq / statistics.median(steady),
            **peaks(device),
        }
    return result


def llmtrain_config(args: argparse.Namespace, seq: int, out: Path) -> dict[str, Any]:
    model: dict[str, Any] = {
        "pretrained": args.model,
        "gradient_checkpointing": True,
        "peft": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
    }
    if args.child.endswith("qlora"):
        model["quantize"] = {"bits": 4, "type": "nf4", "double_quant": True}
    return {
        "run": {"name": "scale", "output_dir": str(out), "device": args.device},
        "model": model,
        "tokenizer": {"path": args.tokenizer},
        "data": {"train": {"path": args.corpus}, "chunk": {"seq_len": seq, "mode": "pack"}},
        "batch": {"global_batch": args.micro, "micro_batch": args.micro},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"},
        "train": {
            "max_steps": args.steps,
            "precision": "bf16",
            "eval_every": None,
            "save_every": None,
            "log_every": 1,
        },
        "log": {"progress": False},
    }


def child_llmtrain(args: argparse.Namespace) -> dict[str, Any]:
    """`llmtrain fit` in this process, once per seq (the peak reset in between)."""
    import torch
    import yaml

    from llmtrain.cli import app

    device = torch.device(args.device)
    result: dict[str, Any] = {}
    for seq in args.seqs:
        out = Path(args.workdir) / f"{args.child.replace(':', '-')}-{seq}"
        config = out.with_suffix(".yaml")
        config.write_text(yaml.safe_dump(llmtrain_config(args, seq, out)))
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        code = app(["fit", str(config), "--overwrite", "--yes"], standalone_mode=False)
        if code not in (0, None):
            return {"skipped": f"llmtrain fit exited with {code} (see stderr)"}
        records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_s"] for r in records if r.get("split") == "train"]
        result[str(seq)] = {"tokens_per_s": statistics.median(rates[1:] or rates), **peaks(device)}
    return result


# ------------------------------------------------------------------------------ the parent
def longest_under(points: dict[str, Any], cap_gib: float) -> int | None:
    """The longest seq whose peak the line through the two measured (seq, peak) stays under."""
    pts = sorted((int(s), v["peak_gib"]) for s, v in points.items() if "peak_gib" in v)
    if len(pts) < 2 or pts[1][1] <= pts[0][1]:
        return None
    (s0, p0), (s1, p1) = pts[0], pts[-1]
    slope = (p1 - p0) / (s1 - s0)
    return int(s0 + (cap_gib - p0) / slope) // 64 * 64


def spawn(args: argparse.Namespace, tool: str) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        tool,
        "--model",
        args.model,
        "--device",
        args.device,
        "--micro",
        str(args.micro),
        "--steps",
        str(args.steps),
        "--seqs",
        *map(str, args.seqs),
        "--vocab",
        str(args.vocab),
        "--tokenizer",
        args.tokenizer,
        "--corpus",
        args.corpus,
        "--workdir",
        args.workdir,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.child_limit)
    seconds = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {
            "error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}",
            "seconds": seconds,
        }
    result = {**json.loads(lines[-1]), "seconds": seconds}
    if "skipped" in result:  # llmtrain's own one-line reason is the last line of its stderr
        result["skipped"] += ": " + (proc.stderr.strip().splitlines() or [""])[-1][-300:]
    return result


def prepare(args: argparse.Namespace) -> None:
    """The model, a tokenizer for llmtrain (trained on a stand-in corpus: the model's
    vocabulary is 128,256 whatever the tokenizer holds) and that corpus."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.model = str(out / "model")
    args.workdir = str(out / "runs")
    Path(args.workdir).mkdir(exist_ok=True)
    corpus = out / "corpus.txt"
    if not corpus.is_file():
        text = (REPO / "configs" / "data" / "tinyshakespeare.txt").read_text()
        corpus.write_text(text * (1 if args.dry_run else 8))
    args.corpus = str(corpus)
    shape = TINY if args.dry_run else LLAMA_8B
    args.vocab = min(shape["vocab_size"], 32000)
    t0 = time.perf_counter()
    save_model(Path(args.model), shape, args.device)
    say(f"gpu_scale: model ready in {time.perf_counter() - t0:.0f}s at {args.model}")
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        bpe = Tokenizer(models.BPE(unk_token=None))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|eot|>"])
        bpe.train([args.corpus], trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=bpe, eos_token="<|eot|>", pad_token="<|eot|>"
        )
        fast.save_pretrained(tok)
    args.tokenizer = str(tok)


def run_parent(args: argparse.Namespace) -> None:
    prepare(args)
    report: dict[str, Any] = {
        "device": args.device,
        "dry_run": args.dry_run,
        "seqs": args.seqs,
        "micro": args.micro,
        "cap_gib": args.cap,
        "torchtune_gib": TORCHTUNE_GIB,
        "tools": {},
    }
    for tool in args.tools:
        say(f"gpu_scale: {tool} ...")
        r = spawn(args, tool)
        if "error" not in r and "skipped" not in r:
            r["longest_seq_under_cap"] = longest_under(
                {k: v for k, v in r.items() if k.isdigit()}, args.cap
            )
        report["tools"][tool] = r
        say(f"gpu_scale: {tool}: {json.dumps(r)[:400]}")
    first = str(args.seqs[0])
    for kind in ("lora", "qlora"):
        ours, plain = (
            report["tools"].get(f"llmtrain:{kind}", {}),
            report["tools"].get(f"plain:{kind}", {}),
        )
        if first in ours and first in plain:
            report[f"{kind}_vs_plain"] = {
                "peak_ratio": ours[first]["peak_gib"] / plain[first]["peak_gib"],
                "speed_ratio": ours[first]["tokens_per_s"] / plain[first]["tokens_per_s"],
                "vs_torchtune_gib": ours[first]["peak_gib"] - TORCHTUNE_GIB[kind],
            }
    text = json.dumps(report, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu-scale", help="model, tokenizer, runs")
    p.add_argument("--json-out", default=None)
    p.add_argument("--device", default=None, help="cuda (default), cpu with --dry-run")
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="two lengths (2048 4096)")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="per length (the first is warm-up)")
    p.add_argument("--cap", type=float, default=24.0, help="GiB, for the longest sequence")
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    p.add_argument("--child-limit", type=int, default=240, help="seconds per subprocess")
    p.add_argument("--dry-run", action="store_true", help="tiny Llama on CPU: checks the plumbing")
    # the child's side
    p.add_argument("--child", choices=TOOLS, default=None, help=argparse.SUPPRESS)
    for hidden in ("--model", "--tokenizer", "--corpus", "--workdir"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    args.seqs = args.seqs or ([32, 64] if args.dry_run else [2048, 4096])
    if args.dry_run and args.child is None:
        args.steps = min(args.steps, 2)
    return args


def main() -> None:
    args = parse()
    if args.child is None:
        run_parent(args)
        return
    result = child_plain(args) if args.child.startswith("plain") else child_llmtrain(args)
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
