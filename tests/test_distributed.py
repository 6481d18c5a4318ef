"""Optimizer work shared across ranks (gloo, CPU processes) equals one process, with replicated
weights (DDP) and with FSDP2-sharded ones (DTensors): cut by rows over every rank, as HSDP does
over a 2D mesh, or cut by columns."""
import contextlib
import gc
import os
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from manifold_muon import ManifoldMuon, resolve
from manifold_muon.optim.distributed import owned_indices, whole
from conftest import TinyGPT, free_port

STEPS = 4


def build_model(name: str) -> torch.nn.Module:
    if name == "hf-gpt2":   # Conv1D weights stored (in, out): the optimizer works on W.mT
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16,
                                          bos_token_id=None, eos_token_id=None))
    return TinyGPT(layers=3)   # 3 same-shape matrices per stack: 2 and 3 ranks both split them


def shard_model(model: torch.nn.Module, layout: str, world: int):
    """FSDP2 over every rank (16 rows over 3 ranks: uneven shards 6, 6 and 4; HF's 32: 11, 11
    and 10), its matrices cut by columns instead, or HSDP: 2 replicas of a model cut in world / 2
    (a 2D mesh)."""
    if layout == "fsdp2":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    elif layout == "columns":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)), shard_placement_fn=lambda p: Shard(p.ndim - 1))
    elif layout == "hsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))


def sharded_model_and_optimizer(layout="replicated", model_name="nanogpt", seed=0, process_group=None, **overrides):
    torch.manual_seed(seed)
    model = build_model(model_name)
    shard_model(model, layout, dist.get_world_size() if dist.is_initialized() else 1)
    return model, ManifoldMuon(resolve(model, "hetero", **{"mode": "improved", **overrides}), process_group=process_group)


def take_steps(model, opt, layout, steps, data_seed=0):
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * data_seed + step)
        for p in model.parameters():  # identical "all-reduced" gradients on every rank
            grad = torch.randn(p.shape, generator=gen)
            p.grad = (grad if layout == "replicated" else
                      distribute_tensor(grad, p.device_mesh, p.placements, src_data_rank=None))
        opt.step()


def whole_weights(model) -> dict:
    return {k: whole(v).clone() for k, v in model.state_dict().items()}


