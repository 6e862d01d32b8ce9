"""The CPU allocator policy of a run: keep freed memory in the process while training.

Why: glibc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB)
with a fresh `mmap` and hands it back to the kernel with `munmap` at free. A training step
allocates and frees the same multi-MB activations and gradients at every micro-step, so the
kernel zero-fills those pages again and again: on a 2-core machine about 40% of the process's
CPU time was system time, mostly page faults.

Policies (`run.cpu_allocator`, or the environment variable `LLMTRAIN_CPU_ALLOCATOR`, which
wins so that a run can be switched without editing its config):

- `retain` (default): `mallopt(M_MMAP_MAX, 0)` serves every block from the heap, and
  `mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)` keeps freed heap pages mapped; the next step reuses
  them without a fault. The cost is resident memory: freed blocks stay in the heap, which
  fragments (measured: the heap grows to about twice the memory in use, 1.4-1.7x the resident
  peak of `system` for 1.6-1.8x its speed; docs/benchmarks.md), and between steps the process
  keeps its peak resident.
- `system`: glibc's own behaviour, except that building the model (`loading`) pins its mmap
  threshold at 128 KiB, and glibc has no call that makes it adaptive again: every block above
  that is its own mapping, handed back at free (the leanest resident memory and the most page
  faults; docs/benchmarks.md, "The CPU allocator, measured").

A user who tunes glibc themselves (`GLIBC_TUNABLES` or a `MALLOC_*_` variable) keeps their
settings: `retain` is then not applied (`resolve` reports why). Outside glibc both are no-ops.

The probe's CPU memory measurement (probe/memory.py) runs under the same policy as the training
that follows, so it measures the allocator training will use: `fit` and `probe-batch` apply the
run's policy before probing (and the probe cache keys on it); `prepare_for_probe`, for a probe
with none applied (the Python API), pins glibc's mmap threshold as `system` does (else it
moves between trials and the peaks scatter). Under `retain` there is no threshold to move; the
probe's `malloc_trim(0)` before each trial returns the retained pages, so a large trial does not
leave resident memory that a later, smaller trial would be blamed for.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass

ENV = "LLMTRAIN_CPU_ALLOCATOR"
POLICIES = ("retain", "system")
# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_MMAP_MAX, GLIBC_TRIM_THRESHOLD = 65536, 128 * 1024  # glibc's defaults (mallopt(3))
RETAIN_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest it accepts
PROBE_MMAP_THRESHOLD = 128 * 1024


@dataclass(frozen=True)
class Policy:
    """What the run asked for (`name`), what was applied, and why when they differ."""

    name: str  # retain | system
    applied: bool  # mallopt really changed glibc's behaviour
    note: str  # one line for the banner

    def describe(self) -> str:
        return f"{self.name} ({self.note})"


_current: Policy | None = None


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def user_tuned() -> str | None:
    """The name of an environment variable through which the user tunes glibc malloc."""
    if "GLIBC_TUNABLES" in os.environ and "malloc" in os.environ["GLIBC_TUNABLES"]:
        return "GLIBC_TUNABLES"
    return next((k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_")), None)


def resolve(setting: str | None) -> str:
    """The policy to use: $LLMTRAIN_CPU_ALLOCATOR, else the config's `setting`, else retain.
    An unknown value in the environment is an error naming the variable."""
    from llmtrain.errors import LLMTrainError

    env = os.environ.get(ENV)
    if env is not None:
        if env not in POLICIES:
            raise LLMTrainError(f"{ENV}={env!r}: expected one of {', '.join(POLICIES)}")
        return env
    return setting or "retain"


def apply(setting: str | None = None) -> Policy:
    """Apply the policy `resolve(setting)` to this process (idempotent; the first applied
    policy stays: glibc's settings cannot be reverted cleanly once blocks were served)."""
    global _current
    name = resolve(setting)
    if _current is not None:
        return _current
    libc = _libc()
    tuned = user_tuned()
    if name == "system":
        _current = Policy("system", False, "glibc's, mmap threshold 128 KiB from loading on")
    elif libc is None:
        _current = Policy("retain", False, "not glibc: left as is")
    elif tuned is not None:
        _current = Policy("retain", False, f"{tuned} set: the user's malloc settings kept")
    else:
        ok = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, RETAIN_TRIM_THRESHOLD)
        )
        _current = Policy("retain", ok, "freed memory kept for reuse" if ok else "mallopt failed")
    return _current


def current() -> Policy | None:
    return _current


def revert() -> None:
    """Undo `apply`: glibc's defaults again, and the next `apply` starts over. For a process
    that runs one job after another (the test suite, a notebook): blocks already served from
    the heap stay there until freed, so `retain` leaves the heap's layout behind, and peaks
    measured afterwards are repeatable again only after `prepare_for_probe` pins the
    threshold. (The probe's measurements under `retain` depend on that layout: a trial can
    peak a few percent higher than the same trial run later, so the probe's answer may be
    that much under the true maximum — never over the budget.)"""
    global _current
    libc = _libc()
    if _current is not None and _current.applied and libc is not None:
        libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
    _current = None


def prepare_for_probe() -> Policy:
    """Before the probe's CPU measurements (see the module docstring)."""
    # Nothing applied yet (the probe used on its own): pin, as before this policy existed.
    policy = _current or Policy("system", False, "probe on its own: mmap threshold pinned")
    if not policy.applied:
        libc = _libc()
        if libc is not None and user_tuned() is None:
            libc.mallopt(M_MMAP_THRESHOLD, PROBE_MMAP_THRESHOLD)
    return policy


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Around building the model: every large block of loading gets its own mapping, handed
    back at free. Loading makes transient copies (a bf16 tensor before bitsandbytes packs it);
    under `retain` they would all stay in the heap, and under glibc's own behaviour the mmap
    threshold rises after the first large free, so later ones come from the heap and stay
    too. Measured on a 0.78B QLoRA load: 0.8 to 3.9 GiB of private memory from run to run for
    the same call, 0.65 GiB every time with the threshold pinned (docs/benchmarks.md). The
    policy in force is restored after, and the heap's free pages are returned (`trim`); a
    user's own malloc settings are left alone."""
    libc = _libc()
    if libc is None or user_tuned() is not None:
        yield
        return
    retaining = _current is not None and _current.applied
    libc.mallopt(M_MMAP_THRESHOLD, PROBE_MMAP_THRESHOLD)
    if retaining:
        libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
    try:
        yield
    finally:
        if retaining:
            libc.mallopt(M_MMAP_MAX, 0)
        trim()


def trim() -> None:
    """Return every free page of glibc's heaps to the OS (`malloc_trim(0)`)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc.malloc_trim(0)
