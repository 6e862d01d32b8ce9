"""`llmtrain chunk`: build or reuse the token stores, then report them as a table or JSON.

Only rendering lives here; the work is `llmtrain.data.store_cache.ensure_stores`. Nothing on
this path imports torch or transformers at module level (a test holds it to that).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from llmtrain.config import Config
from llmtrain.console import human_console
from llmtrain.data.encode import set_workers
from llmtrain.data.store_cache import ChunkReport, ensure_stores

COLUMNS = (
    "split",
    "docs",
    "tokens in",
    "tokens out",
    "chunks",
    "pad%",
    "drop%",
    "len p50/p90/max",
    "sec",
)


def execute(cfg: Config, *, force: bool, workers: int | None, as_json: bool) -> None:
    """`llmtrain chunk`: build or reuse the stores, then print a table or one JSON object."""
    # Imported here: loading a tokenizer needs transformers, which importing this must not.
    from llmtrain.data.tokenizer import load_tokenizer

    out = human_console(as_json)
    set_workers(workers if workers is not None else cfg.data.workers)  # before any encode
    tok = load_tokenizer(cfg)
    report = ensure_stores(
        cfg,
        tok,
        force=force,
        workers=workers,
        progress=cfg.log.progress and out.is_terminal,
        console=out,
    )
    splits, sources = by_split(cfg, report)
    if as_json:
        payload = {
            "splits": splits,
            **({"sources": sources} if cfg.data.is_mixture else {}),
            "store": str(report.root),
            "up_to_date": report.up_to_date,
            "verified": report.verified,  # null when built; else full | sampled
            "notes": report.notes,  # also printed on stderr
        }
        print(json.dumps(payload), flush=True)
        return
    state = "built"
    if report.up_to_date:
        state = (
            f"up to date, reused; checksums verified: {_verified_text(report)} (--force rebuilds)"
        )
    out.print(f"token store {report.root}: {state}", highlight=False, soft_wrap=True)
    # Piped output is not squeezed to 80 columns: the table is meant to be read in logs too.
    if not out.is_terminal:
        from rich.console import Console

        out = Console(file=out.file, width=120, no_color=True)
    out.print(summary_table(splits, sources))


def _verified_text(report: ChunkReport) -> str:
    """'full (sha256 of every file)' or 'sampled (...)': which check a reuse passed."""
    how = {
        "full": "full (sha256 of every file)",
        "sampled": "sampled (sizes + 64 blocks per file; data.store_verify: full checks all)",
    }
    return ", ".join(how.get(mode, mode) for mode in str(report.verified).split(","))


# Counts that add up over a mixture's sources; the rest is one value for all (chunk settings).
_SUMMED = (
    "documents",
    "tokens_in",
    "tokens_out",
    "chunks",
    "pad_tokens",
    "dropped_tokens",
    "seconds",
    "skipped_records",
    "conversations_cut",
)


def by_split(cfg: Config, report: ChunkReport) -> tuple[dict[str, dict], dict[str, dict]]:
    """(splits, sources): `splits` has `train` (and `eval`) as always; for a mixture, `train`
    is its sources together (lengths over all their chunks) and `sources` each one's own."""
    parts = cfg.data.train_parts
    if not cfg.data.is_mixture:
        return report.splits, {}
    sources = {p.name or p.store: report.splits[p.store] for p in parts}
    lengths = np.concatenate([report.stores[p.store].lengths for p in parts])
    total = combined(list(sources.values()), lengths)
    splits = {"train": total, **{k: v for k, v in report.splits.items() if k == "eval"}}
    return splits, sources


def combined(stats: list[dict[str, Any]], lengths: np.ndarray) -> dict[str, Any]:
    """One split's statistics from its parts': counts summed, shares and length percentiles
    recomputed over the whole (`lengths`: every chunk's)."""
    out = {**stats[0]}
    for key in _SUMMED:
        if key in out:
            out[key] = sum(s[key] for s in stats)
    out["seconds"] = round(out["seconds"], 3)
    out["skipped_entries"] = [e for s in stats for e in s.get("skipped_entries", [])]
    out["pad_pct"] = round(100.0 * out["pad_tokens"] / max(1, out["chunks"] * out["seq_len"]), 3)
    out["dropped_pct"] = round(100.0 * out["dropped_tokens"] / max(1, out["tokens_in"]), 3)
    sized = lengths if len(lengths) else np.zeros(1)
    for name, q in (("length_p50", 50), ("length_p90", 90)):
        out[name] = int(np.percentile(sized, q))
    out["length_max"] = int(sized.max())
    rate = out["tokens_in"] / out["seconds"] if out["seconds"] else None
    out["tokens_per_s"] = round(rate) if rate else None
    return out


def summary_table(splits: dict[str, dict], sources: dict[str, dict] | None = None) -> Any:
    """A rich table: one row per split with counts, pad/dropped shares and length percentiles;
    a mixture's sources under `train`, one row each."""
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in COLUMNS:
        t.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    rows = [(name, s) for name, s in splits.items() if name == "train"]
    rows += [(f"  {name}", s) for name, s in (sources or {}).items()]
    rows += [(name, s) for name, s in splits.items() if name != "train"]
    for name, s in rows:
        t.add_row(
            name,
            f"{s['documents']:,}",
            f"{s['tokens_in']:,}",
            f"{s['tokens_out']:,}",
            f"{s['chunks']:,}",
            f"{s['pad_pct']:.1f}",
            f"{s['dropped_pct']:.2f}",
            f"{s['length_p50']}/{s['length_p90']}/{s['length_max']}",
            f"{s['seconds']:.1f}",
        )
    return t
