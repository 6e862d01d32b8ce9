"""Process-group plumbing for torchrun: who am I, and the few collectives we need
(docs/architecture.md, "Scale-out").

llmtrain never launches or talks between processes itself: torchrun sets RANK / WORLD_SIZE /
LOCAL_RANK, torch.distributed does the communication (nccl on CUDA, gloo on CPU). A single
process without those variables is world size 1 and every collective is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    nodes: int = 1  # machines in the job (torchrun's agents)
    local_world_size: int = 0  # ranks on this process's node; 0: unknown, all on one node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def per_node(self) -> int:
        """Ranks on this process's node."""
        return self.local_world_size or self.world_size


def node_layout(environ: Mapping[str, str], world: int) -> tuple[int, int]:
    """(nodes, ranks on this node) from torchrun's elastic agent, which sets GROUP_WORLD_SIZE
    (the agents that joined the rendezvous: one per node) and LOCAL_WORLD_SIZE (its
    nproc_per_node); without them, WORLD_SIZE // LOCAL_WORLD_SIZE, and one node by default."""
    local = int(environ.get("LOCAL_WORLD_SIZE", world))
    nodes = int(environ.get("GROUP_WORLD_SIZE", 0)) or max(1, world // max(local, 1))
    return nodes, local


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """`run.device` → a torch.device; under torchrun, `cuda`/`auto` mean this rank's GPU."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(pref)


def setup(device: torch.device) -> DistInfo:
    """Join torchrun's process group when launched by it; otherwise a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    nodes, local_world = node_layout(os.environ, world)
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        nodes=nodes,
        local_world_size=local_world,
    )


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (no-op for a world of one) and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Minimum of a tensor over all ranks in place (no-op for a world of one) and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (anything picklable and small) on every rank; a world of one keeps its
    own."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable, small), in rank order, on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]
