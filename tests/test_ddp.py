"""Scale-out (docs/architecture.md, "Scale-out"): 2 ranks on CPU with gloo under torchrun.

Exactness is checked in fp64 on variable-length, padded data: the parameters after a few
steps on 2 ranks equal those of one process with the whole window in one micro-batch, to
1e-10 relative — with DDP, with a global batch that 2 does not divide (and an epoch tail that
leaves rank 1 with nothing), with FSDP2, and after a resume on 2 ranks from a checkpoint that
2 ranks wrote. Every multi-process case runs in ONE torchrun job (`_scenarios`), because
starting ranks (importing torch and transformers) is the expensive part on a small CI box.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_helpers import probe_with_one_rank_oom, run_command, run_function
from fit_helpers import FakeTokenizer, make_cfg, max_rel_diff, random_store, run_train
from typer.testing import CliRunner

from llmtrain.cli import app
from llmtrain.engine.metrics import TIMING_FIELDS, read_metrics
from llmtrain.engine.parallel import (
    full_model_state,
    full_optimizer_state,
    is_fsdp,
    load_full_state,
    no_sync_context,
    unwrap,
    wrap_model,
)
from llmtrain.launch import threads_per_rank, torchrun_args

TOL = 1e-10

# name → (make_cfg arguments, store size[, fault env]). Exactness shows from step 2 on.
SCENARIOS: dict[str, tuple] = {
    # 2 ranks × micro 2 × k 2 = global 8; eval sharded over ranks; checkpoints at 2 and 3
    "ddp": ({"micro": 2, "global_batch": 8, "train": {"save_every": 2, "eval_every": 2}}, 40),
    # 7 = 4 + 3 sequences, rank 0 cuts [3, 1], rank 1 [3]; 15 sequences → windows 7, 7, 1:
    # at step 3 rank 1 holds nothing and must still join the gradient all-reduce
    "uneven": ({"micro": 3, "global_batch": 7}, 15),
    "fsdp": (
        {
            "micro": 2,
            "global_batch": 8,
            "train": {"parallel": "fsdp", "save_every": 2, "eval_every": 2},
        },
        40,
    ),
    # rank 1 alone runs out of memory above 1 sequence: it re-runs the window with micro 1
    # (the other rank waits in the all-reduce), the update is unchanged, both continue at 1
    "oom-rank1": (
        {"micro": 2, "global_batch": 8},
        40,
        {"LLMTRAIN_FAULT_OOM_MICRO": "1", "LLMTRAIN_FAULT_OOM_RANK": "1"},
    ),
    # the same OOM raised inside rank 1's backward (a micro-batch under no_sync, part of its
    # gradients accumulated): the failed graph is dropped, the window re-run from zero
    "oom-rank1-backward": (
        {"micro": 2, "global_batch": 8},
        40,
        {
            "LLMTRAIN_FAULT_OOM_MICRO": "1",
            "LLMTRAIN_FAULT_OOM_RANK": "1",
            "LLMTRAIN_FAULT_OOM_IN": "backward",
        },
    ),
}
RESUMED = ("ddp", "fsdp")  # killed after step 2 (checkpoint written), resumed on 2 ranks


def _cfg(out: Path, name: str, **extra):
    kw = SCENARIOS[name][0]
    sections = {k: v for k, v in kw.items() if isinstance(v, dict)}
    plain = {k: v for k, v in kw.items() if not isinstance(v, dict)}
    for key, value in extra.items():
        sections[key] = {**sections.get(key, {}), **value}
    return make_cfg(out, steps=3, **plain, **sections)


def _store(name: str):
    return random_store(SCENARIOS[name][1], seed=1)


def _eval_store():
    return random_store(9, seed=2)


# ------------------------------------------------------------------------ the ranks' side
def _train_on_ranks(cfg, store, dist, *, resume=None):
    from llmtrain.engine.loop import train
    from llmtrain.engine.model import build_model

    tok = FakeTokenizer()
    model = build_model(cfg, tok, None)
    result = train(
        cfg,
        model,
        tok,
        store,
        _eval_store(),
        micro_batch=int(cfg.batch.micro_batch),
        device=torch.device("cpu"),
        dist=dist,
        resume=resume,
    )
    return model, result


def _scenarios(root: str) -> None:
    """Every 2-rank case; rank 0 saves the full weights of each as <root>/<name>.pt."""
    from llmtrain.engine.distributed import setup, teardown
    from llmtrain.engine.faults import SimulatedKill

    torch.set_num_threads(1)
    dist = setup(torch.device("cpu"))
    assert dist.world_size == 2
    try:
        for name, (_, _, *fault) in SCENARIOS.items():
            cfg = _cfg(Path(root) / name, name)
            os.environ.update(*fault)
            model, result = _train_on_ranks(cfg, _store(name), dist)
            for key in fault[0] if fault else ():
                del os.environ[key]
            (Path(root) / f"{name}-micro{dist.rank}.json").write_text(str(result.micro_batch))
            (Path(root) / f"{name}-sharded.json").write_text(json.dumps(is_fsdp(model)))
            state = full_model_state(model)  # a collective under FSDP
            if dist.is_main:
                torch.save(state, Path(root) / f"{name}.pt")
        for name in RESUMED:
            cfg = _cfg(Path(root) / f"{name}-resumed", name)
            os.environ.update(LLMTRAIN_FAULT_KILL="step_end:2", LLMTRAIN_FAULT_KILL_MODE="raise")
            try:
                _train_on_ranks(cfg, _store(name), dist)
                raise AssertionError("the kill point did not fire")
            except SimulatedKill:
                pass
            finally:
                del os.environ["LLMTRAIN_FAULT_KILL"]
            model, _ = _train_on_ranks(cfg, _store(name), dist, resume="auto")
            state = full_model_state(model)
            if dist.is_main:
                torch.save(state, Path(root) / f"{name}-resumed.pt")
        cfg = make_cfg(Path(root) / "probe", micro=2, batch={"probe": {"max_micro": 16}})
        probe_with_one_rank_oom(cfg, Path(root), dist)
    finally:
        teardown()


# ----------------------------------------------------------------------- the tests' side
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranks")
    res = run_function("test_ddp:_scenarios", str(root), check=False)
    (root / "output.txt").write_text(f"exit {res.returncode}\n{res.stdout}\n{res.stderr}")
    return root


def _load(root: Path, name: str):
    """A result file of the 2-rank job; a missing one fails with the job's output."""
    path = root / name
    if not path.is_file():
        pytest.fail(
            f"{name} was not written by the 2-rank job:\n"
            + (root / "output.txt").read_text()[-6000:]
        )
    return torch.load(path) if name.endswith(".pt") else json.loads(path.read_text())


