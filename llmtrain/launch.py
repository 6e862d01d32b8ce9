"""`--nproc N`: start N copies of this same command under torchrun's own elastic launcher.

It is exactly `torchrun --standalone --nproc_per_node=N -m llmtrain <command> ...` run from
inside this process (`torch.distributed.run`): same rendezvous (a free port on localhost),
same environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), same worker supervision —
if one rank dies the launcher stops the others. Nothing here talks between processes.
"""

from __future__ import annotations

import os
import sys

from llmtrain.errors import ConfigError, LLMTrainError


def under_torchrun() -> bool:
    """True inside a process that a torchrun-style launcher started (a rank of a job)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_args(nproc: int, command: list[str]) -> list[str]:
    """torchrun's argument list for `llmtrain <command...>` on `nproc` local processes."""
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "llmtrain", *command]


def threads_per_rank(nproc: int, cores: int | None = None) -> int:
    """CPU threads each rank may use: the cores shared out evenly, at least one (torchrun's
    default of 1 leaves most of a many-core CPU idle when training on CPU)."""
    return max(1, (cores or os.cpu_count() or 1) // nproc)


def check_devices(nproc: int, device: str) -> None:
    """One process per GPU: refuse more CUDA ranks than visible GPUs before starting any."""
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        if device.startswith("cuda"):
            raise LLMTrainError(f"run.device: {device} but CUDA is not available")
        return  # auto without CUDA: the ranks run on CPU (gloo)
    count = torch.cuda.device_count()
    if nproc > count:
        raise ConfigError(f"--nproc {nproc}: only {count} CUDA device(s) visible; one per rank")


def launch(nproc: int, command: list[str], *, device: str = "auto") -> int:
    """Run `llmtrain <command>` on `nproc` local ranks with torchrun; returns the exit code
    (0, or the exit code of the first rank that failed — its message is already on stderr)."""
    if under_torchrun():
        raise ConfigError("--nproc: already running under torchrun; drop --nproc")
    check_devices(nproc, device)
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(nproc))
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(nproc, command))
    try:
        run(args)
    except ChildFailedError as e:
        # The first rank that failed by itself: the others may have been stopped with a
        # signal (a negative code) when it died; those are reported as a runtime failure.
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c is not None and c > 0), 1)
    sys.stdout.flush()
    return 0
