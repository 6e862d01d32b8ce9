"""Test-suite wide settings: tests marked `@pytest.mark.cuda` need a CUDA device and are
skipped without one (`scripts/gpu_check.sh` runs them with `pytest -m cuda` on a GPU); torch's
thread count restored after every test; the `probe_measurement` fixture for tests that measure
the probe's CPU peaks; `tok_dir`, a small byte-level BPE saved as a tokenizer directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmtrain.host import allocator


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _torch_threads_as_found():
    """In-process `fit` and `probe-batch` apply `run.threads` to the whole process
    (host/threads.py); tests that compare against a subprocess running one thread (exact
    resume after a kill) need the suite's one thread (fit_helpers) back, so every test leaves
    the count as it found it."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture
def probe_measurement(monkeypatch):
    """For tests that measure trials' peaks: one thread (on a shared 2-core box two OpenMP
    threads spin against other processes and run 30x slower), no injected OOM, and glibc's
    pinned mmap threshold. An earlier in-process `fit` applied the `retain` allocator, under
    which a trial's peak depends on the heap's history; these tests compare peaks measured at
    different times, so they need the repeatable measurement."""
    monkeypatch.delenv("LLMTRAIN_FAULT_OOM_MICRO", raising=False)
    monkeypatch.delenv("LLMTRAIN_FAULT_OOM_RANK", raising=False)
    monkeypatch.delenv("LLMTRAIN_FAULT_OOM_IN", raising=False)
    allocator.revert()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from chunk_helpers import bpe_tokenizer

    d = tmp_path_factory.mktemp("tok")
    bpe_tokenizer().save_pretrained(d)
    return d
