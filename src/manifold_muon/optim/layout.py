"""How a weight's storage maps to the ``(out, in)`` matrix the optimizer's math works on, and
back: ``nn.Linear``'s own layout, Hugging Face ``Conv1D``'s transposed one (the group's
``transposed`` key), a convolution's filters read as ``(out, in * kernel size)``, and FSDP2's
row-cut DTensors, written shard by shard."""
from __future__ import annotations

import torch

from .distributed import is_sharded, write_shard

__all__ = ["oriented", "stored", "write_oriented", "write_matrices"]


def oriented(p: torch.Tensor, group) -> torch.Tensor:
    """The weight as an ``(out, in)`` matrix, and a view of it, so that writing it writes the
    weight: transposed for ``(in, out)`` storage, and a convolution's filters flattened to
    ``(out, in * kernel size)``, the matrix the layer multiplies its input patches by (Keller
    Jordan's Muon reads conv filters the same way)."""
    if group["transposed"]:
        return p.mT
    if p.ndim == 2:
        return p
    if not p.is_contiguous():   # a flattening copy would take the update and drop it
        raise ValueError(f"a {p.ndim}D weight of shape {tuple(p.shape)} must be contiguous to be read as a "
                         "matrix (channels_last is not): keep the model's default memory format")
    return p.view(p.shape[0], -1)


def stored(values: torch.Tensor, p: torch.Tensor, group) -> torch.Tensor:
    """A stack of ``(out, in)`` matrices in the storage layout of the weight ``p`` (``oriented``'s
    inverse)."""
    out = torch.empty((len(values), *p.shape), dtype=p.dtype, device=values.device)
    for target, value in zip(out, values):
        oriented(target, group).copy_(value)
    return out


def write_oriented(p: torch.Tensor, value: torch.Tensor, group):
    """Write the ``(out, in)`` matrix ``value`` into the weight ``p``, the inverse of reading
    ``oriented(whole(p), group)``; a DTensor (FSDP2) weight keeps its own shard of it."""
    if is_sharded(p):
        write_shard(p, stored(value[None], p, group)[0])
    else:
        oriented(p, group).copy_(value)


def write_matrices(batch: list, values: list, group):
    """``write_oriented`` for a stack: plain weights in one foreach copy (one launch on a GPU)."""
    plain = [i for i, p in enumerate(batch) if not is_sharded(p)]
    if plain:
        torch._foreach_copy_([oriented(batch[i], group) for i in plain], [values[i] for i in plain])
    for p, value in zip(batch, values):
        if is_sharded(p):
            write_oriented(p, value, group)
