"""Run code on several CPU processes under torchrun (gloo), for the scale-out tests.

Always the real launcher (`python -m torch.distributed.run --standalone`: rendezvous on a free
localhost port), with a hard timeout: a collective that one rank never joins makes the test
fail in seconds with every rank's output, instead of hanging CI.

- `torchrun(args)`: `torchrun --standalone --nproc_per_node=N <args>`, e.g. `-m llmtrain fit C`.
- `run_function("module:function", *args)`: call a function of a test module on every rank
  (the tests folder is on the path); arguments are strings.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DEFAULT_TIMEOUT = 180.0  # seconds; a deadlock fails the test instead of hanging CI


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ranks' environment: one thread each (tiny models; two ranks share two cores), no
    inherited torchrun variables, and the tests folder importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith("TORCHELASTIC")
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def torchrun(
    args: list[str],
    *,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node=nproc <args>`; output captured; fails the test
    (after killing every process of the job) when it runs past `timeout`."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    return run_command(cmd, env=env, timeout=timeout, cwd=cwd)


def run_command(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in its own process group with a hard timeout (the launcher and every rank are
    killed together when it expires)."""
    proc = subprocess.Popen(
        cmd,
        env=worker_env(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(
            f"timed out after {timeout:.0f}s (deadlock?): {' '.join(cmd)}\n"
            f"--- stdout\n{out}\n--- stderr\n{err}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it. torchrun starts each rank in a session of
    its own: killing the launcher's process group alone left deadlocked ranks running after
    the test had failed."""
    for each in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children before their own children)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def run_function(
    target: str,
    *args: str,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Call `module:function(*args)` on `nproc` ranks; with `check`, asserts all exited 0."""
    res = torchrun([__file__, target, *args], nproc=nproc, env=env, timeout=timeout)
    if not check:
        return res
    assert res.returncode == 0, (
        f"{target} failed:\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    )
    return res


def probe_with_one_rank_oom(cfg, root: Path, dist) -> None:
    """On every rank: the probe for `cfg` with the fault hook on rank 1 only (its trials above
    3 fail, rank 0's do not); each rank writes its answer to <root>/probe-rank<r>.json. Both
    must leave the probe (no collective left waiting) with the same answer."""
    import json

    import torch
    from fit_helpers import FakeTokenizer

    from llmtrain.engine.model import build_model
    from llmtrain.probe import probe_for_config

    os.environ.update(LLMTRAIN_FAULT_OOM_MICRO="3", LLMTRAIN_FAULT_OOM_RANK="1")
    model = build_model(cfg, FakeTokenizer(), None)
    result = probe_for_config(cfg, model, torch.device("cpu"), dist=dist, use_cache=False)
    (root / f"probe-rank{dist.rank}.json").write_text(json.dumps(result.micro_batch))


def _main() -> None:
    """Worker side of `run_function`: import the module and call the function."""
    sys.path.insert(0, str(TESTS))
    module, function = sys.argv[1].split(":")
    getattr(importlib.import_module(module), function)(*sys.argv[2:])


if __name__ == "__main__":
    _main()
