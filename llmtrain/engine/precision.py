"""Numeric precision: autocast contexts, the fp16 GradScaler, and fp64 for verification.

fp32 and fp64 run the model in that dtype with no autocast; bf16 and fp16 keep fp32 master
weights and autocast the forward. fp16 needs loss scaling (GradScaler) because its gradients
underflow; a step whose gradients overflow is skipped by the scaler and the loop re-runs it.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def param_dtype(precision: str) -> torch.dtype:
    """dtype of the weights: float64 for fp64, float32 otherwise (autocast does the rest)."""
    return torch.float64 if precision == "fp64" else torch.float32


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16/fp16, a no-op for fp32/fp64."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (a disabled one passes everything through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
