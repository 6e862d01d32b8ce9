"""One writer per run directory: `<output_dir>/llmtrain.lock`.

The lock is an open file held with `flock(LOCK_EX)` for as long as the writer runs; the file
also says who holds it (pid, host, start time, command), for the message a second writer
gets. The kernel drops a flock when its process dies, however it dies, so a lock whose flock
is free was left by a process that is gone: on the same host it is taken over with a notice.
A file naming another host is refused even when its flock is free, because some network
filesystems do not carry flocks between hosts; the message says how to clear it.

Invariant: while `hold_run_dir(dir)` is active, no other process that uses it holds the same
directory, and on exit the lock file is removed (a crash leaves a file whose flock is free).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmtrain import layout
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import is_out_of_space, no_space
from llmtrain.util.owned import confined


def lock_path(output_dir: Path) -> Path:
    return Path(output_dir) / layout.LOCK_FILE


def _owner_text(owner: dict[str, Any]) -> str:
    since = owner.get("started")
    started = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
    command = f", `{owner['command']}`" if owner.get("command") else ""
    host = owner.get("host", "?")
    return f"pid {owner.get('pid', '?')} on host {host}{started if since else ''}{command}"


def _read_owner(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        owner = json.loads(raw.decode("utf-8"))
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _owner_record() -> bytes:
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "command": " ".join(["llmtrain", *sys.argv[1:]])[:500],
    }
    return (json.dumps(me) + "\n").encode("utf-8")


def _write_owner(fd: int, record: bytes) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, record)
    os.fsync(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refusal(path: Path, owner: dict[str, Any], *, other_host: bool = False) -> LLMTrainError:
    if other_host:
        return LLMTrainError(
            f"{path.parent}: in use by {_owner_text(owner)} (lock {path}); if that run is no "
            f"longer running, delete {path}"
        )
    return LLMTrainError(
        f"{path.parent}: in use by another llmtrain process ({_owner_text(owner)}); wait for "
        f"it to finish, or choose another run.output_dir (lock {path})"
    )


def _open_locked(path: Path, *, wait: bool = False) -> int:
    """An fd of `path` holding its flock, the file still being the one at `path` (a holder
    that removed it as we opened it leaves us a lock on a deleted inode: open again).
    `wait=False`: a lock held by another process is refused with its owner."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as e:
            owner = _read_owner(fd)
            os.close(fd)
            raise _refusal(path, owner) from e
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def acquire(output_dir: Path, notice: Callable[[str], None]) -> int:
    """Take the run directory's lock (see the module doc); returns the held fd."""
    path = confined(Path(output_dir), lock_path(output_dir))  # the lock is written to
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path)
    except OSError as e:
        if is_out_of_space(e):
            raise no_space(path.parent, f"the lock file {path.name}", len(_owner_record())) from e
        raise
    owner = _read_owner(fd)
    if owner and owner.get("pid") != os.getpid():
        if owner.get("host") != socket.gethostname():
            os.close(fd)
            raise _refusal(path, owner, other_host=True)
        pid = owner.get("pid")
        gone = not (isinstance(pid, int) and _pid_alive(pid))
        notice(
            f"notice: {path} was left by {_owner_text(owner)}, which "
            f"{'is no longer running' if gone else 'no longer holds it'}; taking the run "
            "directory over"
        )
    record = _owner_record()
    try:
        _write_owner(fd, record)
    except OSError as e:
        # We hold the flock, so the file is ours to remove: no empty lock is left behind.
        path.unlink(missing_ok=True)
        os.close(fd)
        if is_out_of_space(e):
            raise no_space(path.parent, f"the lock file {path.name}", len(record)) from e
        raise
    return fd


def release(output_dir: Path, fd: int) -> None:
    """Remove the lock file, then drop the flock (in that order: nobody can lock the file
    we are about to remove)."""
    with contextlib.suppress(FileNotFoundError):
        lock_path(output_dir).unlink()
    os.close(fd)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Wait for `path`'s flock and hold it for the block (one process at a time, e.g. the
    ranks training one tokenizer); the file is removed on the way out, before the flock is
    dropped, so that no empty lock file is left in a folder the user reads."""
    fd = _open_locked(Path(path), wait=True)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
        os.close(fd)


@contextlib.contextmanager
def hold_run_dir(
    output_dir: Path, *, enabled: bool = True, notice: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold `output_dir` for the block; `enabled=False` (the other ranks of a job whose rank
    0 holds it) does nothing. `notice` prints the stale-lock takeover line."""
    if not enabled:
        yield
        return
    fd = acquire(Path(output_dir), notice or (lambda line: print(line, file=sys.stderr)))
    try:
        yield
    finally:
        release(Path(output_dir), fd)
