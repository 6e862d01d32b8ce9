"""Several nodes (issue 21, item 2): `fit --nproc N --nnodes M --node-rank R --rdzv-endpoint
HOST:PORT` is torchrun's c10d rendezvous, and every rank must see the run directory.

End to end, two launchers on this machine stand for two nodes of one job (127.0.0.1, one
process each, gloo, fp64): node 0 through `python -m llmtrain fit ... --nnodes 2 --node-rank 0
--rdzv-endpoint`, node 1 through plain `python -m torch.distributed.run --rdzv-backend c10d ...
-m llmtrain fit`, so both ways are shown to meet in one job. The weights after training equal
one process's (1e-10 relative, see node_helpers.TOL); killed on both nodes after step 2 and
resumed, they equal the uninterrupted run's bit for bit; started from different working
directories with a relative output_dir, every rank refuses with one line and nothing is
written. The rest are in-process checks of the flags.
"""

from __future__ import annotations

import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from dist_helpers import run_command
from fit_helpers import max_rel_diff
from node_helpers import STEPS, TOL, free_port, one_process, train_steps, weights, write_run_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmtrain import cli
from llmtrain.cli import app
from llmtrain.errors import LLMTrainError
from llmtrain.launch import (
    LAUNCH_FLAGS_ENV,
    Nodes,
    inherited_flags,
    launch_flags,
    parse_nodes,
    rendezvous_failure,
    torchrun_args,
)

HOST = "127.0.0.1"
TIMEOUT = 300.0  # seconds per launcher: two jobs' worth of processes share 2 loaded cores


def _node0(config: Path, port: int, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "llmtrain", "fit", str(config), "--nproc", "1"),
        *("--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", f"{HOST}:{port}", *extra),
    ]


def _node1(config: Path, port: int, *extra: str) -> list[str]:
    """Plain torchrun with the rendezvous id the README gives. `is_host=false`: on a second
    machine torchrun sees that the endpoint is not its own; here both are this machine."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"),
        *("--rdzv-backend=c10d", f"--rdzv-endpoint={HOST}:{port}"),
        *(f"--rdzv-id=llmtrain-{HOST}-{port}", "--rdzv-conf=is_host=false"),
        *("-m", "llmtrain", "fit", str(config), *extra),
    ]


def _two_nodes(config: Path, *extra: str, env=None, cwds=(None, None)) -> list:
    """Both launchers at once (each under run_command's hard timeout); their results."""
    port = free_port()
    commands = (_node0(config, port, *extra), _node1(config, port, *extra))
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(run_command, cmd, env=env, cwd=cwd, timeout=TIMEOUT)
            for cmd, cwd in zip(commands, cwds, strict=True)
        ]
        return [j.result() for j in jobs]


def _ok(results: list) -> None:
    for res in results:
        assert res.returncode == 0, f"{res.args}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, object]:
    """The expensive part, once: an uninterrupted 2-node run, and one killed after step 2 on
    both nodes (os._exit at the kill point, as a crash) then resumed."""
    root = tmp_path_factory.mktemp("nodes")
    whole = write_run_config(root / "whole", root / "whole" / "run")
    killed = write_run_config(root / "killed", root / "killed" / "run")
    return {
        "whole": (whole, _two_nodes(whole)),
        "killed": (killed, _two_nodes(killed, env={"LLMTRAIN_FAULT_KILL": "step_end:2"})),
        "resumed": (killed, _two_nodes(killed, "--resume", "auto")),
    }


@pytest.mark.slow  # a 2-node run (~20 s) and one process
def test_two_nodes_train_what_one_process_trains(runs):
    config, results = runs["whole"]
    _ok(results)
    run = config.parent / "run"
    stdout = "".join(r.stdout for r in results)
    assert stdout.count("llmtrain fit") == 1  # one banner: global rank 0, on either node
    assert "micro 4 × k 1 × world 2 → global 8" in stdout
    assert train_steps(run) == list(range(1, STEPS + 1))  # one writer: each step once
    final = weights(run)
    assert max_rel_diff(one_process(config), final) < TOL
    # the weights moved since step 2: the comparison is not between two barely trained models
    start = load_file(str(run / "checkpoints" / "step-00000002" / "model.safetensors"))
    shared = {k: v for k, v in final.items() if k in start}  # the tied embedding: 2 names
    assert len(shared) == len(final) - 1 and max_rel_diff(shared, start) > 1e-3
    assert not list(run.glob(".tmp-*"))  # the shared-directory check left nothing


