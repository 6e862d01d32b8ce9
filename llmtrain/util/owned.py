"""What llmtrain made, and may therefore delete or replace; and where it may write.

A directory llmtrain creates carries a mark of its own (`layout.OWNER_MARK`, a small JSON
file naming its kind): a run directory, a store folder and each split's store, `final/`. A
checkpoint's mark is its `complete` file. llmtrain replaces or deletes a directory only when
it carries the mark of the expected kind, or, for what older versions wrote before marks
existed, the file that has always identified it (`legacy`: a store's meta.json, a run's
config.resolved.yaml, `final/`'s checksums.json). Anything else is refused with one line,
whatever it holds: a folder of the user's own files is never taken for one of ours.

Writes (and the reads of a run's own files) never go through a symbolic link below the
directory they belong to (`confined`): a link named like one of our files or folders would
otherwise let a write land, a delete strike, or a read come from outside the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmtrain import layout
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import TEMP_RE, atomic_write

MARK = layout.OWNER_MARK


def mark(directory: Path, kind: str, **fields: Any) -> None:
    """Write `directory`'s mark: it is llmtrain's own `kind` (plus what `fields` record)."""
    atomic_write(Path(directory) / MARK, json.dumps({"kind": kind, **fields}, sort_keys=True))


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A small JSON object llmtrain wrote (a mark, a record); None when it is absent, a link,
    unreadable or not an object: nothing of it can be trusted then."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def read_mark(directory: Path) -> dict[str, Any] | None:
    """The mark's content; None when there is none (or it is not ours: a link, not JSON)."""
    return read_json_object(Path(directory) / MARK)


def is_ours(path: Path, kind: str, legacy: tuple[str, ...] = ()) -> bool:
    """Whether `path` is a directory llmtrain made as `kind`: its mark, or a `legacy` file."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    found = read_mark(path)
    if found is not None:
        return found.get("kind") == kind
    return any((path / name).is_file() and not (path / name).is_symlink() for name in legacy)


def user_entries(directory: Path) -> list[str]:
    """What `directory` holds besides llmtrain's mark and temporaries, sorted."""
    if not Path(directory).is_dir():
        return []
    return sorted(
        e.name for e in Path(directory).iterdir() if e.name != MARK and not TEMP_RE.match(e.name)
    )


def check_replaceable(path: Path, kind: str, legacy: tuple[str, ...] = (), fix: str = "") -> None:
    """Refuse to delete or replace `path` unless it is absent or llmtrain's own `kind`."""
    path = Path(path)
    if not os.path.lexists(path) or is_ours(path, kind, legacy):
        return
    what = "a symbolic link" if path.is_symlink() else "not a directory llmtrain made"
    raise LLMTrainError(
        f"{path}: {what} (no {MARK} mark of a {kind}); llmtrain replaces only what it "
        f"created, so it leaves this untouched{'; ' + fix if fix else ''}"
    )


def confined(root: Path, path: Path) -> Path:
    """`path`, after checking that no part of it below `root` is a symbolic link (the last
    part included: a write would follow it out of `root`). Returns `path`."""
    root, path = Path(root), Path(path)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise LLMTrainError(f"{path}: outside {root}, where it belongs") from None
    here = root
    for part in parts:
        here = here / part
        if here.is_symlink():
            raise LLMTrainError(
                f"{here}: a symbolic link (to {os.readlink(here)}); llmtrain reads and writes "
                f"a run's files only inside {root}, never through a link: replace the link "
                "with the file itself and run again"
            )
    return path
