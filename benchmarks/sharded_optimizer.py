"""Per-rank cost of the sharded Manifold Muon step as the world size grows (CPU processes, gloo).

Each rank runs one thread, so W ranks use W cores.  Expected per-rank cost for k same-shape
matrices per stack: ceil(k / W) direction solves + the all_gather of k matrices, against k
solves on one rank; the momentum update (elementwise) stays on every rank.
Usage: python benchmarks/sharded_optimizer.py [--worlds 1,2] [--layers 4] [--d 128] [--steps 5]
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

from manifold_muon.bench import write_result
from manifold_muon import ManifoldMuon, resolve
from manifold_muon.model import GPT, ModelConfig


def _worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=args.layers, n_embd=args.d, n_head=4, block_size=32, vocab_size=256))
    opt = ManifoldMuon(resolve(model, args.allocation))
    times = []
    for step in range(args.steps + 1):
        gen = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        dist.barrier()
        if step:  # the first step builds state
            times.append((time.perf_counter() - t0) * 1e3)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--allocation", default="hetero")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "layers": args.layers, "d": args.d,
              "allocation": args.allocation, "optimizer_ms_median": {}}
    for world in [int(w) for w in args.worlds.split(",")]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            mp.start_processes(_worker, args=(world, port, args, f.name), nprocs=world, start_method="spawn")
            times = json.loads(Path(f.name).read_text())
        result["optimizer_ms_median"][world] = statistics.median(times)
        print(f"world {world}: optimizer step {statistics.median(times):.1f} ms per rank (median of {len(times)})",
              flush=True)
    base = result["optimizer_ms_median"][min(result["optimizer_ms_median"])]
    for world, ms in result["optimizer_ms_median"].items():
        print(f"  world {world}: {ms / base:.2f}x of world 1 (ideal {1 / world:.2f}x)")
    write_result(result, args.out, f"sharded_optimizer_{result['date']}_cpu.json")


if __name__ == "__main__":
    main()
