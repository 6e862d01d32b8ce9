"""Model FLOPs utilisation: the share of the hardware's peak that training really uses.

MFU = 6 · N · tokens/s / peak (Kaplan et al.; PaLM's MFU): a forward is 2 FLOPs per parameter
per token, the backward twice that. N counts every parameter (tied ones once), so MFU is
comparable across tools and runs; attention's seq²-term is left out, as in the usual figure.
The peak is the device's dense bf16 tensor-core peak (the number GPU datasheets quote and MFU
papers divide by), whatever `train.precision` the run uses; `run.peak_flops` overrides it, and
is the only way to get an MFU on a CPU or on a GPU missing from the table.
"""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor peak of one device, FLOP/s, matched as a substring of
# torch.cuda.get_device_name, first match wins (so more specific names come first).
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("GB200", 2450e12),
    ("B200", 2250e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16: Volta has no bf16
    ("T4", 65e12),  # fp16
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def table_peak(name: str) -> float | None:
    """The table's peak for a device name, or None when no entry matches."""
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def device_peak(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one `device`: `override` (run.peak_flops), else the table (CUDA only)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    return table_peak(torch.cuda.get_device_name(device))


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token: 6 × every parameter (tied weights once)."""
    return 6.0 * sum(p.numel() for p in model.parameters())


def mfu(tokens_per_s: float, per_token: float, peak: float | None) -> float | None:
    """The fraction of `peak` (all devices of the job together) that `tokens_per_s` uses."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * per_token / peak
