"""The report's figures.  Runs are keyed by *variant*, ``(allocation, mode)``: one colour per
allocation, and one line style per mode when a sweep compares modes (else per allocation, so
that curves lying on top of each other, such as every Stiefel group at sigma = 1, stay visible)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .analysis import (CHAIN, CHAIN_LABELS, CHAIN_SIGNALS, baseline, health_curve, mechanism_curve, sigma_max_curve,
                       val_curve)

__all__ = ["make_figures", "plot_causal_chains", "plot_comparison", "shrink_png", "allocation_colour"]

STYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def allocation_colour(index: int, count: int):
    """One colour per allocation: matplotlib's ten-colour cycle while it suffices, tab20 beyond
    (its ten dark shades first, then the light ones), so that an eleventh allocation does not
    wear the first one's colour."""
    if count <= 10:
        return f"C{index}"
    import matplotlib
    index %= 20
    return matplotlib.colormaps["tab20"](2 * index if index < 10 else 2 * (index - 10) + 1)


def _series(out_dir: Path, results: list[dict], load) -> dict[tuple, list]:
    series = defaultdict(list)
    for r in results:
        xy = load(out_dir / r["run"])
        if xy is not None and len(xy[0]):
            series[(r["allocation"], r.get("mode", "improved"))].append(xy)
    return series


def _plot_panel(ax, series, *, title, ylabel, log=False):
    allocations = sorted({a for a, _ in series})
    modes = sorted({m for _, m in series})
    for (alloc, mode), runs in sorted(series.items()):
        i = allocations.index(alloc)
        style = STYLES[modes.index(mode) % len(STYLES)] if len(modes) > 1 else STYLES[i % len(STYLES)]
        label = f"{alloc} [{mode}]" if len(modes) > 1 else alloc
        for j, (x, y) in enumerate(runs):
            ax.plot(x, y, color=allocation_colour(i, len(allocations)), ls=style,
                    alpha=0.9 if len(runs) == 1 else 0.55, lw=1.8,
                    label=label if j == 0 else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)


def shrink_png(path: Path) -> None:
    """Rewrite a PNG as a 256-colour palette image.  Line plots lose nothing visible and take
    about a third of the bytes: committed results travel to the GPU machine, whose working
    tree and carried files must fit in 64 MiB together."""
    from PIL import Image   # matplotlib's own dependency
    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=256)
    palette.save(path, optimize=True)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    shrink_png(path)
    return path.name


