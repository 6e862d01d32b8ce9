"""What a person and `metrics.jsonl` see of a training run: the progress bar, the train and eval
records, and events. The loop reports facts; this module owns the clocks and the wording.

Records are keyed on the optimizer step only, so a resumed run writes exactly the records of
an uninterrupted one (the timing fields aside: `metrics.TIMING_FIELDS`). A train record's
`loss` and `grad_norm` are the means, `tokens` and `sequences` the sums, over the steps since
the previous record (`LogInterval`, which checkpoints carry so that a resume in mid-interval
writes the same record).
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from llmtrain.engine.flops import mfu
from llmtrain.engine.metrics import MetricsWriter


def memory_text(device: torch.device) -> str:
    """Peak memory for the progress line: CUDA max allocated, else the process's peak RSS."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}GiB"


@dataclass
class LogInterval:
    """The optimizer steps since the last train record: what the next record averages.

    Invariant: the interval of the record at step s is every step that stepped in
    (previous record's step, s], so it depends on step numbers only, and the intervals of a
    run's records partition its steps (the records' `tokens` add up to the run's). Plain
    numbers, so it rides in a checkpoint's train state and a resumed run continues the same
    sums in the same order.
    """

    steps: int = 0
    loss_sum: float = 0.0
    grad_norm_sum: float = 0.0
    tokens: int = 0
    sequences: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # a mixture's sequences per source

    def add(
        self,
        loss: float,
        grad_norm: float,
        tokens: int,
        sequences: int,
        sources: dict[str, int] | None = None,
    ) -> None:
        self.steps += 1
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.tokens += tokens
        self.sequences += sequences
        for name, n in (sources or {}).items():
            self.sources[name] = self.sources.get(name, 0) + n

    def close(self) -> dict[str, Any]:
        """The record's fields (mean loss and grad_norm, summed tokens, sequences and, for a
        mixture, sequences per source); then the interval is emptied for the next record."""
        n = max(self.steps, 1)
        fields = {
            "loss": self.loss_sum / n,
            "grad_norm": self.grad_norm_sum / n,
            "tokens": self.tokens,
            "sequences": self.sequences,
        }
        if self.sources:
            fields["sources"] = dict(self.sources)
        self.steps = self.tokens = self.sequences = 0
        self.loss_sum = self.grad_norm_sum = 0.0
        self.sources = {}
        return fields

    def state_dict(self) -> dict[str, Any]:
        """Its part of a checkpoint (engine.checkpoint.Stateful)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in asdict(LogInterval(**state)).items():
            setattr(self, key, value)


class TrainLog:
    """Progress bar + metrics sink for one run; a context manager that closes both."""

    def __init__(
        self,
        metrics: MetricsWriter,
        console: Console,
        *,
        total: int,
        start: int,
        log_every: int,
        is_main: bool,
        show_progress: bool,
        device: torch.device,
        interval: LogInterval | None = None,
        flops_per_token: float = 0.0,
        peak_flops: float | None = None,
    ):
        self.metrics, self.console, self.device = metrics, console, device
        # MFU (engine/flops.py): peak_flops is the whole job's (one device's × world size)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        # the loop's own object (LoopState.log_interval): a checkpoint saves what it holds
        self.interval = interval if interval is not None else LogInterval()
        self.total, self.log_every, self.is_main = total, log_every, is_main
        self.show_bar = is_main and show_progress and console.is_terminal
        self.events: list[dict[str, Any]] = []
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.show_bar,
        )
        self._bar = self._progress.add_task("train", total=total, completed=start, info="")
        self._t_start = self._t_log = self._t_step = time.perf_counter()
        self._tokens_since_log = 0

    def __enter__(self) -> TrainLog:
        self._progress.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.__exit__(kind, exc, tb)
        self.metrics.close(ok=kind is None)

    def step_started(self) -> None:
        self._t_step = time.perf_counter()

    def event(self, name: str, step: int, **fields: Any) -> None:
        record = {"event": name, "step": step, **fields}
        self.events.append(record)
        self.metrics.write(record)

    def trained(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float,
        sources: dict[str, int] | None = None,
        **batch: Any,
    ) -> None:
        """One optimizer step done: `batch` holds this step's tokens, sequences, micro_batch,
        grad_accum; `sources` a mixture's sequences per source. Writes a train record every
        `log_every` steps, and on the first and last: `loss` and `grad_norm` are means and
        `tokens`, `sequences` and `sources` sums over the steps since the previous record
        (LogInterval); lr, micro_batch and grad_accum are this step's."""
        now = time.perf_counter()
        self._tokens_since_log += batch["tokens"]
        self.interval.add(loss, grad_norm, batch["tokens"], batch["sequences"], sources)
        if step % self.log_every == 0 or step in (1, self.total):
            fields = self.interval.close()
            mean_loss, mean_grad_norm = fields["loss"], fields["grad_norm"]
            record = {
                "split": "train",
                "step": step,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": mean_grad_norm,
                **batch,
                "tokens": fields["tokens"],
                "sequences": fields["sequences"],
                **({"sources": fields["sources"]} if "sources" in fields else {}),
                "tokens_per_s": self._tokens_since_log / max(now - self._t_log, 1e-9),
                "elapsed_s": now - self._t_start,
            }
            utilisation = mfu(record["tokens_per_s"], self.flops_per_token, self.peak_flops)
            if utilisation is not None:
                record["mfu"] = utilisation
            self.metrics.write(record)
            if self.is_main and not self.show_bar:
                self.console.print(
                    f"step {step}/{self.total}  loss {mean_loss:.4f}  lr {lr:.3g}  "
                    f"grad_norm {mean_grad_norm:.3g}  {record['tokens_per_s']:.0f} tok/s"
                    + self.mfu_text(record["tokens_per_s"])
                )
            self._t_log, self._tokens_since_log = now, 0
        rate = batch["tokens"] / max(now - self._t_step, 1e-9)
        info = f"loss {loss:.4f}  lr {lr:.2e}  {rate:,.0f} tok/s{self.mfu_text(rate)}"
        info += f"  mem {memory_text(self.device)}"
        self._progress.update(self._bar, completed=step, info=info)

    def mfu_text(self, tokens_per_s: float) -> str:
        """'  MFU 41.3%' for the progress line; empty when the peak is unknown."""
        utilisation = mfu(tokens_per_s, self.flops_per_token, self.peak_flops)
        return "" if utilisation is None else f"  MFU {100 * utilisation:.1f}%"

    def skipped(self, step: int) -> None:
        self._progress.update(self._bar, completed=step)

    def evaluated(self, step: int, scores: dict[str, float], split: str = "eval") -> None:
        """An eval record: split `eval`, or `eval/<name>` for a named eval set."""
        self.metrics.write({"split": split, "step": step, **scores})
        if self.is_main:  # printed above the progress bar when there is one
            line = "  ".join(f"{k} {v:.4g}" for k, v in scores.items())
            self.console.print(f"{split} step {step}: {line}")
