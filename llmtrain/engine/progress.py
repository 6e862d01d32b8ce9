"""What a person and `metrics.jsonl` see of a training run: the progress bar, the train and eval
records, and events. The loop reports facts; this module owns the clocks and the wording.

Records are keyed on the optimizer step only, so a resumed run writes exactly the records of
an uninterrupted one (the timing fields aside: `metrics.TIMING_FIELDS`).
"""

from __future__ import annotations

import resource
import time
from types import TracebackType
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from llmtrain.engine.metrics import MetricsWriter


def memory_text(device: torch.device) -> str:
    """Peak memory for the progress line: CUDA max allocated, else the process's peak RSS."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}GiB"


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
    ):
        self.metrics, self.console, self.device = metrics, console, device
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
        self.metrics.close()

    def step_started(self) -> None:
        self._t_step = time.perf_counter()

    def event(self, name: str, step: int, **fields: Any) -> None:
        record = {"event": name, "step": step, **fields}
        self.events.append(record)
        self.metrics.write(record)

    def trained(self, step: int, *, loss: float, lr: float, grad_norm: float, **batch: Any) -> None:
        """One optimizer step done: `batch` holds tokens, sequences, micro_batch, grad_accum.
        Writes a train record every `log_every` steps, and on the first and last."""
        now = time.perf_counter()
        self._tokens_since_log += batch["tokens"]
        if step % self.log_every == 0 or step in (1, self.total):
            record = {
                "split": "train",
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                **batch,
                "tokens_per_s": self._tokens_since_log / max(now - self._t_log, 1e-9),
                "elapsed_s": now - self._t_start,
            }
            self.metrics.write(record)
            if self.is_main and not self.show_bar:
                self.console.print(
                    f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3g}  "
                    f"grad_norm {grad_norm:.3g}  {record['tokens_per_s']:.0f} tok/s"
                )
            self._t_log, self._tokens_since_log = now, 0
        rate = batch["tokens"] / max(now - self._t_step, 1e-9)
        info = f"loss {loss:.4f}  lr {lr:.2e}  {rate:,.0f} tok/s  mem {memory_text(self.device)}"
        self._progress.update(self._bar, completed=step, info=info)

    def skipped(self, step: int) -> None:
        self._progress.update(self._bar, completed=step)

    def evaluated(self, step: int, scores: dict[str, float]) -> None:
        self.metrics.write({"split": "eval", "step": step, **scores})
        if self.is_main:  # printed above the progress bar when there is one
            line = "  ".join(f"{k} {v:.4g}" for k, v in scores.items())
            self.console.print(f"eval step {step}: {line}")
