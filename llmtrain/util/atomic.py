"""The one way llmtrain writes a file or a directory that someone may read later.

Everything goes into a temporary sibling named `.tmp-<name>-<pid>`, is flushed to disk
(`fsync`), and is renamed over the target in one `os.replace`. A reader therefore sees the
old content or the new, never half of either; a crash leaves only a temporary sibling, which
`remove_stale_temps` recognises by its name and removes once its writer's pid is gone.

Out of disk space: a writer that says how much it will write (`needs_bytes`) is refused
before it starts when the disk has less; one that fails on the way has its temporary removed
and gets a one-line `LLMTrainError` naming the directory and the bytes needed, whatever layer
(Python, torch's C++ writer, safetensors' Rust one) reported the failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from llmtrain.errors import LLMTrainError

# What the layers below say when a write finds the disk full: errno 28/122 from Python,
# "os error 28" from Rust (safetensors), "file write failed" / "unexpected pos" from torch's C++
# writer (which loses the errno).
_NO_SPACE_TEXT = re.compile(
    r"No space left|os error 28|Disk quota exceeded|file write failed|unexpected pos", re.I
)
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


def _make_parent(target: Path, *, directory: bool) -> None:
    """Create `target`'s folder, refusing a target of the wrong kind (a folder where a file
    is written, or the reverse; a file on the way) with one line naming it."""
    if target.is_dir() and not directory:
        raise LLMTrainError(f"{target}: is a directory; name a file to write")
    if target.exists() and not target.is_dir() and directory:
        raise LLMTrainError(f"{target}: is a file where a directory is written; move it away")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next(p for p in target.parents if p.exists() and not p.is_dir())
        raise LLMTrainError(
            f"{target}: cannot be written, {blocker} is a file, not a directory"
        ) from e


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def no_space(directory: Path, what: str, needs: int | None, wrote: int = 0) -> LLMTrainError:
    """The one message for a full disk: where, what, how much is needed and free."""
    free = free_bytes(directory)
    need = f"needs {_human(needs)}" if needs else f"needed more than the {_human(wrote)} written"
    hint = " (or lower train.keep_checkpoints)" if what.startswith("checkpoint") else ""
    return LLMTrainError(
        f"{directory}: no space left on the device to write {what}: {need}, {_human(free)} "
        f"free; free some space{hint} and run again"
    )


def is_out_of_space(exc: BaseException) -> bool:
    """Whether a write failed for want of space, by errno or by the writer's own words."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _NO_SPACE_TEXT.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def ensure_space(directory: Path, needs: int, what: str) -> None:
    """Refuse, before anything is written, a write of `needs` bytes that cannot fit."""
    if free_bytes(directory) < needs:
        raise no_space(directory, what, needs)


@contextlib.contextmanager
def atomic_dir(
    target: Path, *, needs_bytes: int | None = None, what: str | None = None
) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds it replaces `target`. When
    the block raises, the temporary directory is removed and `target` is untouched; a full
    disk is reported as one LLMTrainError. `needs_bytes`: what the block will write, checked
    against the free space first."""
    target = Path(target)
    what = what or target.name
    _make_parent(target, directory=True)
    if needs_bytes is not None:
        ensure_space(target.parent, needs_bytes, what)
    tmp = temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except Exception as e:  # whatever the block raised: clean up, then re-raise it (or disk full)
        wrote = _size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_space(e):
            raise no_space(target.parent, what, needs_bytes, wrote) from e
        raise
    # A BaseException (a kill, Ctrl-C) leaves the temporary directory behind exactly as a
    # `kill -9` would; `remove_stale_temps` collects it.
    replace_dir(tmp, target)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write a whole file (text as UTF-8) so that it appears complete or not at all."""
    path = Path(path)
    _make_parent(path, directory=False)
    tmp = temp_sibling(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as e:
        if is_out_of_space(e):
            tmp.unlink(missing_ok=True)
            raise no_space(path.parent, path.name, len(raw)) from e
        raise
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


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree, whichever `path` is; gone already is fine. A symbolic
    link is removed itself, never what it points to."""
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
        remove_path(entry)
        removed.append(entry)
    return removed
