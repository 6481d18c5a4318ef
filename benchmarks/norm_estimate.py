"""How far fast mode's spectral-norm estimate is from the true norm, along fast-mode training.

Fast mode rescales its direction ``A`` to ``||A||_2 <= 1`` by an estimate
(``spectral_norm_estimate``), not an eigendecomposition.  This trains a GPT in fast mode on a
prepared token folder for ``--steps`` steps per allocation and, every ``--every`` steps, takes
every matrix fast mode rescales (the estimate's own input, recorded where the step calls it)
and compares three estimates with the exact norm (float64 eigenvalues of the small Gram):

* ``ritz, 1 start``: the top Ritz value of 16 Lanczos steps from one start vector (before);
* ``ritz, 2 starts``: the same from two start vectors (block Lanczos, 16 steps);
* ``+ residual``: that plus its Ritz pair's residual norm (``spectral_norm_estimate``, now).

Per manifold and shape it reports the largest shortfall ``1 - estimate / exact`` (a
shortfall leaves ``||A||_2 > 1`` after the rescale), how often it exceeds 1e-4, and the
largest and median overshoot (a step that much shorter than it could be).  Learning rates are
the preset's peak ones, held constant.  Usage:
  python benchmarks/norm_estimate.py [--preset gpt2-reduced] [--set n_layer=2 ...]
         [--allocations hetero,all-dgram] [--steps 150] [--every 10] [--data data/local-corpus]
"""
import argparse
import platform
import statistics
import sys
import time
from collections import defaultdict

import torch
from tqdm import tqdm

import manifold_muon.optim.dual as dual_module
from manifold_muon.lab.bench import write_result
from manifold_muon.lab.config import make_config
from manifold_muon.lab.data import BatchSampler, DataError, TokenData
from manifold_muon.lab.model import GPT
from manifold_muon.optim import ManifoldMuon, resolve
from manifold_muon.optim.manifolds import as_tall
from manifold_muon.optim.norms import singular_values, spectral_norm_estimate, top_ritz_pair

DEFAULT_SETTINGS = ["n_layer=2", "block_size=128", "batch_size=8"]


def ritz_value_norm(a: torch.Tensor, block: int) -> torch.Tensor:
    """``||A||_2`` per matrix from the top Ritz value alone of 16 Lanczos steps on the small Gram,
    from ``block`` start vectors: a lower bound (``block=1`` is fast mode's estimate before
    2026-12-03).  ``benchmarks/fast_path.py`` times it."""
    tall = as_tall(a)[0].float()
    return top_ritz_pair(tall.mT @ tall, steps=16, block=block)[0].clamp(min=0).sqrt()


def estimates(a: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three estimates of ``||A||_2`` per matrix of a stack; "+ residual" is fast mode's own."""
    return {"ritz, 1 start": ritz_value_norm(a, block=1), "ritz, 2 starts": ritz_value_norm(a, block=2),
            "+ residual": spectral_norm_estimate(a)}


class Recorder:
    """Stands in for the estimate inside the fast step; records only while ``on``."""

    def __init__(self, manifold_of: dict):
        self.manifold_of = manifold_of   # tall shape -> manifold name, for the row labels
        self.on, self.rows = False, defaultdict(lambda: defaultdict(list))

    def __call__(self, a):
        if not self.on:
            return spectral_norm_estimate(a)
        m, n = a.shape[-2:]
        key = f"{self.manifold_of.get((m, n), '?')} {m}x{n}"
        exact = singular_values(a, torch.float64)[..., -1].clamp(min=1e-30)
        values = estimates(a)
        for name, estimate in values.items():
            self.rows[key][name] += (1 - estimate.double() / exact).flatten().tolist()
        return values["+ residual"]   # what the step would have got, computed once


def train_and_record(cfg, allocation: str, data: TokenData, steps: int, every: int, device) -> dict:
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model).to(device)
    groups = resolve(model, allocation, mode="fast")
    for g in groups:
        g["lr"] = cfg.muon_lr if g["algorithm"] == "muon" else cfg.adamw_lr
    opt = ManifoldMuon(groups)
    sampler = BatchSampler(data, block_size=cfg.model.block_size, seed=cfg.seed)
    manifold_of = {}
    for g in (g for g in groups if g["algorithm"] == "muon"):
        for p in g["params"]:
            shape = tuple(as_tall(p)[0].shape)
            manifold_of[shape] = g["manifold"] if manifold_of.get(shape, g["manifold"]) == g["manifold"] else "mixed"
    recorder = Recorder(manifold_of)
    original = dual_module.spectral_norm_estimate
    # The rescaled matrix exists only inside the step: recording it where the step calls the
    # estimate measures exactly what training feeds it.
    dual_module.spectral_norm_estimate = recorder
    try:
        for step in tqdm(range(steps), desc=allocation, unit="step"):
            x, y = (t.to(device) for t in sampler.windows("train", sampler.global_offsets("train", cfg.batch_size)))
            recorder.on = step % every == every - 1
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        dual_module.spectral_norm_estimate = original
    return recorder.rows


