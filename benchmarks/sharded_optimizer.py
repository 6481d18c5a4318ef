"""Per-rank cost of the sharded Manifold Muon step as the world size grows (CPU processes, gloo).

Each rank runs one thread, so W ranks use W cores.  Expected per-rank cost for k same-shape
matrices per stack: ceil(k / W) direction solves + the all_gather of k matrices, against k
solves on one rank; the momentum update (elementwise) stays on every rank.  Four layouts of
the weights, timed in alternating steps of one run:
- ``replicated``, as under DDP;
- ``fsdp2`` (``fully_shard`` on a 1D mesh: DTensors split by rows), whose step also sends each
  rank, by one all_to_all, the momenta and weights of the matrices it solves, another sends
  each rank its rows of the results, and which updates only its rows of the momentum;
- ``hsdp`` (``fully_shard`` on a 2D mesh: 2 replicas, each cut by rows over W / 2 ranks; 1 x W
  for odd W), whose all_to_all stays inside a replica, then an all_gather across replicas
  gives each rank its rows of the other replica's results;
- ``columns`` (``fully_shard`` on a 1D mesh, matrices cut by columns), on the path of layouts
  that are not cut by rows: it gathers each stack's momenta and weights whole.
Usage: python benchmarks/sharded_optimizer.py [--worlds 1,2] [--layouts replicated,fsdp2]
         [--layers 4] [--d 128] [--steps 5] [--mode improved]
"""
import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from manifold_muon.lab.bench import write_result
from manifold_muon import ManifoldMuon, resolve
from manifold_muon.lab.model import GPT, ModelConfig
from manifold_muon.optim.distributed import is_sharded


LAYOUTS = ("replicated", "fsdp2", "hsdp", "columns")


def _model_and_optimizer(args, layout: str, world: int):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=args.layers, n_embd=args.d, n_head=4, block_size=32, vocab_size=256))
    if layout == "fsdp2":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    elif layout == "hsdp":
        replicas = 2 if world % 2 == 0 else 1
        fully_shard(model, mesh=init_device_mesh("cpu", (replicas, world // replicas),
                                                 mesh_dim_names=("replicate", "shard")))
    elif layout == "columns":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)), shard_placement_fn=lambda p: Shard(p.ndim - 1))
    return model, ManifoldMuon(resolve(model, args.allocation, mode=args.mode))


def _set_gradients(model, step: int):
    """The same random gradients for every layout and rank (as after DDP's all-reduce)."""
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=gen)
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements, src_data_rank=None) if is_sharded(p) else grad


def _worker(rank, world, port, args, layouts, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    runs = {layout: _model_and_optimizer(args, layout, world) for layout in layouts}
    times = {layout: [] for layout in layouts}
    for step in range(args.steps + 1):
        for layout, (model, opt) in runs.items():   # interleaved: a slow spell hits every layout
            _set_gradients(model, step)
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dist.barrier()
            if step:  # the first step builds state
                times[layout].append((time.perf_counter() - t0) * 1e3)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--layouts", default="replicated", help=f"comma-separated weight layouts, from: {', '.join(LAYOUTS)}")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--allocation", default="hetero")
    ap.add_argument("--mode", default="improved", choices=("improved", "fast", "paper"),
                    help="direction solver (improved's iteration count varies from step to step; fast's does not)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    layouts = args.layouts.split(",")
    bad = [layout for layout in layouts if layout not in LAYOUTS]
    if bad:
        ap.error(f"unknown layout {bad[0]!r}; valid choices: {', '.join(LAYOUTS)}")
    worlds = [int(w) for w in args.worlds.split(",")]
    result = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "torch": torch.__version__, "layers": args.layers,
              "d": args.d, "allocation": args.allocation, "mode": args.mode, "steps": args.steps,
              "optimizer_ms_median": {layout: {} for layout in layouts}}
    for world in worlds:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            mp.start_processes(_worker, args=(world, port, args, layouts, f.name), nprocs=world, start_method="spawn")
            times = json.loads(Path(f.name).read_text())
        for layout in layouts:
            result["optimizer_ms_median"][layout][world] = statistics.median(times[layout])
            print(f"{layout:10} world {world}: optimizer step {statistics.median(times[layout]):.1f} ms per rank "
                  f"(median of {len(times[layout])})", flush=True)
    base = result["optimizer_ms_median"][layouts[0]][worlds[0]]
    print(f"per-rank time against {layouts[0]}, world {worlds[0]} (ideal: 1 / world)")
    for layout in layouts:
        for world, ms in result["optimizer_ms_median"][layout].items():
            print(f"  {layout:10} world {world}: {ms / base:.2f}x")
    tag = ("_" + "-".join(layouts) if layouts != ["replicated"] else "") + (f"_{args.mode}" if args.mode != "improved" else "")
    write_result(result, args.out, f"sharded_optimizer_{result['date']}{tag}_cpu.json")


if __name__ == "__main__":
    main()
