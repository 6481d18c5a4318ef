"""Direction quality on real momenta: paper mode, fast mode and the improved solver at several caps.

Loads a finished run's checkpoint (weights and Muon momentum buffers), and for every
constrained matrix group (attention / MLP x manifold) solves the direction for the
momentum ``G`` at the weights ``W`` with paper mode (the reference's 20 steps), fast mode
(its defaults: bf16 msign, Lanczos rescale) and the improved solver (float32 msign) capped at
0, 2, 4, ... iterations.  Per setting it reports, averaged over the
group's matrices:

* ``alignment`` ``<G, A> / ||G||_*`` of the direction as returned;
* ``violation`` ``RMS(P(sym(W^T A)))``: 0 when A is tangent (feasible);
* ``repaired``: the alignment after making A feasible (exact tangent projection, then a
  rescale to spectral norm 1), the fair comparison for an infeasible paper-mode direction;
* ``of_bound``: alignment / the smallest dual value found (a certified upper bound), so 1.0
  means provably optimal;
* ``evaluations``: the improved solver's dual evaluations (msigns), its unit of cost;
* ``ms``: wall time of the solve for the whole group (relative only; ``--device`` picks where,
  default a GPU when present).

This asks, without a GPU, how few iterations keep
the direction at least as good as the paper's.
Usage: python benchmarks/direction_quality.py RUN_DIR [RUN_DIR ...] [--caps 0,2,4,8,16,32,128]
       [--device auto|cpu|cuda] [--random-tokens PRESET:ALLOCATION:STEPS ...] [--tag TAG]
"""
import argparse
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from manifold_muon.lab.bench import synchronize, write_result
from manifold_muon.lab.config import config_from_dict, make_config
from manifold_muon.lab.diagnostics import module_group
from manifold_muon.lab.model import GPT
from manifold_muon.optim import ManifoldMuon, get_manifold, resolve, solve_direction
from manifold_muon.optim.dual import alignment, repaired_alignment, singular_values
from manifold_muon.optim.manifolds import as_tall
from manifold_muon.lab.train import _param_groups


def load_momenta(run_dir: Path) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """``{(group, manifold, shape): (W stack, G stack)}`` from a run's checkpoint, tall orientation."""
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    model = GPT(cfg.model)
    opt = ManifoldMuon(_param_groups(model, cfg))
    ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    return momenta_of(opt)


