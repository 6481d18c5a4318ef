"""The direction solver's quality-cost frontier: every mode's quality against a certified bound,
its matmul FLOPs as a multiple of one msign, and its CPU time as a multiple of a float32 msign.

Problems (each a weight ``W`` on its manifold and a momentum ``G``, tall orientation):

* momenta from short training runs from random initialisation on the embedded corpus
  (``data/shakespeare``; random tokens where it is not prepared): a reduced GPT (the
  ``cpu-small`` shapes, 192x64 ... 64x256) and one block at GPT-2 small's width (2304x768,
  768x768, 3072x768, 768x3072 as ``nn.Linear`` stores them), both trained with ``all-stiefel``
  and ``all-dgram`` in fast mode, the DGram weights with their own, unequal column norms;
* synthetic ones: Gaussian, power-law (condition number 1e3) and low-rank-plus-noise momenta at
  points of Stiefel, DGram (column norms in [0.3, 3]) and Oblique, tall and wide.

Quality is ``<G, A> / bound`` for ``A`` made feasible (exact tangent projection, spectral norm
1; a feasible direction is left as it is), where ``bound`` is the smallest of
``||G + W S||_*`` over every multiplier any solver produced, evaluated exactly in float64: a
valid upper bound on ``<G, A>`` for every feasible ``A`` (weak duality), so reported quality
is a lower bound on the true one.  FLOPs are counted with ``torch.utils.flop_counter``; a mode
that runs a decomposition of an ``n x n`` or larger matrix is flagged (Krylov-sized ones, 64
or less, are not).  ``warm`` solves the next step's
momentum from the multiplier carried from the step before, as the optimizer does.

Usage: python benchmarks/solver_frontier.py [--widths 64,768] [--steps 6] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import re
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from manifold_muon.lab.bench import write_result
from manifold_muon.lab.config import make_config
from manifold_muon.lab.data import BatchSampler, TokenData
from manifold_muon.lab.model import GPT
from manifold_muon.optim import ManifoldMuon, get_manifold, msign, resolve, solve_direction
from manifold_muon.optim.dual import repaired_alignment, singular_values
from manifold_muon.lab.decompositions import DecompositionRecorder
from manifold_muon.optim.manifolds import as_tall

SETTINGS = [("fast", None), ("improved", 2), ("improved", 8), ("improved", 32), ("improved", None), ("paper", None)]


def label(mode: str, cap) -> str:
    return mode if cap is None else f"{mode}, cap {cap}"


def training_momenta(width: int, layers: int, allocation: str, steps: int, data_dir: Path) -> list[tuple]:
    """(W, G at step steps-1, G at step steps, manifold, name) of every Manifold Muon matrix of a
    GPT trained ``steps`` fast-mode steps from its initialisation."""
    cfg = make_config("cpu-small", {"n_embd": str(width), "n_layer": str(layers), "n_head": str(max(1, width // 64)),
                                    "batch_size": "4"})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = ManifoldMuon(resolve(model, allocation, mode="fast"))
    sampler = None
    if (data_dir / "meta.json").exists():
        data = TokenData.load(data_dir, block_size=cfg.model.block_size, vocab_size=cfg.model.vocab_size)
        sampler = BatchSampler(data, block_size=cfg.model.block_size, seed=0)
    gen, momenta = torch.Generator().manual_seed(0), []
    for step in range(steps):
        if sampler:
            x, y = sampler.windows("train", sampler.global_offsets("train", cfg.batch_size))
        else:
            x = torch.randint(cfg.model.vocab_size, (cfg.batch_size, cfg.model.block_size), generator=gen)
            y = x.roll(-1, dims=1)
        model(x, y)[1].backward()
        if step >= steps - 2:   # the Nesterov momentum the next step will see, before it is taken
            momenta.append(_nesterov(opt))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [(w, g_prev, g, manifold, name, stored) for (w, g_prev, manifold, name, stored), (_, g, _, _, _) in zip(*momenta)]


def _nesterov(opt) -> list[tuple]:
    out = []
    for group in opt.param_groups:
        if group["algorithm"] != "muon" or not get_manifold(group["manifold"]).has_dual:
            continue
        beta = group["momentum"]
        for name, p in zip(group["names"], group["params"]):
            buf = opt.state[p].get("momentum_buffer", torch.zeros_like(p))
            g = p.grad + beta * (beta * buf + p.grad)
            out.append((as_tall(p.detach().float())[0], as_tall(g.float())[0], group["manifold"], name, tuple(p.shape)))
    return out


def synthetic(stored: tuple, kind: str, manifold: str, seed: int) -> tuple:
    """A problem in tall orientation; ``stored`` is the shape a layer would hold (wide or tall)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = max(stored), min(stored)
    base = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if manifold == "dgram":   # orthogonal columns of norms in [0.3, 3]
        w = get_manifold("stiefel").init(base) * torch.logspace(-0.52, 0.48, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    else:
        w = get_manifold(manifold).init(base)
    u, _, v = torch.linalg.svd(torch.randn(m, n, generator=gen, dtype=torch.float64), full_matrices=False)
    if kind == "gaussian":
        g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    elif kind == "power-law":
        g = (u * torch.logspace(0, -3, n, dtype=torch.float64)) @ v
    else:   # low rank plus noise
        r = max(1, n // 8)
        g = u[:, :r] @ torch.diag(torch.linspace(3, 1, r, dtype=torch.float64)) @ v[:r] + 0.05 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    g2 = g + 0.02 * g.norm() / (m * n) ** 0.5 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    return w.float(), g.float(), g2.float(), manifold, f"{kind} {m}x{n}", stored


def nuclear_bound(w, g, s) -> float:
    """``||G + W S c||_*`` in float64 for a multiplier in units of ``G / c`` (c: G's RMS singular value)."""
    scale = g.norm() / g.shape[-1] ** 0.5
    return float(singular_values((g + w @ (s * scale)).double(), torch.float64).sum())


def run_setting(w, g, manifold, mode, cap, dual_init=None) -> dict:
    with FlopCounterMode(display=False) as flops, DecompositionRecorder(min_size=max(w.shape[-1], 65)) as decomps:
        t0 = time.perf_counter()
        r = solve_direction(w, g, manifold, mode=mode, steps=cap, dual_init=dual_init)
        seconds = time.perf_counter() - t0
    return {"result": r, "flops": flops.get_total_flops(), "seconds": seconds, "decompositions": decomps.names}


def measure(problem, full: bool = True) -> list[dict]:
    """Every setting on one problem; ``full=False`` skips the uncapped and warm improved solves
    (minutes a matrix at GPT-2 small's width on a CPU), whose certificate then comes from cap 32."""
    w, g_prev, g, manifold, name, stored = problem
    manifold_obj = get_manifold(manifold)
    with FlopCounterMode(display=False) as flops:
        msign(g, dtype=torch.float32)
    msign_flops = flops.get_total_flops()
    t0 = time.perf_counter()
    for _ in range(3):
        msign(g, dtype=torch.float32)
    msign_seconds = (time.perf_counter() - t0) / 3
    runs = {label(mode, cap): run_setting(w, g, manifold, mode, cap) for mode, cap in SETTINGS
            if full or not (mode == "improved" and cap is None)}
    if full:
        carried = solve_direction(w, g_prev, manifold, mode="improved").dual
        runs["improved, warm"] = run_setting(w, g, manifold, "improved", None, dual_init=carried)
    bounds = [nuclear_bound(w, g, -manifold_obj.normal_coefficients(w, g / (g.norm() / g.shape[-1] ** 0.5)))]
    bounds += [nuclear_bound(w, g, r["result"].dual) for key, r in runs.items() if key.startswith("improved")]
    bound = min(bounds)
    rows = []
    for key, r in runs.items():
        quality = float(repaired_alignment(manifold_obj, w, g, r["result"].direction)) * float(
            singular_values(g.double(), torch.float64).sum()) / bound
        rows.append({"problem": name, "manifold": manifold, "shape": list(stored), "setting": key, "quality": quality,
                     "flops_per_msign": r["flops"] / msign_flops, "time_per_msign": r["seconds"] / msign_seconds,
                     "decompositions": r["decompositions"], "iterations": r["result"].steps_taken,
                     "evaluations": r["result"].evaluations})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    keys = sorted({(r["setting"], r["manifold"], tuple(r["shape"])) for r in rows},
                  key=lambda k: ([label(*s) for s in SETTINGS] + ["improved, warm"]).index(k[0]))
    for setting, manifold, shape in keys:
        group = [r for r in rows if (r["setting"], r["manifold"], tuple(r["shape"])) == (setting, manifold, shape)]
        table.append({"setting": setting, "manifold": manifold, "shape": "x".join(map(str, shape)), "problems": len(group),
                      "quality_worst": min(r["quality"] for r in group),
                      "quality_median": statistics.median(r["quality"] for r in group),
                      "flops_per_msign": statistics.median(r["flops_per_msign"] for r in group),
                      "time_per_msign": statistics.median(r["time_per_msign"] for r in group),
                      "decompositions": sorted({d for r in group for d in r["decompositions"]})})
    return table


def format_table(table: list[dict]) -> str:
    lines = ["| setting | manifold | shape | problems | quality, worst | median | FLOPs / msign | CPU time / msign | n x n decompositions |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['setting']} | {t['manifold']} | {t['shape']} | {t['problems']} | {t['quality_worst']:.3f} | "
                     f"{t['quality_median']:.3f} | {t['flops_per_msign']:.1f} | {t['time_per_msign']:.1f} | "
                     f"{', '.join(t['decompositions']) or 'none'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="64,768", help="model widths of the training momenta (64: cpu-small; 768: GPT-2 small)")
    ap.add_argument("--steps", type=int, default=6, help="fast-mode training steps before the momenta are taken")
    ap.add_argument("--synthetic", default="96x32,32x96", help="shapes of the synthetic problems (empty: none)")
    ap.add_argument("--per-shape", type=int, default=1, help="training matrices kept per (manifold, shape)")
    ap.add_argument("--data_dir", default="data/shakespeare", type=Path)
    ap.add_argument("--full-below", type=int, default=512,
                    help="widths from this up skip the uncapped and warm improved solves (default 512)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problems = []
    for width in (int(x) for x in args.widths.split(",") if x):
        for allocation in ("all-stiefel", "all-dgram"):
            kept: dict = {}
            for p in training_momenta(width, 1 if width >= 512 else 2, allocation, args.steps, args.data_dir):
                key = (p[3], re.sub(r"\.\d+\.", ".", p[4]))   # one matrix of each kind: c_attn, attn.c_proj ...
                if len(kept.setdefault(key, [])) < args.per_shape:
                    kept[key].append(p)
            problems += [p for ps in kept.values() for p in ps]
    for shape in (s for s in args.synthetic.split(",") if s):
        m, n = map(int, shape.split("x"))
        for manifold in ("stiefel", "dgram", "oblique"):
            for seed, kind in enumerate(("gaussian", "power-law", "low-rank")):
                problems.append(synthetic((m, n), kind, manifold, seed))
    rows = []
    for i, problem in enumerate(problems):
        print(f"[{i + 1}/{len(problems)}] {problem[3]} {problem[4]} {tuple(problem[0].shape)}", flush=True)
        rows += measure(problem, full=problem[0].shape[-1] < args.full_below)
    table = summarize(rows)
    print(format_table(table))
    result = {"date": time.strftime("%Y-%m-%d"), "device": platform.processor() or "cpu", "torch": torch.__version__,
              "threads": args.threads, "steps": args.steps, "data_dir": str(args.data_dir), "table": table, "rows": rows}
    print(write_result(result, args.out, f"solver_frontier_{result['date']}_cpu.json"))


if __name__ == "__main__":
    main()