def summarize(shortfalls: list[float]) -> dict:
    over = [-s for s in shortfalls]
    return {"matrices": len(shortfalls), "max_shortfall": max(shortfalls),
            "short_by_over_1e-4": sum(s > 1e-4 for s in shortfalls) / len(shortfalls),
            "max_overshoot": max(over), "median_overshoot": statistics.median(over)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-reduced", help="config preset for the model and learning rates")
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                    help=f"config overrides (repeatable; default {' '.join(DEFAULT_SETTINGS)})")
    ap.add_argument("--allocations", default="hetero,all-dgram")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=10, help="record every this many steps")
    ap.add_argument("--data", default="data/local-corpus", help="a prepared token folder")
    ap.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda")
    ap.add_argument("--tag", default="", help="added to the JSON's name")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    settings = DEFAULT_SETTINGS if args.set is None else args.set
    bad = [s for s in settings if "=" not in s]
    if bad:
        ap.error(f"--set wants KEY=VALUE, got {bad[0]!r}")
    if args.steps < 1 or not 1 <= args.every <= args.steps:
        ap.error(f"need steps >= 1 and 1 <= every <= steps, got steps={args.steps}, every={args.every}")
    try:
        cfg = make_config(args.preset, dict(s.split("=", 1) for s in settings))
        data = TokenData.load(args.data, block_size=cfg.model.block_size, vocab_size=cfg.model.vocab_size)
    except (ValueError, DataError) as e:
        sys.exit(f"error: {e}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rows = []
    for allocation in args.allocations.split(","):
        for shape, by_estimate in train_and_record(cfg, allocation, data, args.steps, args.every, device).items():
            for name, shortfalls in by_estimate.items():
                rows.append({"allocation": allocation, "shape": shape, "estimate": name, **summarize(shortfalls)})
    head = f"{'allocation':10} {'matrices':18} {'estimate':15} {'n':>5} {'max short':>10} {'>1e-4':>7} {'max over':>9} {'med over':>9}"
    print(head)
    for r in rows:
        print(f"{r['allocation']:10} {r['shape']:18} {r['estimate']:15} {r['matrices']:5d} {r['max_shortfall']:10.1e} "
              f"{r['short_by_over_1e-4']:7.3f} {r['max_overshoot']:9.1e} {r['median_overshoot']:9.1e}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    tag = f"_{args.tag}" if args.tag else ""
    path = write_result({"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
                         "preset": args.preset, "settings": settings, "steps": args.steps, "every": args.every,
                         "rows": rows}, args.out, f"norm_estimate_{time.strftime('%Y-%m-%d')}{tag}_{device.type}.json")
    print(f"saved: {path}")


if __name__ == "__main__":
    main()
