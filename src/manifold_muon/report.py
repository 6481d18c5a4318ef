"""``manifold-muon report DIR``: Table 1 (Markdown + CSV), Figure 1 (val loss), Figure 2
(sigma_max of the attention and MLP groups, max over each group as the paper), and a mechanism
figure (logit scale, attention entropy, softmax-Jacobian norm), linked from ``report.md``."""
from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from .diagnostics import module_group, read_spectral
from .runio import read_jsonl
from .stability import DEFAULT_THRESHOLDS
from .sweep import collect_results

__all__ = ["build_report", "table_rows", "format_table"]


def _constraint(run_dir: Path, group: str) -> str:
    rows = json.loads((run_dir / "allocation.json").read_text())
    found = {f"{r['algorithm']}/{r['manifold']}" for r in rows if module_group(r["name"]) == group}
    pretty = {"muon/none": "None (Muon)", "muon/stiefel": "Stiefel", "muon/dgram": "DGram", "muon/oblique": "Oblique",
              "adamw/none": "AdamW", "adamw/stiefel": "AdamW+Stiefel", "adamw/spectral": "AdamW+spectral"}
    return ", ".join(sorted(pretty.get(f, f) for f in found)) or "-"


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table_rows(out_dir, results: list[dict]) -> list[dict]:
    """Table 1: one row per allocation, in the sweep's order, aggregated over seeds."""
    out_dir = Path(out_dir)
    by_alloc: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_alloc[r["allocation"]].append(r)
    order = json.loads((out_dir / "sweep.json").read_text())["allocations"] if (out_dir / "sweep.json").is_file() else []
    order = [a for a in order if a in by_alloc] + sorted(a for a in by_alloc if a not in order)
    rows = []
    for alloc in order:
        runs = by_alloc[alloc]
        unstable = [r for r in runs if not r["stable"]]
        if not unstable:
            result = f"stable ({len(runs)}/{len(runs)})"
        else:
            reasons = ", ".join(f"s{r['seed']}: {r['criterion']} @ {r['criterion_iter']}" for r in unstable)
            result = f"unstable ({len(unstable)}/{len(runs)}; {reasons})"
        first = out_dir / runs[0]["run"]
        rows.append({"allocation": alloc, "attention": _constraint(first, "attention"), "mlp": _constraint(first, "mlp"),
                     "seeds": len(runs), "final_val_loss": _mean_std([r["final_val_loss"] for r in runs]),
                     "best_val_loss": _mean_std([r["best_val_loss"] for r in runs]), "result": result})
    return rows


COLUMNS = [("allocation", "Allocation"), ("attention", "Attention"), ("mlp", "MLP"), ("seeds", "Seeds"),
           ("final_val_loss", "Final val loss"), ("best_val_loss", "Best val loss"), ("result", "Result")]


def format_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(str(r[k]) for k, _ in COLUMNS) + " |\n" for r in rows)


def _series_by_alloc(out_dir: Path, results: list[dict], load) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    series = defaultdict(list)
    for r in results:
        xy = load(out_dir / r["run"])
        if xy is not None and len(xy[0]):
            series[r["allocation"]].append(xy)
    return series


def _val_curve(run_dir: Path):
    evals = read_jsonl(run_dir / "eval.jsonl")
    return np.array([e["iter"] for e in evals]), np.array([e["val_loss"] for e in evals], dtype=float)


def _sigma_max(group: str):
    def load(run_dir: Path):
        header, rec = read_spectral(run_dir)
        if header is None or not len(rec):
            return None
        idx = [i for i, g in enumerate(header["groups"]) if g == group]
        if not idx:
            return None
        return rec["iter"], np.max(np.stack([rec[f"sv{i}"][:, 0] for i in idx]), axis=0)
    return load


def _mechanism(key: str, reduce):
    def load(run_dir: Path):
        rows = [d for d in read_jsonl(run_dir / "diagnostics.jsonl") if d.get("mechanics")]
        if not rows:
            return None
        return np.array([d["iter"] for d in rows]), np.array([reduce([m[key] for m in d["mechanics"]]) for d in rows])
    return load