def _single(tmp_path: Path, name: str):
    """One process, the whole window in one micro-batch (k 1): the reference."""
    G = SCENARIOS[name][0]["global_batch"]
    cfg = _cfg(tmp_path / f"single-{name}", name, batch={"micro_batch": G})
    model, _ = run_train(cfg, _store(name), _eval_store())
    return full_model_state(model), tmp_path / f"single-{name}"


def _records(out: Path, *, drop=("micro_batch", "grad_accum")) -> list[dict]:
    skip = set(TIMING_FIELDS) | set(drop)
    return [
        {k: v for k, v in r.items() if k not in skip} for r in read_metrics(out / "metrics.jsonl")
    ]


def _assert_records_close(a: list[dict], b: list[dict]) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key, va in ra.items():
            if isinstance(va, float):
                assert va == pytest.approx(rb[key], rel=1e-9, abs=1e-12), (key, ra, rb)
            else:
                assert va == rb[key], (key, ra, rb)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_one_process(two_ranks, tmp_path, name):
    ranks = _load(two_ranks, f"{name}.pt")
    single, single_out = _single(tmp_path, name)
    assert sorted(ranks) == sorted(single)
    assert max_rel_diff(single, ranks) < TOL
    # the weights moved: the comparison is not between two initial models
    init = make_cfg(tmp_path / "init")
    from llmtrain.engine.model import build_model

    start = full_model_state(build_model(init, FakeTokenizer(), None))
    assert max_rel_diff(single, start) > 1e-3
    # loss, grad_norm, lr and the sharded eval are the global ones, written once (rank 0)
    _assert_records_close(_records(two_ranks / name), _records(single_out))
    # both ranks end with the same micro-batch (after an OOM on one: the smaller)
    expected = 1 if name.startswith("oom-rank1") else SCENARIOS[name][0]["micro"]
    assert _load(two_ranks, f"{name}-micro0.json") == _load(two_ranks, f"{name}-micro1.json")
    assert _load(two_ranks, f"{name}-micro0.json") == expected
    assert _load(two_ranks, f"{name}-sharded.json") == (name == "fsdp")  # FSDP2 really ran


@pytest.mark.parametrize("name", RESUMED)
def test_resume_on_two_ranks_equals_the_uninterrupted_run(two_ranks, name):
    whole = _load(two_ranks, f"{name}.pt")
    resumed = _load(two_ranks, f"{name}-resumed.pt")
    assert max_rel_diff(whole, resumed) < TOL
    _assert_records_close(_records(two_ranks / name), _records(two_ranks / f"{name}-resumed"))
    assert (two_ranks / f"{name}-resumed" / "final" / "model.safetensors").is_file()


