"""The token-store cache: build the stores of a config once, reuse them while nothing changed.

A fingerprint (`stores_fingerprint`) hashes everything that decides the stores' bytes: the
corpora, the reader settings, the tokenizer and the chunk settings. `ensure_stores` reuses the
stores under `store_root(cfg)` when every split carries that fingerprint, and rebuilds them
otherwise (docs/architecture.md, "Token store"). A reused store's content is verified against
the checksums in its meta.json (`data.store_verify`: full, sampled, or auto by size); one that
matches but is damaged or was edited is an error, never a silent rebuild or a silent train.
What a killed build left behind (`.tmp-*` / `.old-*` of a dead pid) is swept on every call.
The stores' folder is llmtrain's own (`claim_store_root`, util/owned.py): one that holds
anything else is refused, never written into or replaced.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain import layout
from llmtrain.config import Config
from llmtrain.config.schema import DataSourceConfig, eval_splits
from llmtrain.console import say
from llmtrain.data.chunk_spec import resolve_spec
from llmtrain.data.chunking import ChunkSpec
from llmtrain.data.corpus import corpus_fingerprint, train_fingerprint
from llmtrain.data.encode import build_stores, set_workers
from llmtrain.data.sft import sft_fingerprint
from llmtrain.data.store import FORMAT_VERSION, META, TokenStore, split_folder
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import remove_stale_temps
from llmtrain.util.owned import check_replaceable, confined, is_ours, mark, user_entries

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
    notes: list[str] = field(default_factory=list)  # what the caller should tell the user

    @property
    def verified(self) -> str | None:
        """How the reused stores were checked ("full", "sampled", or both); None when built."""
        if not self.up_to_date:
            return None
        return ",".join(sorted({s.verified for s in self.stores.values()}))


def store_root(cfg: Config) -> Path:
    """Where the stores live: data.store, or <run.output_dir>/store; splits are subfolders."""
    return Path(cfg.data.store) if cfg.data.store else Path(cfg.run.output_dir) / layout.STORE_DIR


def claim_store_root(cfg: Config, root: Path) -> None:
    """Make `root` the stores' folder, marked as ours; refuse a folder that holds anything
    else (a store of an older llmtrain, recognised by its train/meta.json, is adopted). The
    default `<output_dir>/store` may not be a symbolic link (writes stay in the run); a
    `data.store` the user names may be one (stores on another disk): its target is judged."""
    if cfg.data.store is None:
        confined(Path(cfg.run.output_dir), root)
    real = root.resolve()
    ours = is_ours(real, "stores")
    if not ours and not is_ours(real / "train", "store", (META,)) and user_entries(real):
        shown = ", ".join(user_entries(real)[:3])
        raise LLMTrainError(
            f"{root}: not a store folder llmtrain made (it holds {shown}); llmtrain writes its "
            "stores only into a folder of its own: point data.store at an empty or new folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    if not ours:
        mark(root, "stores")


def _splits(cfg: Config) -> list[str]:
    """The splits of `cfg`, each with a store folder (`split_folder`): one per training source
    (`train`, or `train-<name>` for each source of a mixture), then the eval splits: `eval`
    (one corpus, or eval_fraction) or `eval/<name>` per named set."""
    return [p.store for p in cfg.data.train_parts] + eval_splits(cfg)


def _stale_stores(root: Path, names: list[str]) -> list[Path]:
    """Split folders under `root` (train, train-<name>, eval, eval-<name>) that none of
    `names` uses."""
    used = {split_folder(n) for n in names}
    prefixes = (layout.train_source_store(""), "eval-")
    return [
        p
        for p in sorted(root.iterdir())
        if p.is_dir()
        and p.name not in used
        and (p.name in ("eval", layout.TRAIN_SPLIT) or p.name.startswith(prefixes))
    ]


def split_keys(cfg: Config) -> dict[str, str]:
    """Each split's config key, as messages name it (`data.train.1`, `data.eval.web`); an
    eval_fraction split is held out of data.train."""
    keys = {p.store: p.key for p in cfg.data.train_parts}
    evals = {split: "data." + split.replace("/", ".") for split in cfg.data.eval_sets}
    return {**keys, "eval": "data.train", **evals}


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
        "train": train_fingerprint(d),
        "eval": eval_fingerprint(cfg),
        "eval_fraction": d.eval_fraction if d.eval is None else None,
        "tokenizer": tok_fp,
        "chunk": chunk,
    }
    sft = sft_fingerprint(d)
    if sft is not None:  # only instruction data: a text store's fingerprint stays as it was
        payload["sft"] = sft
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def eval_fingerprint(cfg: Config) -> str | dict[str, str] | None:
    """The eval corpora's fingerprint: one corpus as before (its stores stay reusable), named
    sets by name."""
    d = cfg.data
    if d.eval is None or isinstance(d.eval, DataSourceConfig):
        return corpus_fingerprint(d.eval, key="data.eval") if d.eval is not None else None
    return {name: corpus_fingerprint(s, key=f"data.eval.{name}") for name, s in d.eval.items()}


def _reusable(root: Path, names: list[str], fp: str, verify: str) -> dict[str, TokenStore] | None:
    """The existing stores if every split matches `fp`; None when any is absent or stale.

    Each is opened with its checksums verified (`verify`: auto | full | sampled). A store that
    exists but is damaged (truncated, edited, missing a file) raises: rebuilding it silently
    would hide the damage, and `--force` is there to replace it on purpose.
    """
    stores = {}
    for name in names:
        path = root / split_folder(name)
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
            stores[name] = TokenStore.open(path, verify=verify)
        except LLMTrainError as e:
            raise LLMTrainError(f"{e} (or run `llmtrain chunk --force` to rebuild)") from e
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

    threads_note = set_workers(workers if workers is not None else cfg.data.workers)
    spec = resolve_spec(cfg, tokenizer)
    root = store_root(cfg)
    names = _splits(cfg)
    tok_fp = tokenizer_fingerprint(tokenizer)
    fp = stores_fingerprint(cfg, tok_fp)
    claim_store_root(cfg, root)  # never a folder of someone else's files
    # What a killed `chunk` left (kill -9 runs no cleanup), swept before the store is reused
    # too, or it would stay forever beside an up-to-date store; this process has none open yet.
    swept = remove_stale_temps(root)
    if not force:
        stores = _reusable(root, names, fp, cfg.data.store_verify)
        if stores is not None:
            splits = {
                n: {**s.meta.get("stats", {}), "up_to_date": True, "verified": s.verified}
                for n, s in stores.items()
            }
            report = ChunkReport(stores, splits, up_to_date=True, root=root)
            return _with_notes(report, cfg, swept, None, console)
    root.mkdir(parents=True, exist_ok=True)
    # A store this config no longer has (an eval set, or a training source renamed or
    # dropped) would mislead whoever reads the folder later; only a store of ours is removed.
    for stale in _stale_stores(root, names):
        check_replaceable(stale, "store", (META,))
        shutil.rmtree(stale)
    meta = _store_meta(cfg, spec, fp, tok_fp)
    stores, splits = build_stores(
        cfg, tokenizer, spec, meta, root, progress=progress, console=console
    )
    report = ChunkReport(stores, splits, up_to_date=False, root=root)
    return _with_notes(report, cfg, swept, threads_note, console)


def _with_notes(
    report: ChunkReport,
    cfg: Config,
    swept: list[Path],
    threads_note: str | None,
    console: Console | None,
) -> ChunkReport:
    """Add what the user should hear about to `report.notes` and print it on one rank (stderr
    unless the caller's console says otherwise): bad records skipped (on_error: skip, on
    every use of the store, not only the build), a forced single tokenizer thread, leftovers
    of a killed build removed."""
    notes = report.notes
    if swept:
        shown = ", ".join(p.name for p in swept)
        notes.append(f"removed what a killed build left in {report.root}: {shown}")
    if threads_note:
        notes.append(threads_note)
    keys = split_keys(cfg)
    for name, split in report.splits.items():
        key = keys.get(name, "data.train")
        entries = split.get("skipped_entries") or []
        if entries:
            shown = ", ".join(entries[:3]) + (" ..." if len(entries) > 3 else "")
            notes.append(
                f"warning: {key}: {len(entries):,} corpus entr{'ies' if len(entries) > 1 else 'y'}"
                f" skipped, not regular files (FIFOs, sockets, devices): {shown}"
            )
        skipped = int(split.get("skipped_records") or 0)
        if skipped:
            notes.append(
                f"warning: {key}: {skipped:,} bad record{'s' * (skipped != 1)} skipped "
                f"(on_error: skip), {split.get('documents', 0):,} documents kept in {name}"
            )
    for line in notes:  # under torchrun every rank opens the stores; rank 0 alone speaks
        say(line, out=console)
    return report
