"""bf16 on a CPU without bf16 units: the native bf16 matmul against float32 arithmetic on bf16
values (``optim.precision.low_precision_compute``), side by side in one process.

Muon, paper mode and fast mode compute their msign in bf16.  On a CPU whose oneDNN has no bf16
path (no AVX-512, no Arm bf16), torch runs a bf16 matmul with a scalar fallback kernel; the
library then keeps bf16's values and rounding but does the arithmetic in float32.  This times
the optimizer step of a GPT's matrices (``--d``, ``--layers``; gradients fixed, so only the step
is timed) both ways, in interleaved rounds, and reports medians and the ratio.  On a CPU with
bf16 units the library never emulates; the emulated rows then say what it would cost.

Usage: python benchmarks/bf16_emulation.py [--d 128] [--layers 4] [--modes muon,fast,paper]
"""
import argparse
import contextlib
import platform
import statistics
import time

import torch

from manifold_muon.lab.bench import write_result
from manifold_muon.lab.model import GPT, ModelConfig
from manifold_muon.optim import ManifoldMuon, precision, resolve

CONFIGS = {"muon": ("unconstrained", {}), "fast": ("hetero", {"mode": "fast"}),
           "paper": ("hetero", {"mode": "paper"})}


@contextlib.contextmanager
def bf16_path(native: bool):
    """Take the native bf16 matmul (True) or the float32 emulation (False) inside the block."""
    chosen = precision.native_bf16_matmul
    precision.native_bf16_matmul = lambda device_type: native
    try:
        yield
    finally:
        precision.native_bf16_matmul = chosen


def optimizer_with_grads(d: int, layers: int, alloc: str, extra: dict) -> ManifoldMuon:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=layers, n_head=max(1, d // 64), n_embd=d, block_size=64, vocab_size=512))
    x = torch.randint(512, (4, 64), generator=torch.Generator().manual_seed(0))
    _, loss = model(x, x)
    loss.backward()
    return ManifoldMuon(resolve(model, alloc, **extra))


def run(d: int, layers: int, modes: list[str], rounds: int) -> dict:
    setups = {(mode, native): optimizer_with_grads(d, layers, *CONFIGS[mode])
              for mode in modes for native in (True, False)}
    times = {key: [] for key in setups}
    for r in range(rounds + 1):   # round 0 warms up
        for (mode, native), opt in setups.items():
            with bf16_path(native):
                t0 = time.perf_counter()
                opt.step()
                if r:
                    times[(mode, native)].append((time.perf_counter() - t0) * 1e3)
    rows = {}
    for mode in modes:
        native_ms, emulated_ms = (statistics.median(times[(mode, n)]) for n in (True, False))
        rows[mode] = {"native_ms": native_ms, "emulated_ms": emulated_ms, "native_over_emulated": native_ms / emulated_ms}
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="layers, i.e. matrices per shape")
    parser.add_argument("--modes", default="muon,fast,paper", help=f"any of {', '.join(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in CONFIGS]
    if bad:
        parser.error(f"unknown mode(s) {bad}; valid choices: {', '.join(CONFIGS)}")
    result = {"date": time.strftime("%Y-%m-%d"), "device": platform.processor() or "cpu", "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "native_bf16_matmul": precision.native_bf16_matmul("cpu"), "threads": torch.get_num_threads(),
              "d": args.d, "layers": args.layers, "rows": run(args.d, args.layers, modes, args.rounds)}
    print(f"optimizer step, d={args.d}, {args.layers} layers, CPU capability {result['cpu_capability']}, "
          f"bf16 units: {result['native_bf16_matmul']}")
    print(f"{'config':8s} {'native bf16 ms':>15s} {'emulated ms':>12s} {'ratio':>7s}")
    for mode, row in result["rows"].items():
        print(f"{mode:8s} {row['native_ms']:15.1f} {row['emulated_ms']:12.1f} {row['native_over_emulated']:7.1f}")
    name = f"bf16_emulation_{result['date']}_d{args.d}_cpu.json"
    print(f"saved: {write_result(result, args.out, name)}")


if __name__ == "__main__":
    main()