def random_token_momenta(spec: str, batch_size: int):
    """``PRESET:ALLOCATION:STEPS``: that model after STEPS fast-mode steps on random tokens (as
    ``manifold-muon bench`` sees it): early momenta at a preset's shapes, with no data or checkpoint."""
    preset, allocation, steps = spec.split(":")
    cfg = make_config(preset, {"batch_size": str(batch_size)})
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    opt = ManifoldMuon(resolve(model, allocation, mode="fast"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(int(steps)):
        x = torch.randint(cfg.model.vocab_size, (cfg.batch_size, cfg.model.block_size), generator=gen)
        model(x, x.roll(-1, dims=1))[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return momenta_of(opt)


def momenta_of(opt: ManifoldMuon):
    stacks = defaultdict(list)
    for group in opt.param_groups:
        if group["algorithm"] != "muon" or not get_manifold(group["manifold"]).has_dual:
            continue
        for name, p in zip(group["names"], group["params"]):
            w, _ = as_tall(p.detach().float())
            g, _ = as_tall(opt.state[p]["momentum_buffer"].float())
            stacks[(module_group(name), group["manifold"], tuple(w.shape))].append((w, g))
    return {key: (torch.stack([w for w, _ in pairs]), torch.stack([g for _, g in pairs])) for key, pairs in stacks.items()}


def dual_value(w, g, s) -> torch.Tensor:
    """``||G + W S||_* / ||G||_*`` for the improved solver's multiplier (it works on G / scale)."""
    scale = g.norm(dim=(-2, -1), keepdim=True) / g.shape[-1] ** 0.5
    nuclear = singular_values(g, torch.float64).sum(-1)
    return singular_values(g + w @ (s * scale), torch.float64).sum(-1) / nuclear


def measure(w, g, manifold_name, caps) -> list[dict]:
    manifold = get_manifold(manifold_name)
    rows, bounds = [], []
    settings = [("paper", None), ("fast", None)] + [("improved", c) for c in caps]
    names = {"paper": "paper (20 steps)", "fast": "fast (bf16)"}
    for mode, cap in settings:
        synchronize(w.device)
        t0 = time.perf_counter()
        r = solve_direction(w, g, manifold, mode=mode, steps=cap)
        synchronize(w.device)
        ms = (time.perf_counter() - t0) * 1e3
        if mode == "improved":
            bounds.append(dual_value(w, g, r.dual))
        rows.append({"setting": names.get(mode, f"improved, cap {cap}"), "ms": ms,
                     "alignment": alignment(g, r.direction), "violation": manifold.tangent_violation(w, r.direction),
                     "repaired": repaired_alignment(manifold, w, g, r.direction), "iterations": r.steps_taken,
                     "evaluations": r.evaluations})
    bound = torch.stack(bounds).min(dim=0).values
    for row in rows:
        row["of_bound"] = statistics.mean((row["repaired"] / bound).tolist())
        for key in ("alignment", "violation", "repaired"):
            row[key] = statistics.mean(row[key].double().tolist())
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="run directories holding ckpt.pt")
    ap.add_argument("--random-tokens", action="append", default=[], metavar="PRESET:ALLOCATION:STEPS",
                    help="also measure a fresh model after STEPS steps on random tokens (repeatable)")
    ap.add_argument("--batch-size", type=int, default=4, help="batch size of the --random-tokens steps")
    ap.add_argument("--tag", default="", help="added to the JSON's name, e.g. to keep two sets of the same day")
    ap.add_argument("--caps", default="0,2,4,8,16,32,128", help="improved-solver iteration caps")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="auto", help="where to solve: auto (a GPU when present), cpu, cuda")
    args = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    caps = [int(c) for c in args.caps.split(",") if c]
    torch.manual_seed(0)
    if not args.runs and not args.random_tokens:
        ap.error("give run directories, --random-tokens, or both")
    sources = []
    for run in args.runs:
        if not (run / "ckpt.pt").is_file():
            sys.exit(f"error: {run} holds no ckpt.pt")
        sources.append((run.name, lambda run=run: load_momenta(run)))
    for spec in args.random_tokens:
        if spec.count(":") != 2:
            sys.exit(f"error: --random-tokens wants PRESET:ALLOCATION:STEPS, got {spec!r}")
        sources.append((f"random:{spec}", lambda spec=spec: random_token_momenta(spec, args.batch_size)))
    table = []
    for label, momenta in sources:
        for (group, manifold, shape), (w, g) in momenta().items():
            for row in measure(w.to(device), g.to(device), manifold, caps):
                table.append({"run": label, "group": group, "manifold": manifold,
                              "shape": f"{len(w)}x{shape[0]}x{shape[1]}", **row})
    head = f"{'run':28} {'group':9} {'manifold':8} {'stack':10} {'setting':18} {'align':>6} {'viol':>8} {'repaired':>8} {'of bound':>8} {'ms':>7}"
    lines = [head] + [f"{r['run']:28} {r['group']:9} {r['manifold']:8} {r['shape']:10} {r['setting']:18} {r['alignment']:6.3f} "
                      f"{r['violation']:8.1e} {r['repaired']:8.3f} {r['of_bound']:8.3f} {r['ms']:7.1f}" for r in table]
    print("\n".join(lines))
    tag = f"_{args.tag}" if args.tag else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    path = write_result({"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "rows": table},
                        args.out, f"direction_quality_{time.strftime('%Y-%m-%d')}{tag}_{device.type}.json")
    print(f"saved: {path}")


if __name__ == "__main__":
    main()