def make_figures(out_dir: Path, results: list[dict], fig_dir: Path) -> dict[str, str]:
    """Figure 1 (val loss), Figure 2 (sigma_max), the mechanism figure and, where any run has a
    constrained group, the direction-quality figure.  Returns ``{key: file name}``."""
    plt = _plt()
    made = {}
    fig, ax = plt.subplots(figsize=(8, 5))
    _plot_panel(ax, _series(out_dir, results, val_curve), title="Figure 1: validation loss",
                ylabel="val loss (nats/token)")
    made["fig1"] = _save(fig, fig_dir / "fig1_val_loss.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, group, name in zip(axes, ("attention", "mlp"), ("attention (c_attn, attn.c_proj)", "MLP (c_fc, mlp.c_proj)")):
        _plot_panel(ax, _series(out_dir, results, lambda d, g=group: sigma_max_curve(d, g)),
                    title=f"sigma_max, {name}: max over group", ylabel="largest singular value (log)", log=True)
    fig.suptitle("Figure 2: spectral growth")
    made["fig2"] = _save(fig, fig_dir / "fig2_sigma_max.png")

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = [("logit_max_abs", max, "logit scale max|z| (max over layers)", "max |z| (log)", True),
              ("entropy", min, "attention entropy (min over layers)", "entropy (nats)", False),
              ("jacobian_fro", min, "softmax-Jacobian norm (min over layers)", "||diag(p) - pp^T||_F (log)", True)]
    for ax, (key, reduce, title, ylabel, log) in zip(axes, panels):
        _plot_panel(ax, _series(out_dir, results, lambda d, k=key, f=reduce: mechanism_curve(d, k, f)),
                    title=title, ylabel=ylabel, log=log)
    fig.suptitle("Mechanism diagnostics on a fixed validation batch: logit scale, entropy, softmax Jacobian")
    made["fig3"] = _save(fig, fig_dir / "fig3_mechanism.png")

    quality = [("alignment_mean", "alignment <G,A>/||G||_* (mean over group)", False),
               ("violation_end_max", "tangent violation of A (max over group)", True),
               ("momentum_norm_max", "momentum spectral norm (max over group)", True)]
    grid = {(group, key): _series(out_dir, results, lambda d, g=group, k=key: health_curve(d, g, k))
            for group in ("attention", "mlp") for key, _, _ in quality}
    if any(grid.values()):
        fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
        for row, group in enumerate(("attention", "mlp")):
            for col, (key, title, log) in enumerate(quality):
                _plot_panel(axes[row, col], grid[(group, key)], title=f"{group}: {title}", ylabel=key, log=log)
        fig.suptitle("Direction quality over training (constrained groups only)")
        made["fig4"] = _save(fig, fig_dir / "fig4_direction_quality.png")
    return made


def plot_causal_chains(out_dir: Path, chains: list[tuple[dict, dict]], path: Path, *, start_iter: int,
                       limit: int = 6) -> str | None:
    """One panel per run (``(result_row, chain)`` pairs, most interesting first): each chain
    stage's signal divided by its value at ``start_iter`` (log scale), with its onset marked."""
    chains = chains[:limit]
    if not chains:
        return None
    plt = _plt()
    cols = min(3, len(chains))
    rows = -(-len(chains) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.3 * rows), squeeze=False)
    loaders = {stage: load for stage, (load, _) in CHAIN_SIGNALS.items()} | {"divergence": val_curve}
    for ax, (row, chain) in zip(axes.flat, chains):
        run_dir = out_dir / row["run"]
        for i, stage in enumerate(CHAIN):
            xy = loaders[stage](run_dir)
            if xy is None:
                continue
            x, y = xy
            base = baseline(xy, start_iter) or np.nan
            label = "val loss" if stage == "divergence" else CHAIN_LABELS[stage]
            ax.plot(x, y / base, color=f"C{i}", lw=1.6, label=f"{label} (rel.)")
            if chain["onsets"][stage] is not None:
                ax.axvline(chain["onsets"][stage], color=f"C{i}", ls=":", lw=1.2)
        ax.set_yscale("log")
        ax.set_title(f"{row['run']}: {row['verdict']}", fontsize=9)
        ax.set_xlabel("iteration (dotted: onsets)")
        ax.set_ylabel(f"value / value at end of warmup (iteration >= {start_iter})", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(chains):]:
        ax.axis("off")
    fig.suptitle("Causal chain: sigma_max growth -> logit inflation -> entropy collapse -> Jacobian collapse -> divergence")
    return _save(fig, path)


def plot_comparison(labels: list[str], rows: list[dict], path: Path) -> str:
    """Sweeps side by side (:func:`manifold_muon.lab.compare.compare_rows`): final val loss, peak
    attention sigma_max and lowest attention entropy of each (allocation, mode) per sweep."""
    plt = _plt()
    panels = [("final_val_loss", "final val loss", False), ("sigma_max", "peak attention sigma_max", True),
              ("entropy", "lowest attention entropy (nats)", True)]
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.6))
    allocations = list(dict.fromkeys(r["allocation"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    x = np.arange(len(labels))
    for ax, (key, title, log) in zip(axes, panels):
        for r in rows:
            y = np.array([np.nan if e is None or e[key] is None else e[key] for e in r["sweeps"]], dtype=float)
            ax.plot(x, y, color=allocation_colour(allocations.index(r["allocation"]), len(allocations)), marker="o",
                    ls=STYLES[modes.index(r["mode"]) % len(STYLES)], label=f"{r['allocation']} [{r['mode']}]")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the panels, off the data
    return _save(fig, path)