def _plot_panel(ax, series, *, title, ylabel, log=False):
    styles = ["-", "--", "-.", ":", (0, (5, 1))]  # overlapping curves (all at sigma = 1) stay visible
    for i, (alloc, runs) in enumerate(sorted(series.items())):
        for j, (x, y) in enumerate(runs):
            ax.plot(x, y, color=f"C{i}", ls=styles[i % len(styles)], alpha=0.9 if len(runs) == 1 else 0.5, lw=1.8,
                    label=alloc if j == 0 else None)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)


def _figures(out_dir: Path, results: list[dict], fig_dir: Path) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_panel(ax, _series_by_alloc(out_dir, results, _val_curve), title="Figure 1: validation loss",
                ylabel="val loss (nats/token)")
    fig.tight_layout()
    fig.savefig(fig_dir / "fig1_val_loss.png", dpi=120)
    made["fig1"] = "fig1_val_loss.png"
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, group, name in zip(axes, ("attention", "mlp"), ("attention (c_attn, attn.c_proj)", "MLP (c_fc, mlp.c_proj)")):
        _plot_panel(ax, _series_by_alloc(out_dir, results, _sigma_max(group)), title=f"sigma_max, {name}: max over group",
                    ylabel="largest singular value (log)", log=True)
    fig.suptitle("Figure 2: spectral growth")
    fig.tight_layout()
    fig.savefig(fig_dir / "fig2_sigma_max.png", dpi=120)
    made["fig2"] = "fig2_sigma_max.png"
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("logit_max_abs", max, "logit scale max|z| (max over layers)", "max |z| (log)", True),
              ("entropy", min, "attention entropy (min over layers)", "entropy (nats)", False),
              ("jacobian_fro", min, "softmax-Jacobian norm (min over layers)", "||diag(p) - pp^T||_F (log)", True)]
    for ax, (key, reduce, title, ylabel, log) in zip(axes, panels):
        _plot_panel(ax, _series_by_alloc(out_dir, results, _mechanism(key, reduce)), title=title, ylabel=ylabel, log=log)
    fig.suptitle("Mechanism diagnostics on a fixed validation batch: logit scale, entropy, softmax Jacobian")
    fig.tight_layout()
    fig.savefig(fig_dir / "fig3_mechanism.png", dpi=120)
    made["fig3"] = "fig3_mechanism.png"
    plt.close(fig)
    return made


def build_report(out_dir) -> Path:
    """Write ``report.md``, ``table1.md``, ``table1.csv`` and the figures into ``DIR/report/``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {out_dir} does not exist")
    results = collect_results(out_dir)
    if not results:
        raise ValueError(f"{out_dir} holds no finished run (no */summary.json); run `manifold-muon sweep` first")
    report_dir = out_dir / "report"
    report_dir.mkdir(exist_ok=True)
    rows = table_rows(out_dir, results)
    table = format_table(rows)
    (report_dir / "table1.md").write_text(table)
    with open(report_dir / "table1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    figs = _figures(out_dir, results, report_dir)
    cfg = json.loads((out_dir / results[0]["run"] / "config.json").read_text())
    m = cfg["model"]
    tokens = cfg["batch_size"] * cfg["grad_accum"] * m["block_size"]
    thresholds = ", ".join(f"{k}={v}" for k, v in DEFAULT_THRESHOLDS.items())
    text = f"""# Report: {out_dir.name}

Setup: preset `{cfg['preset']}`, {m['arch']} with {m['n_layer']} layers, d={m['n_embd']}, {m['n_head']} heads,
context {m['block_size']}; {cfg['max_iters']} iterations of {tokens:,} tokens (per process); data `{cfg['data_dir']}`;
direction solver mode `{cfg['mode']}`. Only the allocation (and the seed) differs between runs.

## Table 1

{table}
Final val loss is the last evaluation; mean ± std over seeds where there are several.
Stability: the classifier of `manifold_muon.stability` (thresholds: {thresholds}).

## Figure 1: validation loss

![Figure 1]({figs['fig1']})

## Figure 2: sigma_max of the attention and MLP groups

![Figure 2]({figs['fig2']})

## Mechanism diagnostics

![Mechanism]({figs['fig3']})

Files: [table1.md](table1.md), [table1.csv](table1.csv); per run: `eval.jsonl`, `metrics.jsonl`,
`diagnostics.jsonl`, `spectral.bin` (+ `spectral.json`), `summary.json`.
"""
    (report_dir / "report.md").write_text(text)
    return report_dir / "report.md"
