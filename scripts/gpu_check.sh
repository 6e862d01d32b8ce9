#!/usr/bin/env bash
# One-shot GPU check (at most ~8 minutes on one H100/H200). Writes one JSON file and prints a
# summary:
#   1. the CUDA tests                       pytest -m cuda
#   2. probe-batch of configs/gpt2-124m.yaml (bf16, SDPA; the micro-batch fit then reuses)
#   3. 30 steps of configs/gpt2-124m.yaml in bf16 with SDPA, torch.compile and fused AdamW:
#      tokens/s and MFU = 6 · N · tokens/s / the chip's peak bf16 FLOP/s (llmtrain/engine/flops.py
#      table: H100 SXM and H200 989e12, A100 312e12, L4 121e12 ...; else --peak-flops)
#   4. scripts/bench_memory.py on CUDA with train.loss_chunk off and on (auto)
#   5. scripts/gpu_scale.py: a Llama-3.1-8B-shaped model (random bf16 weights saved on the
#      device, no download) with LoRA and QLoRA at seq 2048 and 4096, micro 2: llmtrain fit
#      against the plain transformers + peft loop in the same run, peak GiB and tokens/s (vs
#      torchtune's 16.2 / 7.4 GiB), and the longest sequence under 24 GiB
#
# The GPU machine reaches no package registry: bitsandbytes (and the pure-python packages its
# image lacks or has older) travel as wheels. Prepare them once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 peft==0.21.2 \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# and start the run with (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site scripts/gpu_check.sh --out $OUT/check
# Without bitsandbytes the QLoRA rows record the ImportError; the rest still runs.
#
#   scripts/gpu_check.sh [--out DIR] [--peak-flops F]
#   scripts/gpu_check.sh --scale [--out DIR]   # step 5 alone: the 8B run (under 10 minutes)
#   scripts/gpu_check.sh --dry-run [--scale]   # the CPU-safe parts here: tiny shapes, CPU
#
# Every step runs under its own time limit; a failed step is recorded in the JSON (and the exit
# status is 1) but does not stop the others.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="runs/gpu-check"
PEAK=""
DRY=0
SCALE_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --scale) SCALE_ONLY=1 ;;
    --out) OUT="$2"; shift ;;
    --peak-flops) PEAK="$2"; shift ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RESULTS="$OUT/steps"
rm -rf "$RESULTS" "$OUT/fit"
mkdir -p "$RESULTS"
FAILED=0

# step NAME LIMIT_S COMMAND...: run it, keep its output and exit status for the summary
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.out" 2>"$RESULTS/$name.err"
  local rc=$?
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >"$RESULTS/$name.status"
  if [[ $rc -ne 0 ]]; then
    FAILED=1
    echo "   $name failed (exit $rc); last lines:" >&2
    tail -n 5 "$RESULTS/$name.err" >&2
  fi
}

# A corpus large enough for 30 steps of 512 × 1024 tokens' worth of windows: the stand-in text
# repeated (the check measures speed and memory, not what the model learns).
CORPUS="$OUT/corpus.txt"
if [[ $DRY -eq 1 ]]; then
  cp configs/data/tinyshakespeare.txt "$CORPUS"
else
  for _ in 1 2 3 4 5 6 7 8; do cat configs/data/tinyshakespeare.txt; done >"$CORPUS"
fi

SETS=(--set "run.output_dir=$OUT/fit" --set "data.train.path=$CORPUS")
if [[ $DRY -eq 1 ]]; then
  DEVICE=cpu
  SETS+=(--set run.device=cpu --set "model.config={n_layer: 2, n_head: 2, n_embd: 64, n_positions: 128}"
         --set data.chunk.seq_len=128 --set tokenizer.train.vocab_size=512
         --set batch.global_batch=8 --set batch.probe.memory_limit=3GiB --set batch.probe.max_micro=8)
  STEPS=3
  COMPILE=false
  PEAK="${PEAK:-1e11}"  # a CPU has no table entry: any number exercises the MFU path
  BENCH=(--device cpu --tiny --seqs 64 --loss-chunk off auto --max-verify 0)
  BENCH_LIMIT=420  # four child processes; each imports torch and transformers (slow on a busy CPU)
  SCALE=(--dry-run)
  SCALE_LIMIT=400
  PYTEST=(-m cuda -p no:cacheprovider)
  PYTEST_LIMIT=150
else
  DEVICE=cuda
  STEPS=30
  COMPILE=true
  BENCH=(--device cuda --loss-chunk off auto --steps 3 --max-verify 2)
  BENCH_LIMIT=300
  # saving the 16 GB model ~1-2 min, then four children (each loads it from the page cache)
  SCALE=(--child-limit 120 --steps 3)
  SCALE_LIMIT=560
  PYTEST=(-m cuda -p no:cacheprovider -x)
  PYTEST_LIMIT=240  # includes one torch.compile of a tiny model
fi
[[ -n "$PEAK" ]] && SETS+=(--set "run.peak_flops=$PEAK")

if [[ $SCALE_ONLY -eq 0 ]]; then
step pytest "$PYTEST_LIMIT" "$PY" -m pytest "${PYTEST[@]}"
step probe 150 "$PY" -m llmtrain probe-batch configs/gpt2-124m.yaml "${SETS[@]}" --json
step fit 300 "$PY" -m llmtrain fit configs/gpt2-124m.yaml "${SETS[@]}" \
  --set "train.max_steps=$STEPS" --set "model.compile=$COMPILE" --set optim.warmup_steps=2 \
  --set train.eval_every=null --set train.save_every=null --set train.log_every=1 \
  --set train.eval_max_batches=2 --set model.attn_implementation=sdpa --set train.precision=bf16
