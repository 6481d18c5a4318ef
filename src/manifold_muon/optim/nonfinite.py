"""Finding non-finite gradients before a step touches anything."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .distributed import is_sharded, world

__all__ = ["nonfinite_parameters"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def nonfinite_parameters(named_params: list, group=None) -> list[str]:
    """The names of the parameters whose gradient holds a NaN or an infinity, on any rank of
    ``group``: one flag per gradient from one foreach max-norm, one host sync, and under
    torch.distributed one MAX all_reduce, so every rank makes the same decision (FSDP2 shards
    differ).  Sparse gradients are refused here, before any state changes."""
    named = [(name, p.grad) for name, p in named_params if p.grad is not None]
    if not named:
        return []
    for name, grad in named:
        if grad.is_sparse:
            raise RuntimeError(f"ManifoldMuon does not support sparse gradients ({name}); use a dense "
                               "embedding (nn.Embedding(sparse=False)) or torch.optim.SparseAdam for it")
    # Every rank lists the same gradients (their global sizes agree); a rank whose shard of one is
    # empty checks a zero in its place, since the max-norm of nothing is undefined.
    named = [(name, grad) for name, grad in named if grad.numel()]
    if not named:
        return []
    shards = [_local(grad) for _, grad in named]
    shards = [s if s.numel() else s.new_zeros(1) for s in shards]
    # one foreach launch: a gradient's largest magnitude is NaN or inf exactly when it holds one
    largest = torch.stack([n.float() for n in torch._foreach_norm(shards, ord=math.inf)])
    flags = (~torch.isfinite(largest)).to(torch.uint8)
    if world(group)[1] > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return [name for (name, _), bad in zip(named, flags.tolist()) if bad]
