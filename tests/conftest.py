"""Test-suite wide settings: tests marked `@pytest.mark.cuda` need a CUDA device and are
skipped without one (`scripts/gpu_check.sh` runs them with `pytest -m cuda` on a GPU)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
