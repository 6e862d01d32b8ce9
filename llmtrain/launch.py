"""`--nproc N`: start N copies of this same command under torchrun's own elastic launcher; with
`--nnodes M --node-rank R --rdzv-endpoint HOST:PORT`, N copies on each of M machines.

One machine: exactly `torchrun --standalone --nproc-per-node=N -m llmtrain <command> ...` run
from inside this process (`torch.distributed.run`): same rendezvous (a free port on localhost),
same environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), same worker supervision —
if one rank dies the launcher stops the others. Several machines: torchrun's c10d rendezvous
at HOST:PORT instead (`--rdzv-backend c10d --nnodes M`); every node runs the same command with
its own `--node-rank`. Nothing here talks between processes.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from llmtrain.errors import ConfigError, LLMTrainError

# After a SIGTERM torchrun's agent passes the signal on to the ranks and kills them this many
# seconds later (its own default is 30). A rank stopping on SIGTERM finishes its step and
# writes a checkpoint first (engine/signals.py), which can take longer on a large model; the
# scheduler's own deadline (SLURM's time limit, a pod's grace period) is the real bound, so
# the agent should not cut the save short before it. TORCH_ELASTIC_SHUTDOWN_TIMEOUT overrides.
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
SHUTDOWN_TIMEOUT_S = 900
# The launcher's own flags, handed to its ranks so that a rank's `resume with:` line (cli.py)
# starts the same job again.
LAUNCH_FLAGS_ENV = "LLMTRAIN_LAUNCH_FLAGS"

_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)$")


@dataclass(frozen=True)
class Nodes:
    """A job on several machines: how many, which one this is, and where they meet."""

    count: int
    rank: int | None  # None: not given (torchrun then guesses which node hosts the rendezvous)
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def rdzv_id(self) -> str:
        """The rendezvous id, the same on every node: derived from the endpoint, which every
        node was given (a plain `torchrun --rdzv-id` on another node must use the same)."""
        return "llmtrain-" + re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.host}-{self.port}")


def parse_endpoint(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT` for an IPv6 address) → (host, port); one line on a bad one."""
    m = _ENDPOINT.match(value.strip())
    port = int(m["port"]) if m else 0
    if m is None or not 0 < port < 65536:
        raise ConfigError(
            f"--rdzv-endpoint {value!r}: expected HOST:PORT with a port 1-65535, e.g. "
            "node001:29500 (node 0's address and a free port, the same on every node)"
        )
    return m["v6"] or m["host"], port


def parse_nodes(nnodes: int | None, node_rank: int | None, endpoint: str | None) -> Nodes | None:
    """The several-machines flags, checked together; None when the job is on one machine
    (no --nnodes, or --nnodes 1: torchrun's --standalone, the other two flags ignored once
    valid, so a script may pass them for any node count)."""
    if nnodes is None:
        for flag, value in (("--node-rank", node_rank), ("--rdzv-endpoint", endpoint)):
            if value is not None:
                raise ConfigError(f"{flag}: only with --nnodes M (a job on M machines); add it")
        return None
    if node_rank is not None and node_rank >= nnodes:
        raise ConfigError(
            f"--node-rank {node_rank}: must be below --nnodes {nnodes} (0 to {nnodes - 1})"
        )
    host, port = parse_endpoint(endpoint) if endpoint is not None else ("", 0)
    if nnodes == 1:
        return None
    if endpoint is None:
        raise ConfigError(
            f"--nnodes {nnodes}: needs --rdzv-endpoint HOST:PORT, where the nodes meet (node "
            "0's address and a free port, the same on every node)"
        )
    return Nodes(nnodes, node_rank, host, port)


def launch_flags(
    nproc: int | None, nnodes: int | None, node_rank: int | None, endpoint: str | None
) -> list[str]:
    """The launch flags as given, for a printed command that must start the same job."""
    flags = ["--nproc", str(nproc)] if nproc is not None else []
    flags += ["--nnodes", str(nnodes)] if nnodes is not None else []
    flags += ["--node-rank", str(node_rank)] if node_rank is not None else []
    return flags + (["--rdzv-endpoint", endpoint] if endpoint is not None else [])


def under_torchrun() -> bool:
    """True inside a process that a torchrun-style launcher started (a rank of a job)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_args(nproc: int, command: list[str], nodes: Nodes | None = None) -> list[str]:
    """torchrun's argument list for `llmtrain <command...>` on `nproc` processes per node.

    Several nodes: the c10d rendezvous. torchrun ignores a node rank under c10d (it numbers
    the nodes as they join), so `--node-rank` becomes the one thing it decides there: node 0
    hosts the rendezvous store (`is_host`), the others only connect to it. torchrun's own guess
    (does HOST name this machine?) misses hosts reached through another interface's address."""
    program = ["-m", "llmtrain", *command]
    if nodes is None:
        return ["--standalone", f"--nproc_per_node={nproc}", *program]
    args = [f"--nnodes={nodes.count}", f"--nproc_per_node={nproc}"]
    args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={nodes.endpoint}"]
    args.append(f"--rdzv-id={nodes.rdzv_id}")
    if nodes.rank is not None:
        args.append(f"--rdzv-conf=is_host={str(nodes.rank == 0).lower()}")
    return [*args, *program]


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


def rendezvous_failure(error: Exception, nodes: Nodes | None) -> LLMTrainError | None:
    """torchrun's failures to bring the nodes together, as one line naming the flag."""
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousConnectionError,
        RendezvousTimeoutError,
    )

    if nodes is None:
        return None
    if isinstance(error, RendezvousConnectionError):
        role = {0: "host", None: "host or reach"}.get(nodes.rank, "reach")
        return LLMTrainError(
            f"--rdzv-endpoint {nodes.endpoint}: cannot {role} the rendezvous there "
            f"({' '.join(str(error.__cause__ or error).split())}); give node 0's address and a "
            "port free on it, the same on every node"
        )
    if isinstance(error, RendezvousTimeoutError):
        return LLMTrainError(
            f"--nnodes {nodes.count}: not every node joined the rendezvous at {nodes.endpoint} "
            "in time; start the same command on every node, each with its own --node-rank"
        )
    return None


def launch(
    nproc: int, command: list[str], *, device: str = "auto", nodes: Nodes | None = None
) -> int:
    """Run `llmtrain <command>` on `nproc` local ranks with torchrun (on each of `nodes`);
    returns the exit code: 0, or that of the first rank that failed (its message is already on
    stderr), or 128 + the signal that stopped this launcher (143 for SIGTERM: the ranks were
    passed it and saved a checkpoint)."""
    if under_torchrun():
        raise ConfigError("--nproc: already running under torchrun; drop --nproc")
    check_devices(nproc, device)
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(nproc))
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(nproc, command, nodes))
    if args.shutdown_timeout is None and SHUTDOWN_TIMEOUT_ENV not in os.environ:
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    try:
        run(args)
    except ChildFailedError as e:
        # The first rank that failed by itself: the others may have been stopped with a
        # signal (a negative code) when it died; those are reported as a runtime failure.
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c is not None and c > 0), 1)
    except SignalException as e:  # torchrun has passed the signal on and waited for the ranks
        return 128 + int(e.sigval)
    except Exception as e:
        failure = rendezvous_failure(e, nodes)
        if failure is None:
            raise
        raise failure from e
    sys.stdout.flush()
    return 0


def inherited_flags(env: Mapping[str, str] = os.environ) -> list[str]:
    """In a rank that `--nproc` started: the launch flags its launcher was given."""
    import shlex

    return shlex.split(env.get(LAUNCH_FLAGS_ENV, ""))
