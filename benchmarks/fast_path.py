"""Where fast mode's optimizer time goes, lever by lever, at a GPT's matrix shapes.

For one transformer layer's four matrices (``3d x d`` attention in-projection, ``d x d``
out-projection, ``4d x d`` and ``d x 4d`` MLP), stacked ``--layers`` deep as the optimizer
batches them, it times side by side (interleaved rounds, medians):

* Muon's msign: Newton-Schulz 5 steps in bf16 (``torch.optim.Muon``'s), Polar Express 10
  steps in float32 (our improved mode's) and bf16 (paper and fast mode's), and 7 steps;
* the retraction: Polar Express 10 steps (before) vs ``msign_near_orthogonal`` (now);
* the repair's spectral norm: eigendecomposition (improved mode) vs 16 Lanczos steps from one
  start vector, the Ritz value alone (before) vs 16 block steps from two, plus the residual (fast);
* one evaluation of the improved solver's dual (its unit of work, ~1-8 per L-BFGS iteration):
  the matrix form (an ``m x n`` float32 msign) vs the Gram form (``n x n``, float64, and float32,
  which is too inaccurate to use: ``optim/nuclear_dual.py``), with the Gram form's once-per-solve
  set-up (``W^T W``, ``W^T G``, ``G^T G``) left out;
* fast mode's whole direction (``solve_direction(mode="fast")``) with a float32 msign, with a
  bf16 msign of 10 steps fed by a float32 warm start (before) and the default (a bf16 warm
  start and 7 steps), and
  the default plus its retraction: the Manifold Muon step's matrix work, also with the float32
  matmuls lowered (``matmul_precision`` 'high' and 'medium': TF32 on a GPU).

Every row is also given as a multiple of Muon's msign (Newton-Schulz, bf16).  On a CPU only
these ratios mean anything.  Usage: python benchmarks/fast_path.py [--d 384] [--layers 6]
"""
import argparse
import platform
import statistics
import time

import torch

from functools import partial

from manifold_muon.lab.bench import synchronize, write_result
from manifold_muon.optim import get_manifold, solve_direction
from manifold_muon.optim.dual import _fast, spectral_norm, spectral_norm_estimate  # _fast: the "before" row
from manifold_muon.optim.manifolds import as_tall
from manifold_muon.optim.precision import float32_matmul_precision
from manifold_muon.optim.msign import msign, quintic_schedule
from manifold_muon.optim.nuclear_dual import GramDual, MatrixDual
from norm_estimate import ritz_value_norm   # a sibling script: its "ritz, 1 start" row, timed here


