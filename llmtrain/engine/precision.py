"""Numeric precision: dtypes by role, autocast contexts, the fp16 GradScaler, fp64 for checks.

fp32 and fp64 run the model in that dtype with no autocast; bf16 and fp16 autocast the forward.
Trainable weights keep fp32 master copies (fp64 for fp64): an optimizer step in bf16 would
round small updates away. Weights that do not train (a PEFT base) are stored in
`model.frozen_dtype`, by default the compute dtype, since autocast casts them to it anyway.
fp16 needs loss scaling (GradScaler) because its gradients underflow; a step whose gradients
overflow is skipped by the scaler and the loop re-runs it.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}


def param_dtype(precision: str) -> torch.dtype:
    """dtype of the trainable (master) weights: float64 for fp64, float32 otherwise."""
    return torch.float64 if precision == "fp64" else torch.float32


def compute_dtype(precision: str) -> torch.dtype:
    """dtype the forward computes in: the autocast dtype, else the weights' own."""
    return AUTOCAST_DTYPES.get(precision, param_dtype(precision))


def frozen_dtype(setting: str, precision: str) -> torch.dtype:
    """dtype of the weights that do not train: `model.frozen_dtype`, auto = the compute dtype."""
    return compute_dtype(precision) if setting == "auto" else DTYPES[setting]


@torch.no_grad()
def cast_by_role(model: torch.nn.Module, master: torch.dtype, frozen: torch.dtype) -> None:
    """Trainable parameters to `master`, frozen ones to `frozen`, in place. Quantized storage
    (bitsandbytes' uint8/int8 parameters) is not floating point and stays as it is."""
    for p in model.parameters():
        want = master if p.requires_grad else frozen
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)
    # Floating buffers (rotary frequencies, VeRA's shared projections) keep the master dtype,
    # as a whole-model `.to(master)` left them: fp64 runs stay fp64 throughout.
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != master:
                setattr(module, name, b.to(master))


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16/fp16, a no-op for fp32/fp64."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (a disabled one passes everything through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
