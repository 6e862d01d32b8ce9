"""Where a model's bytes live across ranks: per rank, the weights, gradients and optimizer state
that `train.parallel` leaves there (docs/architecture.md, "Scale-out"). Pure arithmetic over
`ParamSpec`s, so a dry run shows the plan before anything is wrapped; tests/test_placement.py
checks it against the real shards of DDP and FSDP2 on 2 gloo ranks.

- world 1, or `ddp`: every rank holds every tensor. Under DDP a trainable tensor's gradient is
  held twice: `.grad` and DDP's all-reduce bucket (`gradient_as_bucket_view` is off).
- `fsdp` (FSDP2 as torch 2.13 does it, `_fully_shard/_fsdp_param.py`): every parameter, frozen
  ones too, is cut on dim 0 by `torch.chunk` into `world` pieces; rank r's piece has
  `shard_rows(rows, world, r)` rows. Every rank *allocates* the padded piece,
  `padded_rows(rows, world)` rows, for the weight (all-gather inputs must have one size) and
  for the gradient (the reduce-scatter output); the optimizer's state is made like the
  unpadded piece (`zeros_like` of the local shard), so only it differs between ranks.

Step counters, activations and FSDP's transient all-gathered weights are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from llmtrain.engine.optim import state_bytes

# DDP keeps each gradient in `.grad` and again in its all-reduce bucket.
DDP_GRAD_COPIES = 2
MAX_RANK_ROWS = 8  # a table of more ranks shows the per-column minimum and maximum


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as stored (tied weights appear once): a 4-bit weight has its packed
    uint8 shape; `side_bytes` is what is held beside the data and not sharded (its scales)."""

    name: str
    shape: tuple[int, ...]
    element_size: int
    trainable: bool
    side_bytes: int = 0

    @property
    def rows(self) -> int:
        """Dim 0, the one FSDP2 shards; a 0-d tensor is one row."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return self.rows * self.row_numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size + self.side_bytes


@dataclass(frozen=True)
class RankBytes:
    rank: int
    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


@dataclass(frozen=True)
class Placement:
    """Every rank's bytes under one wrapper, and what is sharded."""

    world: int
    wrapper: str  # "ddp" | "fsdp" (what train.parallel asked; world 1 wraps nothing)
    ranks: tuple[RankBytes, ...]  # ranks[r].rank == r
    tensors: int  # parameters, tied weights once
    frozen: int  # of which frozen (a PEFT base): weights only, no gradient or state
    sharded: tuple[str, ...]  # the parameters split over ranks: all under fsdp, else none
    uneven: tuple[str, ...]  # sharded ones whose dim 0 the world does not divide
    full_gradients: int  # the trainable gradients unsharded (FSDP2 accumulates them so)


# ------------------------------------------------------------------------------- shards
def shard_rows(rows: int, world: int, rank: int) -> int:
    """Rows of rank `rank`'s piece of `torch.chunk(x, world)` on dim 0: ceil(rows / world)
    for the first ranks, the remainder next, then 0 (chunk may return fewer than `world`
    pieces; FSDP2 gives the missing ranks an empty shard). Invariants: the pieces sum to
    `rows`, each is at most `padded_rows(rows, world)`, and they never grow with the rank."""
    size = padded_rows(rows, world)
    return max(0, min(size, rows - rank * size))


def padded_rows(rows: int, world: int) -> int:
    """Rows every rank allocates for its shard: ceil(rows / world), rank 0's piece."""
    return math.ceil(rows / world)


def rank_bytes(
    params: Sequence[ParamSpec],
    world: int,
    rank: int,
    *,
    sharded: bool,
    optimizer: str,
    momentum: float = 0.0,
) -> RankBytes:
    """One rank's bytes (module docstring); gradients and optimizer state exist for trainable
    parameters only, so a frozen (PEFT) base counts its weights alone."""
    weights = gradients = state = 0
    for p in params:
        held = padded_rows(p.rows, world) if sharded else p.rows
        own = shard_rows(p.rows, world, rank) if sharded else p.rows
        weights += held * p.row_numel * p.element_size + p.side_bytes
        if not p.trainable:
            continue
        copies = DDP_GRAD_COPIES if world > 1 and not sharded else 1
        gradients += copies * held * p.row_numel * p.element_size
        state += state_bytes(optimizer, own * p.row_numel, p.element_size, momentum)
    return RankBytes(rank, weights, gradients, state)


def place(
    params: Sequence[ParamSpec],
    world: int,
    wrapper: str,
    optimizer: str,
    momentum: float = 0.0,
) -> Placement:
    """Every rank's bytes for `train.parallel: wrapper` over `world` ranks. Invariants: with
    nothing sharded all ranks are equal; sharded, the ranks' Adam or SGD states sum to the
    whole model's, and their weights exceed the whole model's by the padding alone: fewer
    than `world` rows per tensor (plus `side_bytes`, held whole by every rank)."""
    sharded = wrapper == "fsdp" and world > 1
    ranks = tuple(
        rank_bytes(params, world, r, sharded=sharded, optimizer=optimizer, momentum=momentum)
        for r in range(world)
    )
    names = tuple(p.name for p in params) if sharded else ()
    uneven = tuple(p.name for p in params if sharded and p.rows % world)
    full = sum(p.numel * p.element_size for p in params if p.trainable)
    frozen = sum(not p.trainable for p in params)
    return Placement(world, wrapper, ranks, len(params), frozen, names, uneven, full)


def table_rows(placement: Placement, limit: int = MAX_RANK_ROWS) -> list[tuple[str, RankBytes]]:
    """(label, bytes) for the per-rank table: each rank up to `limit` ranks; beyond, the
    minimum and the maximum of each column over all ranks (labelled 'min' and 'max'; a row
    may then mix ranks)."""
    ranks = placement.ranks
    if len(ranks) <= limit:
        return [(str(r.rank), r) for r in ranks]

    def column(pick) -> RankBytes:
        return RankBytes(
            -1,  # no one rank
            pick(r.weights for r in ranks),
            pick(r.gradients for r in ranks),
            pick(r.optimizer for r in ranks),
        )

    return [("min", column(min)), ("max", column(max))]
