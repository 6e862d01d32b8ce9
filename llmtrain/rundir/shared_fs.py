"""Every rank of a job sees the same run directory (docs/architecture.md, "Scale-out").

Rank 0 alone writes the run directory (the tokenizer, the token stores, checkpoints), and the
other ranks read it: they open the stores rank 0 built, and a resume restores every rank from
the checkpoint rank 0 wrote. On several machines that holds only when `run.output_dir` is one
directory that every node sees (a shared filesystem). A node-local one (a relative output_dir
started from different working directories, /tmp, a local disk) fails later and far from the
cause: another node finds no stores, or resumes a different run, or starts over.

So before anything reads or writes the run directory, `check_shared_run_dir`: rank 0 writes a
note holding a random token into it (atomically), the note's name and token are broadcast,
every rank reads the note back, and what each found is gathered on every rank. Unless all
found it, every rank stops with the same one line naming the output_dir, the ranks and hosts
that do not see it, and the fix. Rank 0 removes the note once everyone has looked, whatever
the verdict; a dry run checks too (it is how to learn this before a long job) and leaves
nothing behind, as with the lock. A world of one has nothing to check.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from llmtrain import layout
from llmtrain.engine.distributed import DistInfo, all_gather_objects, broadcast_object
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import atomic_write, temp_sibling

# Some network filesystems cache a lookup for a while (NFS: "no such file" for up to a
# minute in a directory read earlier). A rank that does not see the note at once looks again,
# having opened each directory on the way (NFS then asks the server), for this long.
LOOK_AGAIN_S = 5.0


@dataclass(frozen=True)
class Sighting:
    """What one rank found: its rank, host, the output_dir as it resolves there, and whether
    the note was there with rank 0's token."""

    rank: int
    host: str
    path: str
    sees: bool


def check_shared_run_dir(output_dir: str | Path, dist: DistInfo) -> None:
    """Refuse (on every rank, the same line) a run directory that some rank does not see."""
    if not dist.enabled:
        return
    where = Path(os.path.abspath(output_dir))
    created = first_missing(where) if dist.is_main else None
    note = write_note(where) if dist.is_main else None
    note = broadcast_object(note)  # (name, token), or the reason rank 0 could not write it
    try:
        if isinstance(note, str):
            raise LLMTrainError(note)
        name, token = note
        mine = Sighting(dist.rank, socket.gethostname(), str(where), finds(where / name, token))
        everyone = all_gather_objects(mine)
    finally:
        if dist.is_main and not isinstance(note, str):
            (where / note[0]).unlink(missing_ok=True)
    blind = [s for s in everyone if not s.sees]
    if not blind:
        return
    if created is not None:
        remove_empty(where, created)  # a refused job leaves nothing, not even the folder
    raise LLMTrainError(refusal(str(output_dir), everyone[0], blind))


def write_note(where: Path) -> tuple[str, str] | str:
    """Rank 0: write a note with a fresh token into `where`; (its file name, the token), or
    why it could not (every rank then stops with that line instead of waiting for it). The
    token is in the name too: no host can have a lookup of that name cached."""
    token = secrets.token_hex(8)
    path = temp_sibling(where / f"{layout.SHARED_FS_NOTE}-{token}")
    try:
        atomic_write(path, token)
    except (OSError, LLMTrainError) as e:
        return f"run.output_dir {where}: cannot write there ({e}); choose a writable directory"
    return path.name, token


def finds(path: Path, token: str) -> bool:
    """Whether `path` holds `token`, looking again for LOOK_AGAIN_S (see above)."""
    deadline = time.monotonic() + LOOK_AGAIN_S
    while True:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if path.read_text(encoding="utf-8") == token:
                return True
        if time.monotonic() >= deadline:
            return False
        revisit(path.parent)
        time.sleep(0.25)


def revisit(directory: Path) -> None:
    """Open every directory from the root down to `directory`: NFS revalidates a directory it
    opens (close-to-open), so a name it had cached as missing is looked up again."""
    for d in [*reversed(directory.parents), directory]:
        with contextlib.suppress(OSError):
            os.close(os.open(d, os.O_RDONLY | os.O_DIRECTORY))


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (writing the note creates it)."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def remove_empty(path: Path, top: Path) -> None:
    """Remove `path` and its parents up to `top`, the folders the note created, while empty."""
    for p in [path, *path.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return


def refusal(output_dir: str, zero: Sighting, blind: list[Sighting]) -> str:
    """The one line: which output_dir, who does not see it (and where it resolves there), who
    wrote it where, the fix."""
    shown = []
    for s in blind[:4]:
        there = f", as {s.path}" if s.path != zero.path else ""
        shown.append(f"{s.rank} (host {s.host}{there})")
    more = f" and {len(blind) - 4} more" if len(blind) > 4 else ""
    who = f"rank {shown[0]} does" if len(blind) == 1 else f"ranks {', '.join(shown)}{more} do"
    return (
        f"run.output_dir {output_dir}: {who} not see what rank 0 (host {zero.host}) writes to "
        f"{zero.path}; output_dir must be on a filesystem every node sees: give an absolute "
        "path on shared storage"
    )