def _rank_main(rank, world, port, body, args):
    """One gloo rank: ``body(rank, world, *args)``, then leave together and skip the interpreter's
    teardown."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
        # Leave together: a rank that tears gloo down while a peer still talks to it makes
        # the peer abort ("terminate called without an active exception", seen on CI-like runs).
        dist.barrier()
    finally:
        gc.collect()   # the body's DTensors, whose device meshes hold process groups, go first
        dist.destroy_process_group()
    # Every result is on disk; skip the interpreter's finalization, where gloo objects the
    # collection missed would be destroyed. Even with the barrier a rank still aborted now and
    # then at the end of a run (SIGABRT, "terminate called without an active exception", once
    # in a fresh-clone CI run on 2026-12-07; not reproduced in 60 tries under load).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(body, world: int, *args):
    """``body(rank, world, *args)`` on ``world`` gloo processes (spawned, one thread each)."""
    mp.start_processes(_rank_main, args=(world, free_port(), body, args), nprocs=world, start_method="spawn")


def train_steps(layout="replicated", model_name="nanogpt", around_steps=contextlib.nullcontext):
    """STEPS hetero steps on given gradients; under FSDP2 or HSDP (``fully_shard``) the weights,
    gradients and momentum buffers are DTensors split by rows."""
    model, opt = sharded_model_and_optimizer(layout, model_name)
    with around_steps():
        take_steps(model, opt, layout, range(STEPS))
    return whole_weights(model), opt


def _sharded_steps(rank, world, out, layout="replicated", model_name="nanogpt"):
    whole_gathers = []   # DTensor.full_tensor calls in the steps: FSDP2 sends each owner its slice instead
    full_tensor = DTensor.full_tensor

    def counting(*args, **kwargs):
        whole_gathers.append(1)
        return full_tensor(*args, **kwargs)

    weights, opt = train_steps(layout, model_name, lambda: mock.patch.object(DTensor, "full_tensor", counting))
    duals = {i: s["dual"] for i, s in enumerate(opt.state.values()) if "dual" in s}
    # FSDP2's point: each rank keeps only its rows of every momentum buffer
    momentum_rows = [s["momentum_buffer"].to_local().shape[0] if layout != "replicated"
                     else s["momentum_buffer"].shape[0] for s in opt.state.values() if "momentum_buffer" in s]
    if rank == 0:
        torch.save({"weights": weights, "duals": duals, "momentum_rows": momentum_rows,
                    "whole_gathers": len(whole_gathers)}, out)


def test_owned_indices_cover_the_stack_once_in_order():
    for k in range(1, 9):
        for w in range(1, 5):
            flat = [i for r in range(w) for i in owned_indices(k, r, w)]
            assert flat[:k] == list(range(k)) and set(flat) == set(range(k))


@pytest.mark.parametrize("world, layout, model_name", [
    (2, "replicated", "nanogpt"), (3, "replicated", "nanogpt"),
    (2, "fsdp2", "nanogpt"),     # 3 matrices a stack on 2 ranks: the second owns one and a repeat
    (3, "fsdp2", "nanogpt"), (3, "fsdp2", "hf-gpt2"),   # HF: 2 matrices a stack, the third rank a repeat
    (2, "columns", "nanogpt"),
    (4, "hsdp", "nanogpt")])   # 3 matrices on 4 ranks: the second replica owns the third and a repeat
def test_sharded_optimizer_matches_one_process(world, layout, model_name, tmp_path):
    out = tmp_path / "rank0.pt"
    run_ranks(_sharded_steps, world, str(out), layout, model_name)
    sharded = torch.load(out, weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the ranks: another thread count sums the matmuls in another order
    try:
        single, opt = train_steps(model_name=model_name)
    finally:
        torch.set_num_threads(threads)
    full_rows = [s["momentum_buffer"].shape[0] for s in opt.state.values() if "momentum_buffer" in s]
    shards = {"replicated": 1, "fsdp2": world, "columns": 1, "hsdp": world // 2}[layout]
    # rank 0 holds the first ceil(rows / shards) of each
    assert sharded["momentum_rows"] == [-(-rows // shards) for rows in full_rows]
    # Cut by rows (FSDP2, HSDP), a stack is never gathered whole (an all_to_all brings each rank
    # its slice); cut by columns it is
    assert (sharded["whole_gathers"] > 0) == (layout == "columns"), sharded["whole_gathers"]
    for k, v in single.items():
        torch.testing.assert_close(sharded["weights"][k], v, atol=1e-6, rtol=0, msg=k)
    # the carried multipliers were gathered too: every rank holds every matrix's dual
    single_duals = [s["dual"] for s in opt.state.values() if "dual" in s]
    assert len(sharded["duals"]) == len(single_duals) > 0
    for a, b in zip(sharded["duals"].values(), single_duals):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _checkpoint_steps(rank, world, out, checkpoint):
    model, opt = sharded_model_and_optimizer("fsdp2")
    take_steps(model, opt, "fsdp2", range(3))
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, opt))), checkpoint_id=checkpoint)
    take_steps(model, opt, "fsdp2", range(3, 6))
    continued = whole_weights(model)
    fresh, fresh_opt = sharded_model_and_optimizer("fsdp2", seed=1)   # other weights until loaded
    state = dict(zip(("model", "optim"), get_state_dict(fresh, fresh_opt)))
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    duals = sum("dual" in s for s in fresh_opt.state.values())
    take_steps(fresh, fresh_opt, "fsdp2", range(3, 6))
    resumed = whole_weights(fresh)   # a collective: every rank
    if rank == 0:
        torch.save({"continued": continued, "resumed": resumed, "duals": duals}, out)


def test_fsdp2_optimizer_state_resumes_exactly_through_distributed_checkpoint(tmp_path):
    """torch.distributed.checkpoint saves the sharded momenta and the carried duals, and a fresh
    model and optimizer loaded from it take the same steps as the run that went on."""
    out = tmp_path / "rank0.pt"
    run_ranks(_checkpoint_steps, 2, str(out), str(tmp_path / "ckpt"))
    result = torch.load(out, weights_only=True)
    assert result["duals"] > 0
    for k, v in result["continued"].items():
        assert torch.equal(result["resumed"][k], v), k


def _group_steps(rank, world, out_dir):
    """Two pipeline-like stages of 2 ranks, each stage its own gradients: data parallel within a
    stage (``process_group``), replicated and under FSDP2 on the stage's sub-mesh; then every rank
    on its own (``new_subgroups(1)``); then different gradients, and FSDP2 on the stage's mesh, on
    the default group."""
    stage = rank // 2
    stage_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("stage", "dp"))["dp"]

    def stage_model(layout):
        torch.manual_seed(0)
        model = build_model("nanogpt")
        if layout == "fsdp2":
            fully_shard(model, mesh=stage_mesh)
        return model

    results = {}
    for layout in ("replicated", "fsdp2"):
        model = stage_model(layout)
        opt = ManifoldMuon(resolve(model, "hetero", mode="fast"), process_group=stage_mesh.get_group())
        with mock.patch.object(DTensor, "full_tensor", side_effect=AssertionError("gathered whole")):
            take_steps(model, opt, layout, range(STEPS), data_seed=stage)   # the sub-mesh's all_to_all
        results[layout] = whole_weights(model)
    own_group, _ = dist.new_subgroups(1)
    model, opt = sharded_model_and_optimizer(mode="fast", process_group=own_group)
    take_steps(model, opt, "replicated", range(STEPS), data_seed=rank)
    results["own"] = whole_weights(model)
    model, opt = sharded_model_and_optimizer(mode="fast")
    try:
        take_steps(model, opt, "replicated", range(1), data_seed=rank)
    except RuntimeError as e:
        results["refused"] = str(e)
    model = stage_model("fsdp2")   # but the optimizer left on every rank
    try:
        take_steps(model, ManifoldMuon(resolve(model, "hetero", mode="fast")), "fsdp2", range(1), data_seed=stage)
    except ValueError as e:
        results["mesh refused"] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ranks_share_the_work_only_within_their_process_group_and_ranks_that_do_not_share_are_refused(tmp_path):
    run_ranks(_group_steps, 4, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {}
        for seed in range(4):
            model, opt = sharded_model_and_optimizer(mode="fast")
            take_steps(model, opt, "replicated", range(STEPS), data_seed=seed)
            single[seed] = whole_weights(model)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(single[0]["lm_head.weight"], single[1]["lm_head.weight"])
    for rank, result in enumerate(ranks):
        for run, seed in (("replicated", rank // 2), ("fsdp2", rank // 2), ("own", rank)):
            for k, v in single[seed].items():
                torch.testing.assert_close(result[run][k], v, atol=1e-6, rtol=0, msg=f"rank {rank}, {run}: {k}")
        assert "differs across them" in result["refused"] and "process_group" in result["refused"]
        assert "transformer.h.0." in result["refused"]   # names the first Muon matrix
        assert f"ranks {[2 * (rank // 2), 2 * (rank // 2) + 1]}" in result["mesh refused"], result["mesh refused"]
        assert "ranks [0, 1, 2, 3] of its process group" in result["mesh refused"]
