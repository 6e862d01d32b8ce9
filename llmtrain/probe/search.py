"""The search for the largest micro-batch whose trial passes, and the probe that runs it on
a device (docs/architecture.md, "Probing").

The true maximum M* is the largest m whose trial is ok (trial.py's pass rule; what a
brute-force scan finds with the same measurement). Guarantee, for peaks that grow with m,
affinely or faster: answer = M* — the answer is always an m whose own trial passed, and the
search stops only when m + 1 failed, or is clearly over the budget by the measured peaks
(below), or m is the cap. The margin is headroom *on top*: it shrinks the budget.

A candidate is not run when the measured peaks already put it clearly over the budget
(`clearly_over`): its peak is at least the largest passing trial's plus the smallest slope
measured up to it, and that lower bound exceeds the budget by `PREDICT_MARGIN`. Running it
would only confirm the failure, and a failing trial is what makes `micro_batch: auto` cost
more than the answer set by hand: it is stopped once over the budget, but by then it has
passed it by up to one module's allocation (docs/benchmarks.md: the QLoRA probe, 1.04–1.10×
the by-hand peak with the run, 1.00–1.04× without it). The bound holds when each further sequence
costs at least what the earlier ones did (activations are linear in m; fixed costs switching
on make it steeper). The smallest secant from *every* earlier passing trial keeps the bound
low where memory bends the other way (the chunked loss's logits stop growing once a
micro-batch fills a chunk: a secant from a trial past that point leaves it out), and the
margin covers the scatter of one measured peak (under the `retain` CPU allocator, up to about
2% of the budget between trials of one process). A wrong prediction costs one micro-batch of
throughput, never an out-of-memory error: the answer's own trial always ran and passed.

Search (`search_micro_batch`): m=1 and m=2 are measured; their difference is the activation
memory of one sample, which with the measured intercept predicts the largest m under the
budget (the analytic weights + grads + optimizer-state bytes are computed too, to refuse at
once a model that cannot fit at all). That guess is verified by a trial; from there the search
gallops outwards (steps doubling, from 1/16 of the guess) until it brackets the answer, then
narrows the bracket by interpolating measured peaks, falling back to bisection (geometric while
the bracket spans more than ×2) when a prediction lands outside the bracket (the peaks do not
explain the failure: an OOM below the budget) or a predicted m failed. Capped by `max_micro`
and by ceil(global_batch / world). At most 2·ceil(log2(cap)) + 4 trials; typically 4–6, and
within 2·log2(M*) + 4 when only OOMs mark the limit (tests/test_probe.py checks every limit
1..300).

Distributed: each rank searches locally (an OOM is caught inside its own trial, so a rank
never leaves the search early), then *every* rank reaches one `all_reduce_min`, so all ranks
agree on the smallest answer and none waits forever on a rank that hit an OOM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from llmtrain.data.batching import grad_accum
from llmtrain.engine.distributed import all_reduce_min
from llmtrain.engine.parallel import unwrap
from llmtrain.errors import LLMTrainError
from llmtrain.probe.memory import MemoryBackend, device_name, fmt_bytes
from llmtrain.probe.result import ProbeResult, Trial
from llmtrain.probe.trial import TrialSetup, live_state, run_trial, static_bytes

GALLOP_START = 1 / 16  # the first step up from a passing guess, as a fraction of it
# How far over the budget a lower bound of a candidate's peak must be for it not to be run:
# above the scatter of a measured peak (module docstring).
PREDICT_MARGIN = 0.02


def trial_bound(cap: int) -> int:
    """The most trials a search may run: 2·ceil(log2(cap)) + 4."""
    return 2 * math.ceil(math.log2(max(cap, 2))) + 4


def _fit_line(ok: list[Trial]) -> tuple[float, float] | None:
    """(intercept, slope) of peak against m through the smallest and largest ok trials."""
    pts = sorted((t.micro_batch, t.peak_bytes) for t in ok if t.peak_bytes is not None)
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return None
    (a, pa), (b, pb) = pts[0], pts[-1]
    slope = (pb - pa) / (b - a)
    if slope <= 0:
        return None
    return pa - slope * a, slope


def clearly_over(ok: list[Trial], m: int, budget: int) -> int | None:
    """A lower bound of m's peak when it is over the budget by `PREDICT_MARGIN`, else None:
    the peak of the largest passing trial below m plus, per further sequence, the smallest
    secant slope from an earlier passing trial to it (module docstring). Needs two passing
    trials with measured peaks; nothing is predicted from failures (an OOM may have no peak)."""
    pts = sorted((t.micro_batch, t.peak_bytes) for t in ok if t.peak_bytes is not None)
    pts = [(a, pa) for a, pa in pts if a < m]
    if len(pts) < 2:
        return None
    lo, p_lo = pts[-1]
    slope = min((p_lo - pa) / (lo - a) for a, pa in pts[:-1])
    if slope <= 0:
        return None
    bound = int(p_lo + slope * (m - lo))
    return bound if bound > (1 + PREDICT_MARGIN) * budget else None


def _not_run(m: int, bound: int, budget: int) -> Trial:
    return Trial(
        m,
        False,
        None,
        0.0,
        error=f"not run: its peak is at least {fmt_bytes(bound)} by the passing trials' "
        f"slope, over the budget {fmt_bytes(budget)}",
        predicted=True,
    )


def search_micro_batch(
    trial: Callable[[int], Trial], *, cap: int, budget: int, max_trials: int | None = None
) -> tuple[int, list[Trial]]:
    """The largest m in [1, cap] whose trial passes; 0 if m=1 fails.

    `trial(m)` runs and judges one trial (ok ⇔ no OOM and peak ≤ budget); `budget` is used
    here only to predict where the answer lies from measured peaks, and to leave out a
    candidate the measured peaks put clearly over it (`clearly_over`; such a Trial has
    `predicted` set and does not count towards `max_trials`).
    """
    max_trials = max_trials or trial_bound(cap)
    trials: list[Trial] = []
    by_m: dict[int, Trial] = {}
    lo, hi = 0, cap + 1  # lo: largest m that passed; hi: smallest m that failed (cap+1: none)

    def run(m: int) -> bool:
        nonlocal lo, hi
        bound = clearly_over([t for t in by_m.values() if t.ok], m, budget)
        t = trial(m) if bound is None else _not_run(m, bound, budget)
        trials.append(t)
        by_m[m] = t
        if t.ok:
            lo = max(lo, m)
        else:
            hi = min(hi, m)
        return t.ok

    def done() -> bool:
        measured = sum(not t.predicted for t in trials)
        return lo >= cap or hi - lo <= 1 or measured >= max_trials

    def predicted() -> int | None:
        line = _fit_line([t for t in by_m.values() if t.ok])
        if line is None:
            return None
        intercept, slope = line
        return int((budget - intercept) // slope)

    def interpolated() -> int | None:
        """Where the budget lies between the bracket's measured peaks, else on the line
        through the passing ones."""
        p_hi = by_m[hi].peak_bytes if hi in by_m else None
        p_lo = by_m[lo].peak_bytes
        if p_hi is not None and p_lo is not None and p_hi > p_lo:
            return lo + int((budget - p_lo) * (hi - lo) // (p_hi - p_lo))
        return predicted()

    if not run(1) or done():
        return lo, trials
    run(2)
    if done():
        return lo, trials
    # the analytic guess, verified
    guess = predicted() or 2 * lo
    run(min(max(guess, lo + 1), hi - 1))
    step = max(1, math.ceil(lo * GALLOP_START))
    interpolate = True
    while not done():
        if hi > cap:  # nothing failed yet: gallop upwards
            m = min(cap, lo + step)
            step *= 2
            run(m)
            continue
        width = hi - lo
        m = interpolated() if interpolate else None
        # A prediction at or past hi is contradicted by hi's own failure: the peaks it rests on
        # do not explain the limit (a simulated or allocator OOM, fragmentation), so testing
        # the edge below hi would creep down one m at a time. Bisect instead.
        guessed = m is not None and lo < m < hi
        if not guessed:
            m = math.isqrt(lo * hi) if hi > 2 * lo else (lo + hi) // 2
            m = min(max(m, lo + 1), hi - 1)
        ok = run(m)
        # a guess that failed, or did not halve the bracket, gives way to bisection once
        interpolate = not guessed or (ok and (hi - lo) <= width // 2)
    return lo, trials


# --------------------------------------------------------------------------- the probe
def _refusal(static: int, budget: int, capacity: int, margin: float) -> LLMTrainError:
    """Why nothing fits, and what to change."""
    why = (
        f"the weights, gradients and optimizer state alone need {fmt_bytes(static)}"
        if static > budget
        else "a trial at micro-batch 1 does not fit (on this or another rank)"
    )
    return LLMTrainError(
        f"batch.micro_batch: auto: {why}, more than the budget {fmt_bytes(budget)} "
        f"({1 - margin:.0%} of {fmt_bytes(capacity)}); shorten data.chunk.seq_len, enable "
        "model.gradient_checkpointing, use a smaller model or raise batch.probe.memory_limit"
    )


def _activation_bytes(by_m: dict[int, Trial]) -> int | None:
    """peak(2) − peak(1) when both passed: the measured memory of one more sequence."""
    if 1 in by_m and 2 in by_m and by_m[1].ok and by_m[2].ok:
        return (by_m[2].peak_bytes or 0) - (by_m[1].peak_bytes or 0)
    return None


def probe_micro_batch(
    setup: TrialSetup,
    backend: MemoryBackend,
    *,
    global_batch: int,
    world_size: int = 1,
    margin: float = 0.1,
    max_micro: int = 4096,
    optimizer_name: str = "adamw",
) -> ProbeResult:
    """Measure the largest micro-batch for `setup` on `backend`'s device; all ranks agree."""
    t0 = time.perf_counter()
    cap = max(1, min(max_micro, math.ceil(global_batch / world_size)))
    capacity = backend.capacity()
    budget = int((1 - margin) * capacity)
    static = static_bytes(unwrap(setup.model), optimizer_name)
    if static > budget:
        # Still join the collective below, so the other ranks are not left waiting.
        micro, trials = 0, []
    else:
        with live_state(setup) as live:  # one snapshot for the whole search, restored after it

            def trial(m: int) -> Trial:
                # k = 1 (m is the whole window): no accumulation, one micro-batch per window
                k = grad_accum(global_batch, m, world_size)
                shaped = replace(setup, micro_batches=min(k, 2))
                return run_trial(shaped, backend, m, budget, live)

            micro, trials = search_micro_batch(trial, cap=cap, budget=budget)
    agreed = all_reduce_min(torch.tensor([micro], dtype=torch.long, device=setup.device))
    micro = int(agreed.item())
    if micro < 1:
        raise _refusal(static, budget, capacity, margin)
    by_m = {t.micro_batch: t for t in trials}
    ok = sorted(
        (t for t in trials if t.ok and t.peak_bytes is not None), key=lambda t: t.micro_batch
    )
    chosen = by_m.get(micro)
    return ProbeResult(
        micro_batch=micro,
        grad_accum=grad_accum(global_batch, micro, world_size),
        global_batch=global_batch,
        seq_len=setup.seq_len,
        device=f"{setup.device.type}: {device_name(setup.device)}",
        capacity_bytes=capacity,
        peak_bytes=chosen.peak_bytes if chosen else (ok[-1].peak_bytes if ok else None),
        margin=margin,
        trials=trials,
        budget_bytes=budget,
        world_size=world_size,
        max_micro=max_micro,
        static_bytes=static,
        activation_bytes_per_sample=_activation_bytes(by_m),
        seconds=time.perf_counter() - t0,
    )
