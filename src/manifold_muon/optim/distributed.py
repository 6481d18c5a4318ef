"""Sharing Muon's matrix work across ranks: each rank solves a contiguous slice of a stack of
same-shape matrices, then an all_gather gives every rank every result.

Gradients are identical on every rank after DDP's all-reduce, so every rank keeps all the
(cheap, elementwise) momentum buffers and only the expensive part, the direction solve and
the retraction, is split.  World size 1 is the same code: one slice holding everything.

Cost per rank for ``k`` same-shape matrices on ``W`` ranks: ``ceil(k / W)`` solves plus one
all_gather of ``k`` matrices (``k * m * n`` floats received), instead of ``k`` solves.  A
rank whose slice would be short repeats the last matrix rather than idle in a ragged
collective; the duplicates are dropped after the gather.

FSDP2 (``fully_shard``) and other DTensor parameters keep their momentum buffers sharded. Under
FSDP2's layout (one mesh over every rank, weights cut by rows) one all_to_all sends each rank,
whole, only the momenta and weights of the matrices it solves (``to_owners``), and after the
solve another sends each rank its rows of every result (``from_owners``): a rank receives ``3 *
ceil(k / W) * m * n`` floats, against ``3 * k * m * n`` when gathering whole stacks (``W``
times less where ``W`` divides ``k``), and holds only its own matrices whole (improved mode's
carried duals are gathered as under DDP).  HSDP's layout (a 2D mesh of ``R`` replicas, each cut
by rows over ``S = W / R`` ranks) takes the same path inside each replica, for the matrices its
``S`` ranks own, then an all_gather across replicas gives each rank its rows of the rest:
about ``3 * ceil(k / W) * m * n + k * m * n / S`` floats received.  Other DTensor layouts (cut by
columns, say) gather the stack whole (``whole_stack``, one collective), solve their slice as
above and keep their shard of every result (``write_shard``, cut locally).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["world", "group_ranks", "check_ranks_share", "owned_indices", "gather_slices", "is_sharded", "whole",
           "whole_stack", "write_shard", "shard_rows", "scatters", "to_owners", "from_owners"]

if dist.is_available():
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
else:   # a build without torch.distributed has no DTensors either
    DTensor, Shard, distribute_tensor = (), None, None


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` within ``group`` (default: every rank); ``(0, 1)`` outside
    torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def group_ranks(group=None) -> list[int]:
    """The global ranks of ``group`` (default: every rank), in the group's order."""
    return dist.get_process_group_ranks(group) if group is not None else list(range(world()[1]))


def check_ranks_share(named_params: list, group=None):
    """Raise unless the ranks of ``group`` can share the matrix work on ``named_params`` (pairs
    of name and parameter): sharing assumes they all hold the same matrices, as data parallelism
    makes them, and otherwise mixes ranks' results silently.  A DTensor's mesh must hold exactly
    the group's ranks; plain gradients must agree, checked by one all_reduce of a fingerprint of
    each (its sum, against the largest sum of magnitudes; a missing gradient as a sentinel)."""
    world_size = world(group)[1]
    if world_size == 1:
        return
    remedy = ("pass ManifoldMuon(..., process_group=...) the ranks that do share gradients (a pipeline stage's "
              "data-parallel group, say, or the group of the mesh fully_shard was given)")
    ranks = sorted(group_ranks(group))
    for name, p in named_params:
        mesh_ranks = sorted(p.device_mesh.mesh.flatten().tolist()) if is_sharded(p) else ranks
        if mesh_ranks != ranks:
            raise ValueError(f"ManifoldMuon shares its matrix work across the ranks {ranks} of its process group, "
                             f"but {name} is sharded over a device mesh of the ranks {mesh_ranks}; {remedy}")
    grads = [(name, p.grad) for name, p in named_params if not is_sharded(p)]
    if not grads:
        return
    device = next((g.device for _, g in grads if g is not None), torch.device("cpu"))
    missing = torch.tensor(1e300, dtype=torch.float64, device=device)
    sums = torch.stack([g.double().sum() if g is not None else missing for _, g in grads])
    sizes = torch.stack([g.double().abs().sum() if g is not None else missing.new_zeros(()) for _, g in grads])
    both = torch.cat([sums, -sums, sizes])   # one MAX all_reduce: the largest, minus the smallest, the size
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    largest, neg_smallest, size = both.view(3, -1)
    differs = ((largest + neg_smallest) > 1e-6 * size).nonzero().flatten().tolist()   # the same on every rank
    if differs:
        raise RuntimeError(
            f"ManifoldMuon shares its matrix work across the {world_size} ranks of its process group, which "
            f"assumes they all hold the same gradients, as data parallelism (DDP's all-reduce) makes them; at "
            f"this first step the gradient of {grads[differs[0]][0]} differs across them. Wrap the model in DDP "
            f"or fully_shard, or {remedy}, or torch.distributed.new_subgroups(1)[0] where every rank trains on "
            "its own")


def owned_indices(k: int, rank: int, world_size: int) -> list[int]:
    """The ``ceil(k / W)`` stack indices rank ``rank`` solves (the last one repeated as padding)."""
    chunk = math.ceil(k / world_size)
    return [min(i, k - 1) for i in range(rank * chunk, (rank + 1) * chunk)]


