"""Direction quality on DGram as its columns grow, the momentum held fixed: paper vs improved.

DGram leaves column norms free, so training can grow them (the paper's sigma_max growth).
The reference's dual ascent takes a fixed step ``alpha`` on a dual whose curvature grows with
``W``'s column norms squared, and does not normalise ``G``; the improved solver's step and stop
scale with both.  This script puts an orthogonal ``W`` at column norm ``c`` for several ``c``,
keeps one low-rank-plus-noise momentum ``G`` (spectral norm ``--momentum-norm``, as the runs'
momenta), and reports for each mode the alignment ``<G, A> / ||G||_*``, the alignment of the
direction made feasible, and the tangent violation ``RMS(P(sym(W^T A)))``.

It explains what ``results/cpu-small-lr8x`` shows over training: with the paper's solver the
DGram attention's alignment fell as its sigma_max rose, and the growth stopped.
Usage: python benchmarks/dgram_scale.py [--scales 0.3,1,2,4,8,16] [--shape 192x64] [--out DIR]
"""
import argparse
import platform
import time

import torch

from manifold_muon.lab.bench import write_result
from manifold_muon.optim.dual import alignment, repaired_alignment, solve_direction
from manifold_muon.optim.manifolds import DGram


def problem(m: int, n: int, momentum_norm: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal ``W`` (column norm 1) and a rank-8-plus-noise ``G`` of the given spectral norm."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64))
    g = (torch.randn(m, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, n, generator=gen, dtype=torch.float64)
         + 0.3 * torch.randn(m, n, generator=gen, dtype=torch.float64))
    return q.float(), (momentum_norm * g / torch.linalg.matrix_norm(g, ord=2)).float()


def measure(w: torch.Tensor, g: torch.Tensor, mode: str) -> dict:
    manifold = DGram()
    result = solve_direction(w, g, manifold, mode=mode)
    return {"alignment": alignment(g, result.direction).item(),
            "feasible": repaired_alignment(manifold, w, g, result.direction).item(),
            "violation": result.violation_end.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="0.3,1,2,4,8,16", help="column norms of W to try")
    parser.add_argument("--shape", default="192x64", help="W's shape, tall (default: c_attn at d=64)")
    parser.add_argument("--momentum-norm", type=float, default=0.3, help="G's spectral norm (the runs': 0.1-0.8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="where the JSON goes")
    args = parser.parse_args()
    try:
        m, n = (int(x) for x in args.shape.lower().split("x"))
        scales = [float(s) for s in args.scales.split(",") if s]
    except ValueError:
        parser.error(f"--shape is MxN and --scales comma-separated numbers, got {args.shape!r} and {args.scales!r}")
    if m < n:
        parser.error(f"--shape must be tall (m >= n), got {args.shape!r}")
    w, g = problem(m, n, args.momentum_norm, args.seed)
    rows = [{"scale": c, "mode": mode, **measure(w * c, g, mode)} for c in scales for mode in ("paper", "improved")]
    path = write_result({"shape": [m, n], "momentum_norm": args.momentum_norm, "seed": args.seed,
                         "torch": torch.__version__, "machine": platform.machine(), "rows": rows},
                        args.out, f"dgram_scale_{time.strftime('%Y-%m-%d')}_{m}x{n}_cpu.json")
    print("column norm | paper: align / feasible / violation | improved: align / feasible / violation")
    for c in scales:
        p, i = (next(r for r in rows if r["scale"] == c and r["mode"] == mode) for mode in ("paper", "improved"))
        print(f"{c:11g} | {p['alignment']:.3f} / {p['feasible']:.3f} / {p['violation']:.1e}"
              f" | {i['alignment']:.3f} / {i['feasible']:.3f} / {i['violation']:.1e}")
    print(f"saved: {path}")


if __name__ == "__main__":
    main()