@pytest.mark.slow  # two 2-node runs
def test_killed_on_both_nodes_and_resumed_equals_the_uninterrupted_run(runs):
    config, killed = runs["killed"]
    run = config.parent / "run"
    assert killed[0].returncode == 137, killed[0].stderr  # `fit --nnodes`: the rank's code
    assert killed[1].returncode != 0  # plain torchrun: 1
    _, resumed = runs["resumed"]
    _ok(resumed)
    assert train_steps(run) == list(range(1, STEPS + 1))  # 1-2 before the kill, 3-6 after
    whole, again = weights(runs["whole"][0].parent / "run"), weights(run)
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[k], again[k]) for k in whole)


@pytest.mark.slow  # a 2-node job that stops at the check (~15 s)
def test_a_run_directory_one_node_does_not_see_is_refused_on_every_node(tmp_path):
    """A relative output_dir and each node in its own working directory: two directories."""
    config = write_run_config(tmp_path, "run")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    results = _two_nodes(config, cwds=(a, b))
    host = socket.gethostname()
    for res in results:
        assert res.returncode != 0
        lines = [x for x in res.stderr.splitlines() if "every node sees" in x]
        assert len(lines) == 1, res.stderr  # one line from the node's one rank
        line = lines[0]
        assert "run.output_dir run: rank " in line and f"(host {host}, as " in line
        assert str(a / "run") in line and str(b / "run") in line
        assert "output_dir must be on a filesystem every node sees" in line
    assert "Traceback" not in results[0].stderr  # `llmtrain fit --nnodes` prints no traceback
    assert not (a / "run").exists() and not (b / "run").exists()  # nothing written


@pytest.mark.slow  # one launcher process (~10 s)
def test_an_endpoint_node_0_cannot_host_is_one_line_naming_the_flag(tmp_path):
    config = write_run_config(tmp_path, tmp_path / "run")
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_command(_node0(config, port), timeout=TIMEOUT)
    assert res.returncode == 1, res.stderr
    assert f"error: --rdzv-endpoint {HOST}:{port}: cannot host the rendezvous there (" in (
        res.stderr
    )
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------ the flags, in-process
def test_several_nodes_are_torchruns_c10d_rendezvous():
    from torch.distributed.run import get_args_parser

    nodes = Nodes(count=3, rank=1, host="node-a", port=29400)
    args = torchrun_args(4, ["fit", "c.yaml"], nodes)
    assert args == [
        "--nnodes=3",
        "--nproc_per_node=4",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node-a:29400",
        "--rdzv-id=llmtrain-node-a-29400",
        "--rdzv-conf=is_host=false",
        *("-m", "llmtrain", "fit", "c.yaml"),
    ]
    parsed = get_args_parser().parse_args(args)  # torchrun's own parser reads them so
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_backend) == ("3", "4", "c10d")
    assert (parsed.rdzv_endpoint, parsed.rdzv_id) == ("node-a:29400", "llmtrain-node-a-29400")
    assert parsed.module and parsed.training_script == "llmtrain" and not parsed.standalone
    assert parsed.rdzv_conf == "is_host=false"
    head = torchrun_args(1, ["fit", "c.yaml"], Nodes(2, 0, "node-a", 29400))
    assert "--rdzv-conf=is_host=true" in head  # node 0 hosts the store
    unsaid = torchrun_args(1, ["fit", "c.yaml"], Nodes(2, None, "node-a", 29400))
    assert not any(a.startswith("--rdzv-conf") for a in unsaid)  # torchrun guesses
    v6 = Nodes(2, 0, "fe80::1", 29400)
    assert v6.endpoint == "[fe80::1]:29400" and v6.rdzv_id == "llmtrain-fe80__1-29400"
    assert torchrun_args(2, ["fit", "c.yaml"])[:2] == ["--standalone", "--nproc_per_node=2"]


def test_the_node_flags_are_checked_together():
    assert parse_nodes(None, None, None) is None
    assert parse_nodes(2, 1, "node-a:29400") == Nodes(2, 1, "node-a", 29400)
    assert parse_nodes(2, None, "[::1]:29400") == Nodes(2, None, "::1", 29400)
    # one node: torchrun --standalone; a script may pass the other two for any node count
    assert parse_nodes(1, 0, "node-a:29400") is None
    assert parse_nodes(1, None, None) is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nnodes", "2"], "--nnodes 2: needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank 2: must"),
        (["--node-rank", "0"], "--node-rank: only with --nnodes M"),
        (["--rdzv-endpoint", "h:1"], "--rdzv-endpoint: only with --nnodes M"),
        (["--nnodes", "2", "--rdzv-endpoint", "node-a"], "--rdzv-endpoint 'node-a': expected"),
        (["--nnodes", "2", "--rdzv-endpoint", "node-a:0"], "--rdzv-endpoint 'node-a:0': exp"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:70000"], "--rdzv-endpoint 'h:70000': expected"),
        (["--nnodes", "2", "--rdzv-endpoint", ":29400"], "--rdzv-endpoint ':29400': expected"),
        (["--nnodes", "2", "--rdzv-endpoint", "a b:1"], "--rdzv-endpoint 'a b:1': expected"),
        (["--nnodes", "1", "--node-rank", "1"], "--node-rank 1: must be below --nnodes 1"),
    ],
)
@pytest.mark.parametrize("command", ["fit", "probe-batch"])
def test_a_bad_node_flag_is_a_one_line_usage_error(tmp_path, command, flags, message):
    config = write_run_config(tmp_path, tmp_path / "run")
    res = CliRunner().invoke(app, [command, str(config), *flags])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [res.output.strip()]  # one line
    assert message in res.output


