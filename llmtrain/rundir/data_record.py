"""The data a run trains on, recorded in the run itself and compared on resume.

`<output_dir>/data.resolved.json` holds, per split, the corpus fingerprint (every file's
path, size and mtime and the reader settings: data/corpus.py) and the store's digest (a hash
of its meta.json without the build statistics: the fingerprint it was built for, the label
names, the counts and the checksum of every file, which the store verifies on open). Both are
kept here, in the run's own record, and not only beside the data they certify.

A resume compares the corpora before anything is rebuilt (an edited corpus is refused
before its store is replaced) and the stores once they are open (a store edited in a
consistent way, or rebuilt from other tokens). A difference is refused with the same
`key: old → new` display as a config change, unless the run is resumed with
`--accept-data-change`; the accepted change is then recorded in metrics.jsonl as a
`data_changed` event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmtrain import layout
from llmtrain.config import Config
from llmtrain.data.corpus import corpus_fingerprint
from llmtrain.data.store import TokenStore
from llmtrain.errors import ConfigError
from llmtrain.util.atomic import atomic_write
from llmtrain.util.owned import read_json_object

ACCEPT_FLAG = "--accept-data-change"


def corpus_record(cfg: Config) -> dict[str, str]:
    """`{"corpus.train": fingerprint, "corpus.eval": ...}` of the config's corpora (a
    mixture's sources as corpus.train.N, named eval sets as corpus.eval.<name>)."""
    record = {}
    for where, source in cfg.data.sources():
        key = ".".join(str(part) for part in where)
        record["corpus." + key.removeprefix("data.")] = corpus_fingerprint(source, key=key)
    return record


def store_digest(store: TokenStore) -> str:
    """sha256 of what gives the store its meaning: its meta.json less the build statistics."""
    meaning = {k: v for k, v in store.meta.items() if k != "stats"}
    return hashlib.sha256(json.dumps(meaning, sort_keys=True).encode()).hexdigest()


def store_record(stores: Mapping[str, TokenStore]) -> dict[str, str]:
    return {f"store.{name}": store_digest(store) for name, store in sorted(stores.items())}


def record_path(run_dir: Path) -> Path:
    return Path(run_dir) / layout.DATA_RECORD_FILE


def read_record(run_dir: Path) -> dict[str, str] | None:
    """The run's record; None when it has none (a run of an older llmtrain) or it is not a
    JSON object of strings (then nothing can be compared either)."""
    found = read_json_object(record_path(run_dir))
    if found is None or not all(isinstance(v, str) for v in found.values()):
        return None
    return found


def write_record(run_dir: Path, record: Mapping[str, str]) -> None:
    atomic_write(record_path(run_dir), json.dumps(dict(record), indent=1, sort_keys=True) + "\n")


def compare_data(
    recorded: Mapping[str, str] | None, now: Mapping[str, str], run_dir: Path, accept: bool
) -> dict[str, list[str | None]]:
    """The keys of `now` whose value differs from the run's record, `{key: [old, new]}`;
    ConfigError with one line per key unless `accept`. Nothing recorded: nothing to compare."""
    if recorded is None:
        return {}
    changed = {k: [recorded.get(k), v] for k, v in now.items() if recorded.get(k) != v}
    if changed and not accept:
        path = record_path(run_dir)
        lines = [
            f"{path}: data {key}: {_short(old)} → {_short(new)} (the data changed since the "
            "run trained on it)"
            for key, (old, new) in changed.items()
        ]
        lines.append(
            f"{run_dir}: --resume continues training on the data the run trained on; restore "
            f"it, accept the change with `fit --resume auto {ACCEPT_FLAG}`, or start over "
            "with `fit --overwrite`"
        )
        raise ConfigError(lines)
    return changed


def _short(value: Any) -> str:
    return "(absent)" if value is None else f"{str(value)[:12]}…"
