"""scripts/slurm/fit.sbatch (issue 21, item 3): the script's logic on this machine, not SLURM.

`bash fit.sbatch CONFIG` runs with the job's variables set by hand and stand-ins for `srun`
(the command once per node, SLURM_NODEID set, TERM passed on, the highest exit code) and
`scontrol` (`show hostnames` → 127.0.0.1 per node; `requeue` → recorded in a file) first on
PATH: 2 nodes × 1 rank, gloo, fp64. Each rank waits at the end of step 2 for a SIGTERM
(LLMTRAIN_FAULT_KILL_MODE=await-sigterm), so the test knows where the run stops; the TERM goes
to the batch shell, as `--signal=B:TERM@120` sends it. The shell must pass it on, the ranks
save and exit 143, the script asks for a requeue; run again as the requeued job
(SLURM_RESTART_COUNT=1) it resumes, and the weights equal one process's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_helpers import kill_tree, run_command, worker_env
from fit_helpers import max_rel_diff
from node_helpers import STEPS, TOL, free_port, one_process, train_steps, weights, write_run_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm" / "fit.sbatch"
JOB_ID = "4242"

SRUN = r"""#!/bin/bash
# Stand-in for srun: the command once per node (SLURM_NNODES) in the background, each with its
# SLURM_NODEID and SLURM_PROCID; TERM passed on to them; the highest exit code, as srun.
while [[ $# -gt 0 && $1 == -* ]]; do shift; done  # srun's own options
echo "$*" >> "$SRUN_LOG"
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
  pids+=("$!")
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
highest=0
for pid in "${pids[@]}"; do
  while :; do
    code=0
    wait "$pid" || code=$?
    if (( code <= 128 )) || ! kill -0 "$pid" 2>/dev/null; then break; fi
  done
  if (( code > highest )); then highest=$code; fi
done
exit "$highest"
"""

SCONTROL = r"""#!/bin/bash
# Stand-in for scontrol: `show hostnames` prints this machine once per node; `requeue ID`
# records ID.
case "$1 ${2:-}" in
  "show hostnames") for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done ;;
  requeue*) echo "requeue $2" >> "$REQUEUE_LOG" ;;
  *) echo "scontrol stand-in: unexpected $*" >&2; exit 1 ;;
esac
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[str, object]:
    """The stand-ins on PATH, a config, and the job's environment (a free rendezvous port)."""
    root = tmp_path_factory.mktemp("slurm")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text, encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "GPUS_PER_NODE": "1",
        "RDZV_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "SRUN_LOG": str(root / "srun.log"),
        "REQUEUE_LOG": str(root / "requeue.log"),
    }
    return {"root": root, "env": env, "config": write_run_config(root, root / "run")}


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").is_file() and step in train_steps(run)):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc.pid)
            pytest.fail(f"no step {step} (exit {proc.poll()}):\n{out.read_text()[-6000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stopped(job) -> tuple[int, str]:
    """The first run: SIGTERM to the batch shell once step 2 is logged; (exit code, output)."""
    root, config = job["root"], job["config"]
    env = {**job["env"], "LLMTRAIN_FAULT_KILL": "step_end:2"}
    env["LLMTRAIN_FAULT_KILL_MODE"] = "await-sigterm"
    out = root / "first.out"
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT), str(config), "--overwrite", "--yes"],
            env=worker_env(env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        _wait_for_step(root / "run", 2, proc, out)
        proc.send_signal(signal.SIGTERM)  # the batch shell alone, as B:TERM does
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            pytest.fail(f"the job did not stop on TERM:\n{out.read_text()[-6000:]}")
    return code, out.read_text()


@pytest.mark.slow  # two 2-node runs (~25 s each on a loaded 2-core machine)
def test_term_to_the_batch_shell_saves_requeues_and_the_requeued_job_resumes(job, stopped):
    root, config, env = job["root"], job["config"], job["env"]
    code, output = stopped
    run = root / "run"
    assert code == 143, output
    assert (root / "requeue.log").read_text().split() == ["requeue", JOB_ID]
    assert output.count("stopped by SIGTERM after step 2") == 2  # both ranks, at step 2
    for node in (0, 1):  # and each says how its node continues
        flags = f"--nproc 1 --nnodes 2 --node-rank {node} --rdzv-endpoint 127.0.0.1:"
        assert f"resume with: llmtrain fit {config} {flags}" in output, output
    assert train_steps(run) == [1, 2]
    assert not (run / "final").exists()

    requeued = run_command(
        ["bash", str(SCRIPT), str(config), "--overwrite", "--yes"],
        env={**env, "SLURM_RESTART_COUNT": "1"},
        timeout=300,
    )
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    first, second = (root / "srun.log").read_text().splitlines()
    assert "--overwrite" in first and "--resume" not in first
    assert "--resume auto" in second and "--overwrite" not in second and "--yes" not in second
    assert f"--nproc 1 --nnodes 2 --rdzv-endpoint 127.0.0.1:{env['RDZV_PORT']}" in second
    assert (root / "requeue.log").read_text().count("requeue") == 1  # a finished job is not
    assert train_steps(run) == list(range(1, STEPS + 1))  # resumed after 2, each step once
    assert max_rel_diff(one_process(config), weights(run)) < TOL


def test_the_script_is_valid_bash_and_refuses_to_run_outside_a_job(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", str(SCRIPT), "c.yaml"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "submit it with sbatch" in res.stderr
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "usage: sbatch" in res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_script_is_shellcheck_clean():
    res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_the_script_asks_slurm_for_what_the_requeue_needs():
    """The directives that the requeue depends on (a comment cannot test SLURM itself)."""
    directives = [
        line.split(None, 1)[1]
        for line in SCRIPT.read_text().splitlines()
        if line.startswith("#SBATCH")
    ]
    for needed in ("--ntasks-per-node=1", "--signal=B:TERM@120", "--requeue", "--open-mode=append"):
        assert needed in directives


# ------------------------------------------------------- the fault hook the test relies on
def test_await_sigterm_waits_at_its_point_until_a_sigterm_arrives(monkeypatch):
    import threading

    from llmtrain.engine import faults, signals

    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:2")
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "await-sigterm")
    faults.kill_point("step_end:1")  # another point: returns at once
    with signals.sigterm_guard():
        signals.defer_to_step_end()
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        started = time.monotonic()
        timer.start()
        faults.kill_point("step_end:2")
        assert time.monotonic() - started >= 0.25
        assert signals.requested()
    with signals.sigterm_guard(), pytest.raises(faults.SimulatedKill, match="no SIGTERM"):
        faults.await_sigterm("step_end:2", limit_s=0.1)