def test_the_node_flags_reach_the_launcher_even_with_one_process_per_node(tmp_path, monkeypatch):
    import llmtrain.launch

    calls = []

    def launch(nproc, argv, *, device, nodes):
        calls.append((nproc, argv, nodes, os.environ[LAUNCH_FLAGS_ENV]))
        return 0

    monkeypatch.setattr(llmtrain.launch, "launch", launch)
    monkeypatch.delenv(LAUNCH_FLAGS_ENV, raising=False)
    config = str(write_run_config(tmp_path, tmp_path / "run"))
    node = ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node-a:29400"]
    for argv in (
        ["fit", config, "--nproc", "1", *node, "--resume", "auto"],
        ["fit", config, *node],  # --nproc left out: one process per node
        ["probe-batch", config, "--nproc", "2", *node, "--json"],
        ["fit", config, "--nproc", "2", "--nnodes", "1", "--rdzv-endpoint", "node-a:1"],
    ):
        res = CliRunner().invoke(app, argv)
        assert res.exit_code == 0, res.output
    nodes = Nodes(2, 1, "node-a", 29400)
    assert calls == [
        (1, ["fit", config, "--resume", "auto"], nodes, f"--nproc 1 {' '.join(node)}"),
        (1, ["fit", config], nodes, " ".join(node)),
        (2, ["probe-batch", config, "--json"], nodes, f"--nproc 2 {' '.join(node)}"),
        (2, ["fit", config], None, "--nproc 2 --nnodes 1 --rdzv-endpoint node-a:1"),
    ]
    assert LAUNCH_FLAGS_ENV not in os.environ  # set for the launch only
    # --nproc 1 on one machine: nothing to launch (trained in this process)
    import llmtrain.commands.fit

    monkeypatch.setattr(llmtrain.launch, "launch", lambda *a, **k: pytest.fail("launched"))
    monkeypatch.setattr(llmtrain.commands.fit, "execute", lambda cfg, **kw: calls.append(kw))
    res = CliRunner().invoke(app, ["fit", config, "--nproc", "1", "--nnodes", "1"])
    assert res.exit_code == 0, res.output
    assert calls[-1]["resume"] is None  # executed here


def test_the_resume_command_repeats_the_launch_flags(monkeypatch):
    flags = launch_flags(4, 2, 1, "node-a:29400")
    assert cli._resume_command("c.yaml", ["train.max_steps=9"], flags) == (
        "llmtrain fit c.yaml --set train.max_steps=9 --nproc 4 --nnodes 2 --node-rank 1 "
        "--rdzv-endpoint node-a:29400 --resume auto"
    )
    assert cli._resume_command("c.yaml", None, []) == "llmtrain fit c.yaml --resume auto"
    # a rank that `--nproc` started reads its launcher's flags from the environment
    assert inherited_flags({LAUNCH_FLAGS_ENV: "--nproc 2 --rdzv-endpoint 'a b'"}) == [
        *("--nproc", "2", "--rdzv-endpoint", "a b")
    ]
    assert inherited_flags({}) == []


def test_the_launcher_gives_the_ranks_time_to_save_and_exits_143_on_sigterm(monkeypatch):
    """torchrun's agent passes a SIGTERM on to the ranks and kills them `shutdown_timeout`
    seconds later: the launcher raises its default (30 s) above a checkpoint write, unless
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise; once the ranks are down it exits 128 + 15."""
    import signal

    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing import SignalException

    import llmtrain.launch

    seen = []

    def run(args):
        seen.append(args.shutdown_timeout)
        raise SignalException("got SIGTERM", signal.SIGTERM)

    monkeypatch.setattr(torch.distributed.run, "run", run)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(llmtrain.launch.SHUTDOWN_TIMEOUT_ENV, raising=False)
    nodes = Nodes(2, 0, HOST, 29400)
    assert llmtrain.launch.launch(1, ["fit", "c.yaml"], device="cpu", nodes=nodes) == 143
    monkeypatch.setenv(llmtrain.launch.SHUTDOWN_TIMEOUT_ENV, "50")  # torchrun reads it itself
    assert llmtrain.launch.launch(2, ["fit", "c.yaml"], device="cpu") == 143
    assert seen == [llmtrain.launch.SHUTDOWN_TIMEOUT_S, None]
    assert llmtrain.launch.SHUTDOWN_TIMEOUT_S > 120  # more than fit.sbatch's margin


