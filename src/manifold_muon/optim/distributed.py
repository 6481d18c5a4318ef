"""Sharing Muon's matrix work across ranks: each rank solves a contiguous slice of a stack of
same-shape matrices, then an all_gather gives every rank every result.

Gradients are identical on every rank after DDP's all-reduce, so every rank keeps all the
(cheap, elementwise) momentum buffers and only the expensive part, the direction solve and
the retraction, is split.  World size 1 is the same code: one slice holding everything.

Cost per rank for ``k`` same-shape matrices on ``W`` ranks: ``ceil(k / W)`` solves plus one
all_gather of ``k`` matrices (``k * m * n`` floats received), instead of ``k`` solves.  A
rank whose slice would be short repeats the last matrix rather than idle in a ragged
collective; the duplicates are dropped after the gather.

FSDP2 (``fully_shard``) and other DTensor parameters take the same path: the momenta and
weights of a stack are gathered whole (``whole_stack``, one all_gather for them all, which
receives ``2 * k * m * n`` floats more), the stack is split and solved as above, and each rank
keeps its own shard of every result (``write_shard``, a local slice, no communication).  The
momentum buffers stay sharded; the step holds one stack of same-shape matrices whole at a
time, as DDP holds every matrix whole all the time.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["world", "owned_indices", "gather_slices", "is_sharded", "whole", "whole_stack", "write_shard"]

if dist.is_available():
    from torch.distributed.tensor import DTensor, distribute_tensor
else:   # a build without torch.distributed has no DTensors either
    DTensor, distribute_tensor = (), None


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def owned_indices(k: int, rank: int, world_size: int) -> list[int]:
    """The ``ceil(k / W)`` stack indices rank ``rank`` solves (the last one repeated as padding)."""
    chunk = math.ceil(k / world_size)
    return [min(i, k - 1) for i in range(rank * chunk, (rank + 1) * chunk)]


def gather_slices(local: torch.Tensor, k: int, world_size: int) -> torch.Tensor:
    """Every rank's ``local`` slice (same shape on each), concatenated in rank order, first ``k``."""
    if world_size == 1:
        return local[:k]
    out = torch.empty((world_size * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    # PyTorch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; 2.11 has only the old name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local.contiguous())
    return out[:k]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's parameters and their gradients are)."""
    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value as a plain tensor on every rank (a collective over its mesh);
    a plain tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def whole_stack(tensors: list) -> list:
    """``whole`` of each tensor: same-shape DTensors on one mesh and placement gathered in one
    collective (stacked, then gathered: one launch instead of one per tensor); plain tensors
    as they are."""
    first = tensors[0]
    if is_sharded(first) and all(is_sharded(t) and t.device_mesh == first.device_mesh
                                 and t.placements == first.placements for t in tensors):
        return list(torch.stack(tensors).full_tensor().unbind(0))
    return [whole(t) for t in tensors]


def write_shard(p: torch.Tensor, value: torch.Tensor):
    """Write into the DTensor ``p`` its own shard of the whole value ``value``, cut locally:
    every rank holds the same ``value``, so nothing is sent."""
    mine = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
    p.to_local().copy_(mine.to_local())
