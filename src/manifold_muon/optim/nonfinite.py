"""Finding non-finite gradients before a step touches anything."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import is_sharded, world

__all__ = ["nonfinite_parameters"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def nonfinite_parameters(named_params: list, group=None) -> list[str]:
    """The names of the parameters whose gradient holds a NaN or an infinity, on any rank of
    ``group``: one flag per gradient, one host sync, and under torch.distributed one MAX
    all_reduce, so every rank makes the same decision (FSDP2 shards differ).  Sparse gradients
    are refused here, before any state changes."""
    named = [(name, p.grad) for name, p in named_params if p.grad is not None]
    if not named:
        return []
    for name, grad in named:
        if grad.is_sparse:
            raise RuntimeError(f"ManifoldMuon does not support sparse gradients ({name}); use a dense "
                               "embedding (nn.Embedding(sparse=False)) or torch.optim.SparseAdam for it")
    flags = torch.stack([(~torch.isfinite(_local(grad))).any() for _, grad in named]).to(torch.uint8)
    if world(group)[1] > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return [name for (name, _), bad in zip(named, flags.tolist()) if bad]