def test_rendezvous_failures_name_the_flag():
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousConnectionError,
        RendezvousTimeoutError,
    )

    nodes = Nodes(2, 1, "node-a", 29400)
    error = RendezvousConnectionError("The connection to the C10d store has failed.")
    error.__cause__ = RuntimeError("connect() timed out.\n  more")
    failure = rendezvous_failure(error, nodes)
    assert isinstance(failure, LLMTrainError)
    assert str(failure).startswith(
        "--rdzv-endpoint node-a:29400: cannot reach the rendezvous there (connect() timed out. "
        "more); give node 0's address"
    )
    timeout = rendezvous_failure(RendezvousTimeoutError("late"), nodes)
    assert str(timeout).startswith("--nnodes 2: not every node joined the rendezvous at node-a")
    assert rendezvous_failure(ValueError("x"), nodes) is None
    assert rendezvous_failure(error, None) is None  # one machine: torchrun's own message


# --------------------------------------------------------- the shared run directory check
class _Ranks:
    """Stands in for the collectives: rank 0's broadcast reaches rank 1, which sees the note
    in `rank1_dir` (None: where rank 0 wrote it)."""

    def __init__(self, rank1_dir: Path | None):
        self.rank1_dir = rank1_dir
        self.seen: list = []

    def broadcast(self, note):
        self.note = note
        return note

    def gather(self, mine):
        from llmtrain.rundir import shared_fs

        where = self.rank1_dir or Path(mine.path)
        sees = shared_fs.finds(where / self.note[0], self.note[1])
        self.seen.append(list(where.iterdir()))
        return [mine, shared_fs.Sighting(1, "node-b", str(where), sees)]


def _check(monkeypatch, out: Path, ranks: _Ranks) -> None:
    from llmtrain.engine.distributed import DistInfo
    from llmtrain.rundir import shared_fs

    monkeypatch.setattr(shared_fs, "broadcast_object", ranks.broadcast)
    monkeypatch.setattr(shared_fs, "all_gather_objects", ranks.gather)
    monkeypatch.setattr(shared_fs, "LOOK_AGAIN_S", 0.3)
    shared_fs.check_shared_run_dir(out, DistInfo(rank=0, world_size=2))


def test_the_check_passes_a_shared_directory_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "new" / "run"
    ranks = _Ranks(None)
    _check(monkeypatch, out, ranks)
    (note,) = ranks.seen[0]  # rank 1 looked while the note was there
    assert note.name.startswith(".tmp-shared-fs-") and note.name.endswith(f"-{os.getpid()}")
    assert list(out.iterdir()) == []  # removed; the folder stays (the run goes on in it)


def test_the_check_refuses_an_unseen_directory_and_removes_what_it_made(tmp_path, monkeypatch):
    out, elsewhere = tmp_path / "new" / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(LLMTrainError) as e:
        _check(monkeypatch, out, _Ranks(elsewhere))
    assert str(e.value) == (
        f"run.output_dir {out}: rank 1 (host node-b, as {elsewhere}) does not see what rank 0 "
        f"(host {socket.gethostname()}) writes to {out}; output_dir must be on a filesystem "
        "every node sees: give an absolute path on shared storage"
    )
    assert not (tmp_path / "new").exists()  # the folders the note created are gone


def test_the_check_stops_every_rank_when_rank_0_cannot_write(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LLMTrainError, match=r"cannot write there .*choose a writable directory"):
        _check(monkeypatch, tmp_path / "file" / "run", _Ranks(None))


def test_the_refusal_lists_a_few_ranks():
    from llmtrain.rundir.shared_fs import Sighting, refusal

    zero = Sighting(0, "h0", "/shared/run", True)
    blind = [Sighting(r, f"h{r}", "/shared/run", False) for r in range(1, 7)]
    line = refusal("/shared/run", zero, blind)
    assert "ranks 1 (host h1), 2 (host h2), 3 (host h3), 4 (host h4) and 2 more do not see" in (
        line
    )
    assert "\n" not in line


def test_a_world_of_one_has_nothing_to_check(tmp_path):
    from llmtrain.engine.distributed import DistInfo
    from llmtrain.rundir.shared_fs import check_shared_run_dir

    check_shared_run_dir(tmp_path / "run", DistInfo())
    assert not (tmp_path / "run").exists()