step bench_memory "$BENCH_LIMIT" "$PY" scripts/bench_memory.py "${BENCH[@]}" --json-out "$RESULTS/bench_memory.json"
fi
step gpu_scale "$SCALE_LIMIT" "$PY" scripts/gpu_scale.py "${SCALE[@]}" --out "$OUT/scale" \
  --json-out "$RESULTS/gpu_scale.json"

"$PY" - "$OUT" "$DEVICE" "$DRY" "$PEAK" <<'EOF'
"""Collect the steps into <out>/gpu_check.json and print the summary."""
import json
import statistics
import sys
from pathlib import Path

out, device, dry, peak_arg = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]
steps = out / "steps"


def status(name):
    path = steps / f"{name}.status"
    return json.loads(path.read_text()) if path.is_file() else {"rc": None}


def last_json(path):
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("{")] if path.is_file() else []
    return json.loads(lines[-1]) if lines else None


report = {"device": device, "dry_run": dry, "steps": {n: status(n) for n in ("pytest", "probe", "fit", "bench_memory", "gpu_scale")}}
tail = (steps / "pytest.out").read_text().strip().splitlines() if (steps / "pytest.out").is_file() else []
report["pytest"] = tail[-1] if tail else None
probe = last_json(steps / "probe.out")
if probe:
    report["probe"] = {k: probe.get(k) for k in ("micro_batch", "grad_accum", "seq_len", "device", "peak_bytes", "capacity_bytes", "capped_by")}
    report["probe"]["trials"] = [(t["micro_batch"], t["ok"]) for t in probe.get("trials", [])]
metrics = out / "fit" / "metrics.jsonl"
if metrics.is_file():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtrain.engine.flops import flops_per_token, table_peak

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    steady = train[len(train) // 3 :] or train  # the first third: compilation and warm-up
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfu_logged = statistics.median([r["mfu"] for r in steady if "mfu" in r] or [float("nan")])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "fit" / "final"))
    per_token = flops_per_token(model)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = float(peak_arg) if peak_arg else table_peak(gpu)
    report["fit"] = {
        "gpu": gpu,
        "steps": len(train),
        "micro_batch": train[-1]["micro_batch"],
        "grad_accum": train[-1]["grad_accum"],
        "parameters": int(per_token / 6),
        "tokens_per_s": tps,
        "peak_flops": peak,
        "mfu": tps * per_token / peak if peak else None,
        "mfu_logged": mfu_logged,  # median of the train records' own mfu (nan: none logged)
        "last_loss": train[-1]["loss"],
    }
bench = steps / "bench_memory.json"
if bench.is_file():
    b = json.loads(bench.read_text())
    report["bench_memory"] = {
        "rows": [
            {
                "seq": r["seq"],
                **{f"{t} peak_ratio": r.get(f"{t} peak_ratio") for t in b["tools"][1:]},
                **{f"{t} speed_ratio": r.get(f"{t} speed_ratio") for t in b["tools"][1:]},
            }
            for r in b["rows"]
        ],
        "longest": b["longest"],
        "file": str(bench),
    }
scale = steps / "gpu_scale.json"
if scale.is_file():
    report["gpu_scale"] = json.loads(scale.read_text())
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
print(f"gpu_check ({'dry run, ' if dry else ''}{device}): {out / 'gpu_check.json'}")
for name, st in report["steps"].items():
    print(f"  {name:<13} exit {st.get('rc')}  {st.get('seconds', '-')}s")
if report.get("pytest"):
    print(f"  cuda tests:   {report['pytest']}")
if "probe" in report:
    p = report["probe"]
    print(f"  probe:        micro {p['micro_batch']} × k {p['grad_accum']} at seq {p['seq_len']} ({len(p['trials'])} trials)")
if "fit" in report:
    f = report["fit"]
    mfu = f"{100 * f['mfu']:.1f}%" if f["mfu"] is not None else "- (no peak for this device; --peak-flops)"
    logged = f"{100 * f['mfu_logged']:.1f}%" if f["mfu_logged"] == f["mfu_logged"] else "- (none logged)"
    print(f"  fit:          {f['tokens_per_s']:,.0f} tokens/s, MFU {mfu} ({f['parameters'] / 1e6:.1f}M params, micro {f['micro_batch']} × k {f['grad_accum']}, {f['gpu']})")
    print(f"  fit MFU logged by llmtrain (median of steady train records): {logged}")
for row in report.get("bench_memory", {}).get("rows", []):
    print(f"  bench seq {row['seq']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "seq" and v))
for tool, r in report.get("gpu_scale", {}).get("tools", {}).items():
    first = next((v for k, v in r.items() if k.isdigit()), None)
    if first:
        print(f"  {tool:<15} {first['peak_gib']:.1f} GiB, {first['tokens_per_s']:,.0f} tokens/s, longest under cap {r.get('longest_seq_under_cap')}")
    else:
        print(f"  {tool:<15} {r.get('skipped') or r.get('error', '')[:200]}")
EOF
[[ $? -ne 0 ]] && FAILED=1
exit $FAILED