def stacks(d: int, layers: int, manifold: str, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(W on the manifold, a gradient-like G, W moved by 0.02 A) per shape."""
    gen = torch.Generator().manual_seed(0)
    man = get_manifold(manifold)
    out = []
    for m, n in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d)):
        w = man.init(torch.randn(layers, m, n, generator=gen)).to(device)
        low_rank = torch.randn(layers, m, 16, generator=gen) @ torch.randn(layers, 16, n, generator=gen)
        g = (0.01 * (low_rank + 0.3 * torch.randn(layers, m, n, generator=gen))).to(device)
        a = solve_direction(w, g, man, mode="fast").direction
        out.append((w, g, w - 0.02 * a))
    return out


def levers(manifold: str):
    man = get_manifold(manifold)
    bf16 = torch.bfloat16
    return {
        "muon msign: newton-schulz 5, bf16": lambda w, g, x: msign(g, "newton_schulz", dtype=bf16),
        "msign: polar express 10, fp32": lambda w, g, x: msign(g, dtype=torch.float32),
        "msign: polar express 10, bf16": lambda w, g, x: msign(g, dtype=bf16),
        "msign: polar express 7, bf16": lambda w, g, x: msign(g, steps=7, dtype=bf16),
        "retraction: polar express 10 (before)": lambda w, g, x: msign(x, dtype=torch.float32),
        "retraction: near-orthogonal (now)": lambda w, g, x: man.retract(x),
        "norm: eigendecomposition": lambda w, g, x: spectral_norm(g),
        "norm: lanczos 16, 1 start vector, Ritz value (before)": lambda w, g, x: ritz_value_norm(g, block=1),
        "norm: block lanczos 16, 2 start vectors, + residual (now)": lambda w, g, x: spectral_norm_estimate(g),
        "dual evaluation: matrix form, fp32 msign": lambda w, g, x: dual_evaluation(man, w, g, "matrix"),
        "dual evaluation: gram form, fp64": lambda w, g, x: dual_evaluation(man, w, g, "gram64"),
        "dual evaluation: gram form, fp32 (inaccurate)": lambda w, g, x: dual_evaluation(man, w, g, "gram32"),
        "fast direction, fp32": lambda w, g, x: solve_direction(w, g, man, mode="fast", dtype=torch.float32),
        "fast direction, bf16, fp32 warm start, 10 steps (before)": lambda w, g, x: _fast(
            man, as_tall(w)[0], as_tall(g)[0], partial(msign, dtype=bf16), torch.float32),
        "fast direction, bf16 (default)": lambda w, g, x: solve_direction(w, g, man, mode="fast"),
        "fast direction + retraction": lambda w, g, x: fast_step(man, w, g),
        # float32 matmuls lowered as a param group's matmul_precision does: TF32 on GPUs at
        # both levels; on CPUs 'high' changes nothing and 'medium' is bf16 where bf16 units exist.
        "fast direction + retraction, matmuls 'high'": lambda w, g, x: lowered(fast_step, "high", man, w, g),
        "fast direction + retraction, matmuls 'medium'": lambda w, g, x: lowered(fast_step, "medium", man, w, g),
    }


_DUALS: dict = {}   # (stack, form) -> (dual, start): built once, outside the timed evaluations


def dual_evaluation(man, w, g, form):
    key = (id(w), form)
    if key not in _DUALS:
        wt, gt = as_tall(w)[0], as_tall(g)[0]
        if form == "matrix":
            dual = MatrixDual(man, wt, gt, partial(msign, dtype=torch.float32))
        else:
            dual = GramDual(man, wt, gt, quintic_schedule("polar_express"),
                            dtype=torch.float64 if form == "gram64" else torch.float32)
        _DUALS[key] = (dual, -man.normal_coefficients(wt, gt))
    dual, start = _DUALS[key]
    return dual(start)


def fast_step(man, w, g):
    return man.retract(w - 0.02 * solve_direction(w, g, man, mode="fast").direction)


def lowered(fn, level, *args):
    with float32_matmul_precision(level):
        return fn(*args)


def run(d: int, layers: int, manifold: str, rounds: int, device) -> dict:
    _DUALS.clear()   # keyed by id(): a freed stack's id may come back for the next manifold's
    data = stacks(d, layers, manifold, device)
    fns = levers(manifold)
    times = {name: [] for name in fns}
    for r in range(rounds + 1):  # round 0 warms up
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            for w, g, x in data:
                fn(w, g, x)
            synchronize(device)
            if r:
                times[name].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["muon msign: newton-schulz 5, bf16"])
    return {name: {"ms": statistics.median(t), "vs_muon": statistics.median(t) / base} for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=384, help="model width (GPT-2 small: 768)")
    parser.add_argument("--layers", type=int, default=6, help="layers, i.e. matrices per shape")
    parser.add_argument("--manifolds", default="stiefel,dgram")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda"
              else platform.processor() or "cpu", "torch": torch.__version__, "d": args.d, "layers": args.layers,
              "threads": torch.get_num_threads(), "rows": {}}
    for manifold in args.manifolds.split(","):
        result["rows"][manifold] = run(args.d, args.layers, manifold, args.rounds, device)
        print(f"\n{manifold}: d={args.d}, {args.layers} matrices per shape, {result['device']}")
        print(f"{'lever':54s} {'ms':>9s} {'x muon msign':>13s}")
        for name, row in result["rows"][manifold].items():
            print(f"{name:54s} {row['ms']:9.1f} {row['vs_muon']:13.2f}")
    name = f"fast_path_{result['date']}_d{args.d}_{device.type}.json"
    print(f"\nsaved: {write_result(result, args.out, name)}")


if __name__ == "__main__":
    main()
