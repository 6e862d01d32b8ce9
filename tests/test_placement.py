"""Per-rank bytes under ddp / fsdp (llmtrain/engine/placement.py) and what `fit --dry-run`
shows of them on several ranks.

The arithmetic is checked on hand-made shapes; then against what 2 gloo ranks really hold
(one torchrun job, `_measure_on_ranks`): FSDP2's local shards, its padded storage, the
reduce-scattered gradients, the optimizer state after a step and the unsharded gradients it
accumulates without sync, and DDP's all-reduce buckets beside `.grad`.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from dist_helpers import run_command, run_function
from fit_helpers import FakeTokenizer, make_cfg
from rich.console import Console
from run_helpers import tiny_lm_config, write_config, write_corpus

from llmtrain.engine.distributed import DistInfo, node_layout
from llmtrain.engine.optim import MIN_8BIT_SIZE, state_bytes
from llmtrain.engine.placement import (
    DDP_GRAD_COPIES,
    ParamSpec,
    padded_rows,
    place,
    shard_rows,
    table_rows,
)


def _spec(name: str, *shape: int, size: int = 4, trainable: bool = True) -> ParamSpec:
    return ParamSpec(name, shape, size, trainable)


# ------------------------------------------------------------------------- arithmetic
def test_shard_rows_are_torch_chunks_pieces_and_every_rank_allocates_the_first():
    for rows in range(1, 20):
        for world in range(1, 7):
            pieces = [len(c) for c in torch.chunk(torch.empty(rows), world)]
            pieces += [0] * (world - len(pieces))  # FSDP2: an empty shard for the missing
            assert [shard_rows(rows, world, r) for r in range(world)] == pieces
            assert padded_rows(rows, world) == pieces[0]
            assert 0 <= padded_rows(rows, world) * world - rows < world


def test_world_one_holds_everything_once_and_ddp_twice_the_gradients():
    params = [_spec("w", 6, 4), _spec("frozen", 8, 2, size=2, trainable=False)]
    one = place(params, 1, "ddp", "adamw").ranks[0]
    assert (one.weights, one.gradients, one.optimizer) == (96 + 32, 96, 2 * 96)
    two = place(params, 2, "ddp", "adamw")
    assert two.sharded == () and _bytes(two, 0) == _bytes(two, 1)
    assert two.ranks[1].gradients == DDP_GRAD_COPIES * 96
    assert place(params, 1, "fsdp", "adamw").ranks[0] == one  # world 1 wraps nothing


def _bytes(placement, rank: int) -> tuple[int, int, int]:
    r = placement.ranks[rank]
    return r.weights, r.gradients, r.optimizer


def test_fsdp_on_an_uneven_dim_0_pads_weights_and_gradients_but_not_the_optimizer_state():
    """5 rows over 2 ranks: pieces of 3 and 2 rows, each rank allocating 3; over 4 ranks:
    2, 2, 1 and nothing for rank 3, which still allocates 2 rows."""
    row = 3 * 4  # a (5, 3) fp32 weight
    two = place([_spec("w", 5, 3)], 2, "fsdp", "adamw")
    assert two.sharded == ("w",) and two.uneven == ("w",)
    assert _bytes(two, 0) == (3 * row, 3 * row, 2 * 3 * row)
    assert _bytes(two, 1) == (3 * row, 3 * row, 2 * 2 * row)
    four = place([_spec("w", 5, 3)], 4, "fsdp", "adamw")
    assert [r.optimizer for r in four.ranks] == [2 * 2 * row, 2 * 2 * row, 2 * row, 0]
    assert {r.weights for r in four.ranks} == {2 * row}
    assert sum(r.optimizer for r in four.ranks) == 2 * 5 * row  # the state is never padded
    even = place([_spec("w", 6, 3)], 2, "fsdp", "adamw")
    assert even.uneven == () and _bytes(even, 0) == _bytes(even, 1)


def test_frozen_parameters_are_sharded_but_have_no_gradient_or_state():
    params = [_spec("base", 10, 4, size=2, trainable=False), _spec("lora", 10, 2)]
    placed = place(params, 2, "fsdp", "adamw")
    assert placed.sharded == ("base", "lora") and placed.frozen == 1
    for rank in placed.ranks:
        assert rank.weights == 5 * 4 * 2 + 5 * 2 * 4
        assert (rank.gradients, rank.optimizer) == (5 * 2 * 4, 2 * 5 * 2 * 4)
    assert placed.full_gradients == 10 * 2 * 4


def test_an_8bit_optimizer_counts_a_byte_per_moment_of_the_local_shard():
    """8192 rows: each rank's 4096-element shard keeps 8-bit moments with fp32 block scales;
    SGD without momentum holds nothing."""
    n = 2 * MIN_8BIT_SIZE
    placed = place([_spec("w", n)], 2, "fsdp", "adamw8bit")
    assert [r.optimizer for r in placed.ranks] == [2 * (n // 2 + 4 * (n // 2 // 256))] * 2
    assert state_bytes("adamw8bit", MIN_8BIT_SIZE - 1, 4) == 2 * (MIN_8BIT_SIZE - 1) * 4
    assert place([_spec("w", n)], 1, "ddp", "sgd").ranks[0].optimizer == 0
    assert place([_spec("w", n)], 1, "ddp", "sgd", momentum=0.9).ranks[0].optimizer == 4 * n


def test_tied_weights_count_once(tmp_path):
    from llmtrain.engine.model import build_model, param_specs, weight_bytes
    from llmtrain.probe.trial import static_bytes

    model = build_model(make_cfg(tmp_path, precision="fp32"), FakeTokenizer(), None)
    assert model.lm_head.weight is model.transformer.wte.weight
    specs = param_specs(model)
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    assert len({"lm_head.weight", "transformer.wte.weight"} & set(names)) == 1
    one = place(specs, 1, "ddp", "adamw").ranks[0]
    assert one.weights == sum(weight_bytes(model)) == 4 * sum(p.numel() for p in model.parameters())
    assert static_bytes(model, "adamw") == one.total == 4 * one.weights


def test_many_ranks_show_each_columns_minimum_and_maximum():
    params = [_spec("w", 17, 2)]
    assert [label for label, _ in table_rows(place(params, 8, "fsdp", "adamw"))] == list("01234567")
    rows = table_rows(place(params, 9, "fsdp", "adamw"))  # pieces 2 × 8, then 1
    assert [(label, r.optimizer) for label, r in rows] == [("min", 2 * 8), ("max", 2 * 16)]


def test_nodes_come_from_torchruns_agent_variables():
    assert node_layout({"LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2"}, 8) == (2, 4)
    assert node_layout({"LOCAL_WORLD_SIZE": "4"}, 8) == (2, 4)
    assert node_layout({}, 8) == (1, 8)


def test_the_banner_shows_a_replicated_plan(tmp_path):
    """ddp on 2 nodes × 2: the parallel row, a table with every rank, and no sharding."""
    from llmtrain.commands.fit import banner, placement_view
    from llmtrain.engine.model import build_model
    from llmtrain.pipeline import Plan

    cfg = make_cfg(tmp_path, precision="fp32")
    model = build_model(cfg, FakeTokenizer(), None)
    dist = DistInfo(rank=0, world_size=4, nodes=2, local_world_size=2)
    plan = Plan(cfg, model, torch.device("cpu"), 2, 32, dist)
    out = Console(width=200, record=True)
    for part in [banner(plan), *placement_view(plan)]:
        out.print(part)
    text = out.export_text()
    assert "world 4 = 2 nodes × 2 per node, ddp (replicated)" in text
    assert "replicated: every rank holds all" in text
    assert [line.split("│")[1].strip() for line in text.splitlines() if "KiB │" in line][-4:] == [
        "0",
        "1",
        "2",
        "3",
    ]


# --------------------------------------------------------------- measured on 2 ranks
def _tiny(tmp: Path, parallel: str) -> tuple[object, torch.nn.Module]:
    """A GPT-2 with odd dims (9 wide, 65 tokens, 33 positions: uneven over 2 ranks), tied
    head, and its first block frozen as a PEFT base would be."""
    from llmtrain.engine.model import build_model

    gpt = {"n_layer": 2, "n_embd": 9, "n_head": 3, "n_positions": 33}
    cfg = make_cfg(tmp, precision="fp32", model={"config": gpt}, train={"parallel": parallel})
    model = build_model(cfg, FakeTokenizer(65), None)
    model.transformer.h[0].requires_grad_(False)
    return cfg, model


def _storages(tensors) -> int:
    """Bytes of the distinct storages under `tensors` (FSDP2's gradients share one buffer per
    group)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def _unsharded_grads(model: torch.nn.Module) -> int:
    """Gradients FSDP2 keeps on its unsharded parameters while gradient sync is off (private
    state: torch 2.13's FSDPParamGroup)."""
    from torch.distributed.fsdp import FSDPModule

    total = 0
    for m in model.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                grads = (p._unsharded_param.grad for p in group.fsdp_params)
                total += sum(g.numel() * g.element_size() for g in grads if g is not None)
    return total


