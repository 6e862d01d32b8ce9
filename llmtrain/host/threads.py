"""Intra-op CPU threads of a run, set deliberately and reported (the banner's `threads` row).

Precedence, first that applies:
  1. `run.threads` (an explicit setting in the config wins: it is part of the run's record);
  2. `OMP_NUM_THREADS` in the environment (a user's or a launcher's: `llmtrain --nproc N`
     gives each rank its share of the cores unless the user set it, see llmtrain/launch.py);
  3. the physical cores this process may run on: hyper-threads share one core's FMA units, so
     a second thread per core only adds contention to matmul-bound training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Threads:
    count: int
    source: str  # run.threads | OMP_NUM_THREADS | physical cores

    def describe(self) -> str:
        return f"{self.count} ({self.source})"


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (affinity), at least 1."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    logical = len(allowed) if allowed else (os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        for cpu in allowed or range(logical):
            base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
            with open(f"{base}/physical_package_id") as f, open(f"{base}/core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
    except OSError:
        return max(1, logical)
    return max(1, min(len(cores), logical))


def resolve(setting: int | None, env: dict[str, str] | None = None) -> Threads:
    env = os.environ if env is None else env
    if setting is not None:
        return Threads(setting, "run.threads")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return Threads(int(omp), "OMP_NUM_THREADS")
    return Threads(physical_cores(), "physical cores")


def apply(setting: int | None) -> Threads:
    """Set torch's intra-op thread count as `resolve` says; returns what was set."""
    chosen = resolve(setting)
    if torch.get_num_threads() != chosen.count:
        torch.set_num_threads(chosen.count)
    return chosen
