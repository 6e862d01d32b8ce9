"""Read back what the trackers wrote, offline: W&B's offline run files and an MLflow file
store.

wandb 0.31 has no Python reader of its offline `.wandb` files any more (the datastore moved to
its Go core), so `wandb_records` parses the format: a 7-byte header (`:W&B`, magic 0xBEE1,
version), then LevelDB-log style records in 32 KiB blocks — 4-byte checksum, 2-byte length,
1-byte type (1 full, 2 first, 3 middle, 4 last) — each a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def wandb_records(path: Path) -> list[Any]:
    """Every protobuf Record of one offline run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_runs(wandb_dir: Path) -> list[Path]:
    """The offline run files under a W&B dir, oldest first (a resume adds one, same id)."""
    return sorted(wandb_dir.glob("offline-run-*/run-*.wandb"))


def wandb_history(path: Path) -> list[dict[str, Any]]:
    """The history rows (one per step) of an offline run file."""
    rows = []
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in r.history.item
                }
            )
    return rows


def wandb_run_info(path: Path) -> tuple[str, dict[str, Any]]:
    """(run id, config) of an offline run file."""
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "run":
            config = {i.key: json.loads(i.value_json) for i in r.run.config.update}
            return r.run.run_id, config
    raise AssertionError(f"{path}: no run record")


def wandb_files(path: Path) -> list[str]:
    """The files the run saved (run.save)."""
    return [
        f.path
        for r in wandb_records(path)
        if r.WhichOneof("record_type") == "files"
        for f in r.files.files
    ]


def wandb_merged(paths: list[Path]) -> list[dict[str, Any]]:
    """The history a W&B reader sees of a run resumed across `paths` (oldest first): W&B
    keeps one row per step, a row logged at the current step adds to it, and a step below the
    current one is ignored ("steps must be monotonically increasing"). This is W&B's
    documented rule for a resumed run, applied here to the offline files; `wandb sync` to a
    server is not exercised offline."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        for row in wandb_history(path):
            if rows and row["_step"] == rows[-1]["_step"]:
                rows[-1].update(row)
            elif not rows or row["_step"] > rows[-1]["_step"]:
                rows.append(dict(row))
    return rows


def by_step(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` over history rows that hold it."""
    return [(int(r["_step"]), r[key]) for r in rows if key in r]
