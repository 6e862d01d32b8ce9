"""Where the probe's memory numbers come from: a capacity, and the measured peak of a trial.

Two backends with one shape (`MemoryBackend`): `capacity()` is what training may use on this
device, `measure(fn)` runs one trial and returns the peak it really reached. Neither ever
computes a peak from a formula.

- CUDA: capacity = free device memory + what this process already holds (`mem_get_info` +
  `memory_reserved`), peak = `max_memory_reserved` after a reset (reserved, not allocated:
  the caching allocator's segments are what the device must hold, fragmentation included).
  A real `torch.OutOfMemoryError` is caught by the caller; memory is released between trials.
- CPU: capacity = `batch.probe.memory_limit`, else the process's current RSS plus a fraction
  of `MemAvailable` (the CPU analogue of "free + what we hold"). Peak = the kernel's own
  high-water mark of this process's resident memory (`VmHWM`), reset before the trial by
  writing 5 to `/proc/self/clear_refs` (Linux >= 4.0). Why this and not the alternatives:
    * a forked trial subprocess reading its peak RSS deadlocks here: libgomp (torch's CPU
      thread pool) is not fork-safe — a child's first parallel matmul hangs — unless the
      child runs single-threaded, which makes its tokens/s meaningless; spawning a fresh
      process instead costs seconds of imports and model rebuilding per trial;
    * `torch.profiler(profile_memory=True)` counts tensor bytes only (not the allocator's and
      the framework's own memory) and slows every op down;
    * VmHWM is exact to the page, costs nothing while the trial runs, and counts everything
      the process really touched — the same number a container's memory limit enforces.
  The peak is the whole process's resident memory, so capacity is a whole-process budget.
  `malloc_trim(0)` before each trial returns glibc's free pages to the OS, so a large trial
  does not leave resident memory behind that a later, smaller trial would be blamed for — also
  under the `retain` allocator policy, which keeps freed memory in the process while training
  (host/allocator.py): the probe measures the allocator policy training runs with.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from llmtrain.errors import LLMTrainError
from llmtrain.host import allocator

T = TypeVar("T")

# Share of MemAvailable a CPU probe may plan to use when no memory_limit is configured: the
# rest stays for the OS, page cache and the data pipeline.
DEFAULT_RAM_FRACTION = 0.8


@dataclass
class Measured:
    """What one trial measured: the peak, and allocator retries (CUDA; 0 on CPU)."""

    peak_bytes: int
    alloc_retries: int = 0


class MemoryBackend(Protocol):
    """A device's capacity and the measured peak of one trial (see the module docstring)."""

    name: str
    last_peak: int | None  # the peak of the last `measure`, also when `fn` raised

    def capacity(self) -> int: ...

    def release(self, collect: bool = ...) -> None: ...

    def measure(self, fn: Callable[[], T]) -> tuple[T, Measured]: ...

    def current(self) -> int: ...


class OverBudget(MemoryError):
    """A trial's memory passed the budget, so it was stopped there: a failed trial (an
    out-of-memory error that did not have to happen)."""


def is_oom(exc: BaseException) -> bool:
    """A real or simulated out-of-memory: torch's OOM type, or the CPU allocator's refusal."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        text = str(exc).lower()
        return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate" in text
    return False


# --------------------------------------------------------------------------------- CPU
def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise LLMTrainError(f"/proc/self/status has no {key}: cannot measure CPU memory here")


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident memory now (VmRSS, from the one short line of /proc/self/statm:
    cheap enough for the probe to read at every module call)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * _PAGE


def _meminfo_bytes(key: str) -> int | None:
    """A field of /proc/meminfo in bytes, or None when the kernel does not report it."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    return None


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping."""
    found = _meminfo_bytes("MemAvailable")
    if found is None:
        raise LLMTrainError("/proc/meminfo has no MemAvailable: set batch.probe.memory_limit")
    return found


def total_ram_bytes() -> int:
    return _meminfo_bytes("MemTotal") or 0


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError as e:
        raise LLMTrainError(
            f"cannot reset the peak-memory counter (/proc/self/clear_refs: {e.strerror}); "
            "CPU probing needs Linux — set batch.micro_batch to an integer"
        ) from e


class CpuMemory:
    """Peak resident memory of this process during a trial (see the module docstring)."""

    name = "cpu"

    def __init__(self, limit_bytes: int | None = None):
        self.limit_bytes = limit_bytes
        self.last_peak: int | None = None
        # the allocator policy training runs with (host/allocator.py), so that the probe
        # measures it; under `system` this pins glibc's mmap threshold (repeatable peaks)
        allocator.prepare_for_probe()

    def capacity(self) -> int:
        if self.limit_bytes is not None:
            return self.limit_bytes
        return rss_bytes() + int(DEFAULT_RAM_FRACTION * available_ram_bytes())

    def release(self, collect: bool = False) -> None:
        # Trial tensors die by reference counting; a full gc pass (0.1-1 s with transformers
        # imported) is only worth it after an OOM, whose traceback may hold them in a cycle.
        if collect:
            gc.collect()
        allocator.trim()

    def measure(self, fn: Callable[[], T]) -> tuple[T, Measured]:
        self.release()
        reset_peak_rss()
        try:
            out = fn()
        finally:
            peak = _proc_status_bytes("VmHWM")
            self.last_peak = peak
        return out, Measured(peak)

    def current(self) -> int:
        return rss_bytes()


# -------------------------------------------------------------------------------- CUDA
class CudaMemory:
    """Peak reserved memory of the caching allocator during a trial, on one device."""

    name = "cuda"

    def __init__(self, device: torch.device, limit_bytes: int | None = None):
        self.device = device
        self.limit_bytes = limit_bytes
        self.last_peak: int | None = None

    def capacity(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        held = torch.cuda.memory_reserved(self.device)
        available = free + held
        return min(available, self.limit_bytes) if self.limit_bytes else available

    def release(self, collect: bool = True) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def measure(self, fn: Callable[[], T]) -> tuple[T, Measured]:
        self.release()
        torch.cuda.reset_peak_memory_stats(self.device)
        retries0 = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
        try:
            out = fn()
            torch.cuda.synchronize(self.device)
        finally:
            self.last_peak = torch.cuda.max_memory_reserved(self.device)
        retries = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0) - retries0
        return out, Measured(self.last_peak, int(retries))

    def current(self) -> int:
        return torch.cuda.memory_reserved(self.device)  # host-side bookkeeping: no sync


def backend_for(device: torch.device, limit_bytes: int | None = None) -> MemoryBackend:
    """The memory backend for `device`; `limit_bytes` caps (CUDA) or sets (CPU) the capacity."""
    if device.type == "cuda":
        return CudaMemory(device, limit_bytes)
    if device.type == "cpu":
        return CpuMemory(limit_bytes)
    raise LLMTrainError(f"run.device: cannot probe memory on {device.type} (cpu or cuda only)")


def device_name(device: torch.device) -> str:
    """A human and cache-key name for the device: the GPU model, or 'cpu'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def device_total_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return total_ram_bytes()


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n}B"
