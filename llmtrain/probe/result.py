"""What the probe reports: each trial, the answer with its evidence, and `fit`'s plan.

Plain data only, so the trial, the search, the cache and the CLI can all share it without
depending on each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Trial:
    """One trial: micro-batch, verdict, measured (adjusted) peak, and how fast it trained.
    `predicted`: not run, because the measured peaks put it clearly over the budget
    (probe/search.py, `clearly_over`); it then has no peak, and `error` says why."""

    micro_batch: int
    ok: bool
    peak_bytes: int | None
    seconds: float
    tokens_per_s: float | None = None
    error: str | None = None
    alloc_retries: int = 0
    predicted: bool = False


@dataclass
class ProbeResult:
    """The probe's answer and the evidence for it (the `probe-batch --json` object)."""

    micro_batch: int
    grad_accum: int
    global_batch: int
    seq_len: int
    device: str
    capacity_bytes: int
    peak_bytes: int | None
    margin: float
    trials: list[Trial]
    cached: bool = False
    budget_bytes: int = 0
    world_size: int = 1
    max_micro: int = 0
    static_bytes: int = 0  # analytic: weights + grads + optimizer state
    activation_bytes_per_sample: int | None = None  # measured: peak(2) − peak(1)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        d = dict(d)
        d["trials"] = [Trial(**t) for t in d.get("trials", [])]
        return cls(**d)


@dataclass
class MicroBatchPlan:
    """What `fit` runs with: micro-batch, accumulation steps, and the probe behind them."""

    micro_batch: int
    grad_accum: int
    probe: ProbeResult | None = None

    def __int__(self) -> int:  # pipeline.resolve_micro takes int(plan)
        return self.micro_batch
