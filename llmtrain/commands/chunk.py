"""`llmtrain chunk`: build or reuse the token stores, then report them as a table or JSON.

Only rendering lives here; the work is `llmtrain.data.store_cache.ensure_stores`. Nothing on
this path imports torch or transformers at module level (a test holds it to that).
"""

from __future__ import annotations

import json
from typing import Any

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
    if as_json:
        payload = {
            "splits": report.splits,
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
    out.print(summary_table(report))


def _verified_text(report: ChunkReport) -> str:
    """'full (sha256 of every file)' or 'sampled (...)': which check a reuse passed."""
    how = {
        "full": "full (sha256 of every file)",
        "sampled": "sampled (sizes + 64 blocks per file; data.store_verify: full checks all)",
    }
    return ", ".join(how.get(mode, mode) for mode in str(report.verified).split(","))


def summary_table(report: ChunkReport) -> Any:
    """A rich table: one row per split with counts, pad/dropped shares and length percentiles."""
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in COLUMNS:
        t.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    for name, s in report.splits.items():
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