def test_probe_with_an_oom_on_one_rank_only_agrees_on_both(two_ranks):
    assert _load(two_ranks, "probe-rank0.json") == _load(two_ranks, "probe-rank1.json") == 3


def test_an_fsdp_checkpoint_has_the_single_process_format(two_ranks, tmp_path):
    """Weights and optimizer written by 2 FSDP ranks load into a plain single-process run."""
    from llmtrain.engine import checkpoint as ckpt

    cfg = _cfg(tmp_path / "plain", "fsdp", batch={"micro_batch": 8}, train={"parallel": "ddp"})
    found = ckpt.find_resume(two_ranks / "fsdp", "auto")
    assert found is not None and found.train.step == 3
    from llmtrain.engine.model import build_model
    from llmtrain.engine.optim import build_optimizer

    model = build_model(cfg, FakeTokenizer(), None)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ckpt.apply_checkpoint(
        found,
        model=model,
        optimizer=optimizer,
        parts={"scaler": scaler},
        device=torch.device("cpu"),
    )
    assert max_rel_diff(_load(two_ranks, "fsdp.pt"), full_model_state(model)) == 0.0
    assert len(optimizer.state) == len(list(model.parameters()))
    # final/ (gathered by FSDP, saved by rank 0) is an ordinary transformers model directory
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(two_ranks / "fsdp" / "final", dtype=torch.float64)
    assert final.config.architectures == ["GPT2LMHeadModel"]
    assert max_rel_diff(_load(two_ranks, "fsdp.pt"), full_model_state(final)) == 0.0


# ----------------------------------------------------------- CLI: --nproc and torchrun -m
SENTENCE = "the cat sat on a mat and the dog ran to the red ball while birds sang"