def gather_slices(local: torch.Tensor, k: int, world_size: int, group=None) -> torch.Tensor:
    """Every rank's ``local`` slice (same shape on each), concatenated in rank order, first ``k``;
    over ``group`` (of ``world_size`` ranks) where given, else over every rank."""
    if world_size == 1:
        return local[:k]
    out = torch.empty((world_size * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    # PyTorch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; 2.11 has only the old name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local.contiguous(), group=group)
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
    if _one_layout(tensors):
        return list(torch.stack(tensors).full_tensor().unbind(0))
    return [whole(t) for t in tensors]


def _one_layout(tensors: list) -> bool:
    """Whether all are DTensors on one mesh with one placement, so that they stack as one."""
    first = tensors[0]
    return all(is_sharded(t) and t.device_mesh == first.device_mesh and t.placements == first.placements
               for t in tensors)


def write_shard(p: torch.Tensor, value: torch.Tensor):
    """Write into the DTensor ``p`` its own shard of the whole value ``value``, cut locally:
    every rank holds the same ``value``, so nothing is sent."""
    mine = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
    p.to_local().copy_(mine.to_local())


def shard_rows(rows: int, world_size: int) -> list[int]:
    """Each rank's row count of a tensor cut by rows (``Shard(0)``), as DTensor cuts it,
    following ``torch.chunk``: ``ceil(rows / W)`` each, the last shards short or empty."""
    size = math.ceil(rows / world_size)
    return [max(0, min(size, rows - r * size)) for r in range(world_size)]


def scatters(tensors: list, group=None) -> bool:
    """Whether a stack can go to its owners by ``to_owners``: DTensors on one mesh that holds
    the ranks of ``group`` (default: every rank) in their order (so ranks and owners agree), cut
    by rows over its last dimension and replicated over any before it: FSDP2's 1D mesh, or
    HSDP's 2D one."""
    if not _one_layout(tensors):
        return False
    mesh, placements = tensors[0].device_mesh, tuple(tensors[0].placements)
    return (mesh.ndim <= 2 and placements[-1] == Shard(0) and all(p.is_replicate() for p in placements[:-1])
            and mesh.mesh.flatten().tolist() == group_ranks(group))


def _replica_and_shard(mesh, rank: int) -> tuple[int, int, int]:
    """``(shards S, this rank's replica, its shard)`` on a ``scatters`` mesh: rank = replica * S + shard."""
    shards = mesh.size(mesh.ndim - 1)
    return (shards, *divmod(rank, shards))


def _all_to_all(send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    recv = torch.empty(sum(recv_splits), dtype=send.dtype, device=send.device)
    dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=group)
    return recv


def to_owners(fields: list[list], rank: int, world_size: int) -> list[torch.Tensor]:
    """For each field (a list of ``k`` same-shape DTensors on a ``scatters`` layout, e.g. the
    stack's momenta, then its weights), the whole tensors of ``owned_indices(k, rank, W)``,
    stacked: one all_to_all among the ``S`` ranks of this rank's replica, in which each sends
    every owner there its rows of that owner's matrices."""
    k, shape, mesh = len(fields[0]), fields[0][0].shape, fields[0][0].device_mesh
    shards, replica, shard = _replica_and_shard(mesh, rank)
    chunk = math.ceil(k / world_size)
    order = [i for r in range(world_size) for i in owned_indices(k, r, world_size)]   # owner-major
    ours = order[replica * shards * chunk:(replica + 1) * shards * chunk]   # owned in this replica
    local = torch.stack([torch.stack([t.to_local() for t in field])[ours] for field in fields])
    # (fields, S * chunk, my rows, ...) -> owner-major (S, fields, chunk, my rows, ...)
    local = local.unflatten(1, (shards, chunk)).transpose(0, 1)
    rows = shard_rows(shape[0], shards)
    per_row = len(fields) * chunk * math.prod(shape[1:])
    recv = _all_to_all(local.flatten(), [per_row * rows[shard]] * shards, [per_row * r for r in rows],
                       mesh.get_group(mesh.ndim - 1))
    pieces = recv.split([per_row * r for r in rows])   # from each shard, its rows of my matrices
    whole_rows = torch.cat([piece.view(len(fields), chunk, r, *shape[1:]) for piece, r in zip(pieces, rows)], dim=2)
    return list(whole_rows.unbind(0))


def from_owners(mine: torch.Tensor, params: list, rank: int, world_size: int):
    """Write into each of the ``k`` DTensors ``params`` (a ``scatters`` layout) its own rows of
    its new value: ``mine`` holds, whole and stacked, those of ``owned_indices(k, rank, W)``
    (``to_owners``' inverse: an all_to_all in which each owner sends every rank of its replica
    its rows, then, with replicas, an all_gather of those rows across them)."""
    k, shape, mesh = len(params), params[0].shape, params[0].device_mesh
    shards, replica, shard = _replica_and_shard(mesh, rank)
    rows = shard_rows(shape[0], shards)
    per_row = mine.shape[0] * math.prod(shape[1:])
    send = torch.cat([part.flatten() for part in mine.split(rows, dim=1)])   # shard-major row blocks
    recv = _all_to_all(send, [per_row * r for r in rows], [per_row * rows[shard]] * shards,
                       mesh.get_group(mesh.ndim - 1))
    # from each owner of this replica in turn its matrices' rows; then every replica's, in owner order
    ours = recv.view(shards * mine.shape[0], rows[shard], *shape[1:])
    replicas = world_size // shards
    every = gather_slices(ours, replicas * len(ours), replicas, mesh.get_group(0) if replicas > 1 else None)
    # the padded owner-major order, whose first k are 0..k-1
    torch._foreach_copy_([p.to_local() for p in params], list(every[:k].unbind(0)))
