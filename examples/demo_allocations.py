"""Train a small stock ``nn.TransformerEncoder`` LM with the paper's five allocations.

The model is PyTorch's own (names ``self_attn.in_proj_weight``, ``linear1`` ...).  The presets
know those names (``resolve(model, "hetero")`` works here); the allocations are written out as
rules instead, with a larger AdamW rate for this toy task, to show how you would write them for
a model whose names the presets do not know.
The task is a synthetic Markov chain (learnable; loss must fall), which takes seconds on
a CPU.  It shows the optimizer working and keeping each weight on its manifold; it cannot
show the paper's findings, which need a real corpus and many thousands of steps.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from manifold_muon import PAPER_ALLOCATIONS, ManifoldMuon, Rule, format_allocation, get_manifold, get_preset, resolve
from manifold_muon.optim.dual import DIRECTION_MODES

ATTN = r"self_attn\.(in_proj_weight|out_proj\.weight)$"
MLP = r"linear[12]\.weight$"
# each paper preset's first two rules are attention's and the MLP's: take their geometries
ALLOCATIONS = {name: tuple(rule.manifold for rule in get_preset(name)[:2]) for name in PAPER_ALLOCATIONS}


def rules_for(attention: str, mlp: str) -> list[Rule]:
    def muon(pattern, manifold):
        return Rule(pattern, "muon", manifold, lr=0.02, weight_decay=0.1 if manifold == "none" else 0.0)
    return [muon(ATTN, attention), muon(MLP, mlp),
            Rule(".", "adamw", ndim=1, lr=3e-3, weight_decay=0.0), Rule(".", "adamw", lr=3e-3, weight_decay=0.1)]


class TinyLM(nn.Module):
    def __init__(self, vocab, d, layers, ctx):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(ctx, d))
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        return self.head(self.body(self.embed(idx) + self.pos[: idx.shape[1]], mask=mask, is_causal=True))


def markov_data(vocab, ctx, n, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(vocab, vocab, generator=gen), dim=-1)
    x = torch.randint(vocab, (n, 1), generator=gen)
    for _ in range(ctx):
        x = torch.cat([x, torch.multinomial(probs[x[:, -1]], 1, generator=gen)], dim=1)
    return x


def sigma_max(model, pattern):
    import re
    return max(torch.linalg.matrix_norm(p.detach(), 2).item() for n, p in model.named_parameters() if re.search(pattern, n))


def run(name, args, data):
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.d, args.layers, args.ctx)
    groups = resolve(model, rules_for(*ALLOCATIONS[name]), mode=args.mode)
    opt = ManifoldMuon(groups)
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = data[torch.randint(len(data), (args.batch,), generator=torch.Generator().manual_seed(step))]
        loss = nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ms = (time.perf_counter() - start) / args.steps * 1e3
    residual = max(get_manifold(g["manifold"]).residual(p.detach()).item() for g in groups for p in g["params"])
    return {"allocation": name, "first_loss": sum(losses[:10]) / 10, "final_loss": sum(losses[-10:]) / 10,
            "max_residual": residual, "attn_sigma_max": sigma_max(model, ATTN), "mlp_sigma_max": sigma_max(model, MLP),
            "ms_per_step": ms, "allocation_table": format_allocation(groups)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per allocation (default 150)")
    ap.add_argument("--allocations", default=",".join(ALLOCATIONS), help="comma-separated, from: " + ", ".join(ALLOCATIONS))
    ap.add_argument("--out", default="out/demo", help="where report.md and results.json go")
    ap.add_argument("--mode", default="improved", choices=DIRECTION_MODES,
                    help="direction solver for the constrained weights: paper (the reference code's dual ascent), "
                         "improved (default; the accurate solve) or fast (one msign per matrix, no dual iterations)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=48)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    names = args.allocations.split(",")
    bad = [n for n in names if n not in ALLOCATIONS]
    if bad:
        ap.error(f"unknown allocation(s) {bad}; valid choices: {', '.join(ALLOCATIONS)}")
    data = markov_data(args.vocab, args.ctx, 4096, args.seed)
    results = []
    for name in names:
        results.append(run(name, args, data))
        r = results[-1]
        print(f"[{len(results)}/{len(names)}] {name:14s} loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}  "
              f"{r['ms_per_step']:.0f} ms/step", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = "| allocation | loss (first 10) | loss (last 10) | max manifold residual | attn sigma_max | MLP sigma_max | ms/step |\n|---|---|---|---|---|---|---|\n"
    rows = "".join(f"| {r['allocation']} | {r['first_loss']:.3f} | {r['final_loss']:.3f} | {r['max_residual']:.1e} | "
                   f"{r['attn_sigma_max']:.2f} | {r['mlp_sigma_max']:.2f} | {r['ms_per_step']:.0f} |\n" for r in results)
    table = header + rows
    report = (f"# Allocation demo\n\n{args.steps} steps per allocation of a {args.layers}-layer, d={args.d} "
              f"`nn.TransformerEncoder` LM on a synthetic Markov chain (CPU), {args.mode} mode.\n\n{table}\n"
              f"Resolved allocation of the last run:\n\n```\n{results[-1]['allocation_table']}\n```\n")
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "allocation_table"} for r in results], indent=1))
    print("\n" + table)
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
