"""Third-party libraries' noise, kept from the user; what matters said once in our words.

Applied once per process by the CLI (`llmtrain.cli`), before any command imports torch,
transformers, peft or bitsandbytes; torchrun's workers run the same CLI, so every rank gets it.
With `--debug` (or LLMTRAIN_DEBUG=1) nothing is filtered.

Where the noise comes from, and the knob that stops it:
- bitsandbytes, on import (CPUs with AVX512-BF16): it asks the `kernels` package for a hub
  kernel, `kernels` tries the Hugging Face Hub (or says it is offline), fails, and
  `bitsandbytes.backends.cpu.ops` logs a warning, up to twice. llmtrain never downloads, so
  HF_HUB_OFFLINE=1 (read by huggingface_hub at import) stops the network attempt, and the two
  loggers are routed through `_Resayer`, which drops warnings nobody can act on.
- transformers: its own logging reads TRANSFORMERS_VERBOSITY when first used; "error" keeps its
  advice about configs llmtrain built on purpose (use_cache with checkpointing, loss_type).
- python warnings: deprecations raised inside the libraries for calls llmtrain makes are for
  llmtrain's developers (the tests show them), not its users.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# Libraries that log through python's `logging` (transformers has its own: TRANSFORMERS_VERBOSITY).
NOISY_LOGGERS = ("bitsandbytes", "kernels", "peft", "huggingface_hub", "accelerate")
NOISY_MODULES = r"(transformers|peft|bitsandbytes|kernels|huggingface_hub|accelerate)(\.|$)"

# A library warning that matters to the run, and what llmtrain says instead (once).
RESAY: tuple[tuple[str, str], ...] = (
    (
        r"bitsandbytes library load error",
        "bitsandbytes could not load its native library, so optim.name: adamw8bit and "
        "model.quantize will fail; reinstall it for this CUDA version: "
        "pip install --force-reinstall 'llmtrain[qlora]'",
    ),
    (
        r"No prebuilt binary for (CUDA|ROCm)",
        "bitsandbytes has no build for this CUDA version and uses the nearest one; if 8-bit or "
        "4-bit layers fail, install a bitsandbytes built for it",
    ),
)

_applied = {"done": False}


class _Resayer(logging.Handler):
    """Says a RESAY match once in llmtrain's words and any other error in one line; drops
    the rest (warnings about optional kernels, hub lookups, advice to library developers)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.said: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        line = next((ours for pat, ours in RESAY if re.search(pat, text)), None)
        if line is None and record.levelno >= logging.ERROR:
            line = f"{record.name}: {' '.join(text.split())[:300]}"
        if line is not None and line not in self.said:
            self.said.add(line)
            print(f"warning: {line}", file=sys.stderr)


def apply(*, debug: bool) -> None:
    """Set the knobs and handlers above (once per process; a no-op under `debug`, except that
    llmtrain never reaches the Hub in either case)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models only: no hub lookups at all
    if debug or _applied["done"]:
        return
    _applied["done"] = True
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers' "Loading weights" bar (read when transformers is imported): llmtrain shows
    # its own progress, and the bar would interleave with it on every from_pretrained
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = _Resayer()
    for name in NOISY_LOGGERS:
        log = logging.getLogger(name)
        log.addHandler(handler)
        log.propagate = False  # not to python's last-resort stderr handler
        log.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=NOISY_MODULES)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
