"""The process's host settings: torch's CPU threads (`threads`) and glibc's allocator policy
(`allocator`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtrain.host import allocator, threads

if TYPE_CHECKING:
    from llmtrain.config.schema import RunConfig


def apply(run: RunConfig) -> tuple[threads.Threads, allocator.Policy]:
    """`run.threads` and `run.cpu_allocator` for this process, before anything is measured:
    `fit` and `probe-batch` both call this, so a probe measures what training runs with."""
    return threads.apply(run.threads), allocator.apply(run.cpu_allocator)