def _step_batch(model: torch.nn.Module) -> None:
    x = torch.randint(2, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()


def _measure_fsdp(root: Path, dist) -> dict[str, int]:
    from llmtrain.engine.optim import build_optimizer
    from llmtrain.engine.parallel import no_sync_context, wrap_model

    cfg, model = _tiny(root / "fsdp", "fsdp")
    model = wrap_model(model, cfg, dist, torch.device("cpu"))
    params = list(model.parameters())
    local = [p.to_local() for p in params]
    with no_sync_context(model, last=False):  # a window's first micro-batch (k > 1)
        _step_batch(model)
    accumulated = _unsharded_grads(model)
    with no_sync_context(model, last=True):  # its last one: reduce-scatter
        _step_batch(model)
    optimizer = build_optimizer(cfg, model)
    optimizer.step()
    state = [v.to_local() for s in optimizer.state.values() for v in s.values() if v.dim() > 0]
    return {
        "pieces": sum(t.numel() * t.element_size() for t in local),
        "weights": _storages(local),
        "gradients": _storages(p.grad.to_local() for p in params if p.grad is not None),
        "optimizer": sum(t.numel() * t.element_size() for t in state),  # steps not counted
        "accumulated": accumulated,
    }


def _measure_ddp(root: Path, dist) -> dict[str, int]:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from llmtrain.engine.parallel import wrap_model

    cfg, model = _tiny(root / "ddp", "ddp")
    ddp = wrap_model(model, cfg, dist, torch.device("cpu"))
    buckets: list[tuple[int, int]] = []

    def hook(state, bucket):
        buf = bucket.buffer()
        buckets.append((buf.data_ptr(), buf.numel() * buf.element_size()))
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    _step_batch(ddp)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    inside = [any(a <= g.data_ptr() < a + n for a, n in buckets) for g in grads]
    return {
        "gradients": sum(n for _, n in buckets) + _storages(grads),
        "grads_in_buckets": sum(inside),
    }


def _measure_on_ranks(root: str) -> None:
    """Each rank writes what it holds under fsdp and ddp to <root>/rank<r>.json."""
    from llmtrain.engine.distributed import barrier, setup, teardown

    torch.set_num_threads(1)
    dist = setup(torch.device("cpu"))
    try:
        found = {"fsdp": _measure_fsdp(Path(root), dist), "ddp": _measure_ddp(Path(root), dist)}
        found["nodes"] = [dist.nodes, dist.per_node]
        (Path(root) / f"rank{dist.rank}.json").write_text(json.dumps(found))
        # DDP's reducer (and the comm hook's futures) must be gone before the group is: left
        # to interpreter exit, a still-joinable gloo thread aborts the process now and then
        gc.collect()
        barrier()
    finally:
        teardown()


def test_the_prediction_is_what_two_fsdp_and_ddp_ranks_hold(tmp_path):
    from llmtrain.engine.model import param_specs

    run_function("test_placement:_measure_on_ranks", str(tmp_path))
    _, model = _tiny(tmp_path / "plan", "fsdp")
    specs = param_specs(model)
    fsdp, ddp = place(specs, 2, "fsdp", "adamw"), place(specs, 2, "ddp", "adamw")
    assert fsdp.uneven  # the odd dims make the ranks differ
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        pieces = sum(shard_rows(s.rows, 2, rank) * s.row_numel * s.element_size for s in specs)
        assert found["fsdp"]["pieces"] == pieces, rank
        held = fsdp.ranks[rank]
        measured = {k: found["fsdp"][k] for k in ("weights", "gradients", "optimizer")}
        assert measured == {
            "weights": held.weights,
            "gradients": held.gradients,
            "optimizer": held.optimizer,
        }, rank
        assert found["fsdp"]["accumulated"] == fsdp.full_gradients, rank
        assert found["ddp"] == {"gradients": ddp.ranks[rank].gradients, "grads_in_buckets": 0}
        assert found["nodes"] == [1, 2]  # torchrun --standalone: one node of 2
    assert fsdp.ranks[0].optimizer > fsdp.ranks[1].optimizer


# ------------------------------------------------------------------------------- CLI
def test_fit_dry_run_on_2_ranks_prints_the_plan(tmp_path):
    """`fit --nproc 2 --dry-run`: the world, the wrapper, a row per rank, the sharding."""
    corpus = write_corpus(tmp_path / "corpus.txt", lines=60)
    cfg = tiny_lm_config(tmp_path / "run", corpus, name="plan", max_steps=2)
    config = write_config(tmp_path / "config.yaml", cfg)
    cmd = [sys.executable, "-m", "llmtrain", "fit", str(config), "--nproc", "2", "--dry-run"]
    res = run_command([*cmd, "--set", "train.parallel=fsdp"], env={"COLUMNS": "200"})
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "world 2 = 1 node × 2 per node, fsdp (FSDP2, sharded)" in out
    assert "per rank (world 2)" in out
    ranks = [line.split("│")[1].strip() for line in out.splitlines() if "B │" in line]
    assert ranks[-2:] == ["0", "1"]
    assert "sharded: all 16 tensors (dim 0) over 2 ranks" in out  # a 1-layer GPT-2, tied
    assert "not training" in out and not (tmp_path / "run" / "metrics.jsonl").exists()
