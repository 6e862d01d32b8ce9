"""The one way llmtrain writes a file or a directory that someone may read later.

Everything goes into a temporary sibling named `.tmp-<name>-<pid>`, is flushed to disk
(`fsync`), and is renamed over the target in one `os.replace`. A reader therefore sees the
old content or the new, never half of either; a crash leaves only a temporary sibling, which
`remove_stale_temps` recognises by its name and removes once its writer's pid is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

TEMP_RE = re.compile(r"^\.(?:tmp|old)-(?P<name>.+)-(?P<pid>\d+)$")


def temp_sibling(target: Path, kind: str = "tmp") -> Path:
    """`<parent>/.<kind>-<name>-<pid>`: private to this process, beside the target."""
    return target.with_name(f".{kind}-{target.name}-{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file below `root`, then the directories, so a rename after this cannot
    publish content that is still only in the page cache."""
    if root.is_file():
        _fsync(root)
        return
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` onto `dst`. An existing `dst` is moved aside first
    and deleted only after `src` is in place."""
    fsync_tree(src)
    old = None
    if dst.exists():
        old = temp_sibling(dst, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds it replaces `target`. When
    the block raises, the temporary directory is removed and `target` is untouched."""
    target = Path(target)
    tmp = temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # A BaseException (a kill, Ctrl-C) leaves the temporary directory behind exactly as a
    # `kill -9` would; `remove_stale_temps` collects it.
    replace_dir(tmp, target)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write a whole file (text as UTF-8) so that it appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # sweeps run where this process holds no temporary open: a leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temps(parent: Path) -> list[Path]:
    """Delete the temporary siblings in `parent` left by writers that no longer run (a crash,
    `kill -9`); returns what was removed. Those of other live processes are left alone; call it
    only where this process itself has no temporary open."""
    removed: list[Path] = []
    if not Path(parent).is_dir():
        return removed
    for entry in Path(parent).iterdir():
        m = TEMP_RE.match(entry.name)
        if m is None or _alive(int(m["pid"])):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