def _cli_config(tmp_path: Path, **batch: object) -> Path:
    words = SENTENCE.split()
    lines = [" ".join(words[i % 15 :] + words[: i % 15]) + "." for i in range(120)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(lines), encoding="utf-8")
    cfg = {
        "run": {"name": "ddp", "output_dir": str(tmp_path / "run"), "seed": 0, "device": "cpu"},
        "model": {
            "arch": "gpt2",
            "config": {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32},
        },
        "tokenizer": {"train": {"kind": "bpe", "vocab_size": 96}},
        "data": {
            "train": {"path": str(tmp_path / "corpus.txt"), "split": "paragraphs"},
            "eval_fraction": 0.2,
            "chunk": {"seq_len": 32, "mode": "pack"},
        },
        "batch": {"global_batch": 6, "micro_batch": 2, **batch},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "train": {"max_steps": 2, "precision": "fp32", "eval_every": 2, "save_every": 2},
        "log": {"progress": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def test_fit_nproc_2_probes_trains_and_rank_0_alone_writes(tmp_path):
    """`llmtrain fit --nproc 2` = torchrun -m llmtrain fit: the tokenizer and stores built
    once, `micro_batch: auto` probed on both ranks with an OOM on rank 1 only (the agreed
    answer is rank 1's limit, and nobody hangs), one banner, one metrics file."""
    config = _cli_config(tmp_path, micro_batch="auto", probe={"max_micro": 8})
    env = {"LLMTRAIN_FAULT_OOM_MICRO": "2", "LLMTRAIN_FAULT_OOM_RANK": "1"}
    cmd = [sys.executable, "-m", "llmtrain", "fit", str(config), "--nproc", "2"]
    res = run_command(cmd, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("llmtrain fit") == 1  # one banner: rank 0 prints
    assert "micro 2 × k 2 × world 2 → global 6" in res.stdout
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("split") == "train"] == [1, 2]
    assert len([r for r in records if r.get("split") == "eval"]) == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("sets", "phase", "message"),
    [
        pytest.param(["train.parallel=fsdp"], "forward", "under train.parallel: fsdp", id="fsdp"),
        # micro 3 = each rank's whole share of 6: the one micro-batch is the syncing one, and
        # its backward is where DDP all-reduces the gradients bucket by bucket
        pytest.param(
            ["batch.micro_batch=3"],
            "backward",
            "inside the window's last backward, while DDP was all-reducing",
            id="ddp-syncing-backward",
        ),
    ],
)
def test_a_failure_on_one_rank_ends_the_job_with_its_message_and_code(
    tmp_path, sets, phase, message
):
    """An OOM on rank 1 only where no recovery is possible: under FSDP (rank 0 waits inside
    an all-gather), or under DDP inside the backward that reduces gradients (rank 0 waits
    inside that all-reduce, and rank 1's reducer is mid-iteration: a retry would pair its
    buckets with the wrong ones or fail in DDP's own check). Rank 1 stops with a message,
    torchrun's launcher stops rank 0, and `fit --nproc` exits 1 (no hang, nothing saved)."""
    config = _cli_config(tmp_path)
    env = {
        "LLMTRAIN_FAULT_OOM_MICRO": "1",
        "LLMTRAIN_FAULT_OOM_RANK": "1",
        "LLMTRAIN_FAULT_OOM_IN": phase,
    }
    cmd = [sys.executable, "-m", "llmtrain", "fit", str(config), "--nproc", "2"]
    res = run_command([*cmd, *(a for kv in sets for a in ("--set", kv))], env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"rank 1: error: out of memory at step 1 on rank 1 {message}" in res.stderr, res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nproc_hands_the_command_to_torchrun(tmp_path, monkeypatch):
    """The relaunched command is the same command without --nproc (torchrun adds ranks)."""
    import llmtrain.launch

    calls = []
    monkeypatch.setattr(
        llmtrain.launch,
        "launch",
        lambda n, argv, device, nodes=None: calls.append((n, argv, device)) or 3,
    )
    config = _cli_config(tmp_path)
    res = CliRunner().invoke(app, ["probe-batch", str(config), "--nproc", "4", "--json"])
    assert res.exit_code == 3  # the ranks' exit code
    res = CliRunner().invoke(
        app, ["fit", str(config), "--nproc", "2", "--resume", "auto", "-s", "train.max_steps=1"]
    )
    assert calls == [
        (4, ["probe-batch", str(config), "--json"], "cpu"),
        (2, ["fit", str(config), "--resume", "auto", "--set", "train.max_steps=1"], "cpu"),
    ]


# ------------------------------------------------------------------ in-process unit tests
def test_every_rank_runs_the_busiest_ranks_micro_batch_count():
    from llmtrain.data.batching import micro_steps, rank_share, split_micro

    for n, micro, world in [(7, 3, 2), (8, 2, 2), (1, 2, 2), (5, 1, 4), (9, 4, 3)]:
        window = np.arange(n)
        counts = [len(split_micro(rank_share(window, r, world), micro)) for r in range(world)]
        assert micro_steps(n, micro, world) == max(counts)
        assert np.array_equal(
            np.concatenate([rank_share(window, r, world) for r in range(world)]), window
        )


def test_torchrun_arguments_and_threads():
    assert torchrun_args(4, ["fit", "c.yaml", "--set", "a=1"]) == [
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "llmtrain",
        "fit",
        "c.yaml",
        "--set",
        "a=1",
    ]
    assert threads_per_rank(2, cores=16) == 8
    assert threads_per_rank(4, cores=2) == 1


def test_nproc_inside_torchrun_is_a_usage_error(tmp_path, monkeypatch):
    config = _cli_config(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    res = CliRunner().invoke(app, ["fit", str(config), "--nproc", "2"])
    assert res.exit_code == 2
    assert "already running under torchrun" in res.output


def test_world_of_one_is_not_wrapped_and_full_state_round_trips(tmp_path):
    from llmtrain.engine.distributed import DistInfo
    from llmtrain.engine.model import build_model
    from llmtrain.engine.optim import build_optimizer

    cfg = make_cfg(tmp_path)
    model = build_model(cfg, FakeTokenizer(), None)
    wrapped = wrap_model(model, cfg, DistInfo(), torch.device("cpu"))
    assert wrapped is model and unwrap(wrapped) is model
    with no_sync_context(wrapped, last=False):
        pass
    optimizer = build_optimizer(cfg, model)
    x = torch.randint(2, 64, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    state = full_model_state(model)
    assert len(state.keys() & {"lm_head.weight", "transformer.wte.weight"}) == 1  # tied: once
    optim_state = full_optimizer_state(model, optimizer)
    assert optim_state.keys() == {"state", "param_groups"}
    fresh = build_model(cfg, FakeTokenizer(), None)
    fresh_opt = build_optimizer(cfg, fresh)
    load_full_state(fresh, fresh_opt, state, optim_state)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert max_rel_diff(state, full_model_state(fresh)) == 0.0
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    # a full state lacking a weight is refused: only a PEFT (trainable-only) state is partial
    weights = {k: v for k, v in full_model_state(model).items() if k != "lm_head.weight"}
    with pytest.raises(RuntimeError, match="Missing key"):
        load_full_state(fresh, None, weights, None)
