"""The token-store cache: build the stores of a config once, reuse them while nothing changed.

A fingerprint (`stores_fingerprint`) hashes everything that decides the stores' bytes: the
corpora, the reader settings, the tokenizer and the chunk settings. `ensure_stores` reuses the
stores under `store_root(cfg)` when every split carries that fingerprint, and rebuilds them
otherwise (docs/architecture.md, "Token store"). A store that matches but is damaged is an
error, never a silent rebuild.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain.config import Config
from llmtrain.data.chunk_spec import resolve_spec
from llmtrain.data.chunking import ChunkSpec
from llmtrain.data.corpus import corpus_fingerprint
from llmtrain.data.encode import build_stores, set_workers
from llmtrain.data.store import FORMAT_VERSION, TokenStore
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import remove_stale_temps

if TYPE_CHECKING:  # transformers is only needed by the caller that loads the tokenizer
    from rich.console import Console
    from transformers import PreTrainedTokenizerFast


@dataclass
class ChunkReport:
    """What `ensure_stores` built or reused: the open stores and per-split statistics."""

    stores: dict[str, TokenStore]
    splits: dict[str, dict[str, Any]]
    up_to_date: bool = False
    root: Path = field(default_factory=Path)


def store_root(cfg: Config) -> Path:
    """Where the stores live: data.store, or <run.output_dir>/store; splits are subfolders."""
    return Path(cfg.data.store) if cfg.data.store else Path(cfg.run.output_dir) / "store"


def _splits(cfg: Config) -> list[str]:
    return ["train", "eval"] if (cfg.data.eval is not None or cfg.data.eval_fraction) else ["train"]


def stores_fingerprint(cfg: Config, tok_fp: str) -> str:
    """Everything that decides the stores' bytes: corpora, reader settings, tokenizer, chunking.

    The chunk settings that only act at training time (aggregate, cross_doc_attention) are left
    out, so changing them reuses the stores.
    """
    d = cfg.data
    chunk = d.chunk.model_dump(exclude={"aggregate", "cross_doc_attention"})
    payload = {
        "format_version": FORMAT_VERSION,
        "task": cfg.model.task,
        "train": corpus_fingerprint(d.train, key="data.train"),
        "eval": corpus_fingerprint(d.eval, key="data.eval") if d.eval is not None else None,
        "eval_fraction": d.eval_fraction if d.eval is None else None,
        "tokenizer": tok_fp,
        "chunk": chunk,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _reusable(root: Path, names: list[str], fp: str) -> dict[str, TokenStore] | None:
    """The existing stores if every split matches `fp`; None when any is absent or stale.

    A store that exists but is damaged (truncated, edited, missing a file) raises: rebuilding it
    silently would hide the damage, and `--force` is there to replace it on purpose.
    """
    stores = {}
    for name in names:
        path = root / name
        if not path.exists():
            return None
        meta_path = path / "meta.json"
        try:
            meta_fp = json.loads(meta_path.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            meta_fp = fp  # unreadable: let open() report it precisely
        if meta_fp != fp:
            return None
        try:
            stores[name] = TokenStore.open(path)
        except LLMTrainError as e:
            raise LLMTrainError(f"{e} (or run `llmtrain chunk --force` to rebuild)") from None
    return stores


def _store_meta(cfg: Config, spec: ChunkSpec, fp: str, tok_fp: str) -> dict[str, Any]:
    """What every split's meta.json records about how it was made."""
    return {
        "fingerprint": fp,
        "tokenizer_fingerprint": tok_fp,
        "task": cfg.model.task,
        "chunk": {**cfg.data.chunk.model_dump(), "min_tail": spec.min_tail},
        "eos_id": spec.eos_id,
        "special_prefix": list(spec.prefix),
        "special_suffix": list(spec.suffix),
    }


def ensure_stores(
    cfg: Config,
    tokenizer: PreTrainedTokenizerFast,
    *,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> ChunkReport:
    """Build the train (and eval) TokenStores unless up-to-date ones exist; open and return them."""
    # Imported here: llmtrain.data.tokenizer imports transformers, which the chunk path avoids.
    from llmtrain.data.tokenizer import tokenizer_fingerprint

    set_workers(workers if workers is not None else cfg.data.workers)
    spec = resolve_spec(cfg, tokenizer)
    root = store_root(cfg)
    names = _splits(cfg)
    tok_fp = tokenizer_fingerprint(tokenizer)
    fp = stores_fingerprint(cfg, tok_fp)
    if not force:
        stores = _reusable(root, names, fp)
        if stores is not None:
            splits = {n: {**s.meta.get("stats", {}), "up_to_date": True} for n, s in stores.items()}
            return ChunkReport(stores, splits, up_to_date=True, root=root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)  # what a killed `chunk` left; this process has none open yet
    if "eval" not in names and (root / "eval").exists():
        shutil.rmtree(root / "eval")  # a stale eval store from an earlier config would mislead
    meta = _store_meta(cfg, spec, fp, tok_fp)
    stores, splits = build_stores(
        cfg, tokenizer, spec, meta, root, progress=progress, console=console
    )
    return ChunkReport(stores, splits, up_to_date=False, root=root)
