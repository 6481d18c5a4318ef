"""The report's figures.  Runs are keyed by *variant*, ``(allocation, mode)``: one colour per
allocation, and one line style per mode when a sweep compares modes (else per allocation, so
that curves lying on top of each other, such as every Stiefel group at sigma = 1, stay visible)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .analysis import (CHAIN, CHAIN_SIGNALS, baseline, health_curve, mechanism_curve, sigma_max_curve,
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


def _plot_panel(ax, series, *, title, ylabel, log=False, xmax=None, legend=True):
    """One panel of curves, one colour per allocation.  A log axis is used only where the data
    span a decade or more (over less, log ticks read as 2.01x10^-1), and then with every tick
    labelled as a plain number.  The legend goes beside the panel, off the data."""
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
    if xmax:
        ax.set_xlim(0, xmax)
    if log and _decades(series) >= 1:
        ax.set_yscale("log")
        _plain_log_ticks(ax)
    ax.grid(alpha=0.3)
    if series and legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _decades(series) -> float:
    values = np.concatenate([np.asarray(y, dtype=float) for runs in series.values() for _, y in runs] or [np.ones(1)])
    values = values[np.isfinite(values) & (values > 0)]
    return float(np.log10(values.max() / values.min())) if len(values) else 0.0


def _plain_log_ticks(ax) -> None:
    """Label a log axis with plain numbers (0.5, 1, 2, 5, 10 ...), minor ticks too where the
    axis spans few decades, so that every part of the range has a labelled tick."""
    from matplotlib import ticker
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / max(low, 1e-300) < 1e3:
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)


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
    fig.savefig(path, dpi=120, bbox_inches="tight")   # legends beside the panels stay in the picture
    _plt().close(fig)
    shrink_png(path)
    return path.name


def _final_losses(ax, results: list[dict]) -> None:
    """Table 1 as a picture: each variant's final val loss per seed (dots) and its mean with the
    95% t interval (bar), one row per variant labelled in its curve's colour, on an axis that
    spans the differences."""
    from .stats import mean_interval
    several_modes = len({x.get("mode") for x in results}) > 1
    variants: dict[tuple, list[float]] = {}
    for r in sorted(results, key=lambda r: (r["allocation"], r.get("mode") or "")):
        if r["final_val_loss"] is not None and np.isfinite(r["final_val_loss"]):
            variants.setdefault((r["allocation"], r.get("mode")), []).append(r["final_val_loss"])
    allocations = sorted({r["allocation"] for r in results})
    names = []
    for i, ((alloc, mode), values) in enumerate(variants.items()):
        colour = allocation_colour(allocations.index(alloc), len(allocations))
        mean, half = mean_interval(values)
        ax.scatter(values, [i] * len(values), color=colour, s=16, alpha=0.7, zorder=3)
        ax.errorbar([mean], [i], xerr=None if np.isnan(half) else [[half], [half]], fmt="|", color=colour,
                    markersize=14, capsize=4, lw=2, zorder=4)
        names.append(f"{alloc} [{mode}]" if several_modes else alloc)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for label, (alloc, _) in zip(ax.get_yticklabels(), variants):
        label.set_color(allocation_colour(allocations.index(alloc), len(allocations)))
    ax.invert_yaxis()
    ax.set_xlabel("final validation loss (nats/token)")
    ax.set_title("Final loss: seeds (dots), mean and 95% interval (bar)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")


def _zoom_to_training(ax, series, xmax) -> None:
    """Start the loss axis where training has left its initial plateau (after the first fifth
    of the run), so that the spread between allocations at the end can be read."""
    tails = [y[x >= 0.2 * xmax] for runs in series.values() for x, y in runs]
    tails = [t[np.isfinite(t)] for t in tails if len(t)]
    if tails and all(len(t) for t in tails):
        low, high = min(t.min() for t in tails), max(t.max() for t in tails)
        pad = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)


def make_figures(out_dir: Path, results: list[dict], fig_dir: Path, *, max_iters: int | None = None) -> dict[str, str]:
    """Figure 1 (val loss curves and final losses), Figure 2 (sigma_max), the mechanism figure
    and, where any run has a constrained group, the direction-quality figure, all on the same
    iteration axis (``max_iters``).  Returns ``{key: file name}``."""
    plt = _plt()
    made = {}
    rows = len({(r["allocation"], r.get("mode")) for r in results})
    fig, (curves, finals) = plt.subplots(1, 2, figsize=(14, max(5.0, 0.28 * rows + 1.5)),
                                         gridspec_kw={"width_ratios": [3, 2]})
    val = _series(out_dir, results, val_curve)
    dashed = " (line styles: solver modes)" if len({r.get("mode") for r in results}) > 1 else ""
    _plot_panel(curves, val, title=f"Validation loss; colours as labelled on the right{dashed}",
                ylabel="validation loss (nats/token)", xmax=max_iters, legend=False)
    if max_iters:
        _zoom_to_training(curves, val, max_iters)
    _final_losses(finals, results)
    fig.suptitle("Figure 1: validation loss")
    made["fig1"] = _save(fig, fig_dir / "fig1_val_loss.png")

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for k, (ax, group, name) in enumerate(zip(axes, ("attention", "mlp"),
                                              ("attention (c_attn, attn.c_proj)", "MLP (c_fc, mlp.c_proj)"))):
        _plot_panel(ax, _series(out_dir, results, lambda d, g=group: sigma_max_curve(d, g)),
                    title=f"{name}: largest over the group", ylabel="largest singular value σ_max", log=True,
                    xmax=max_iters, legend=k == 1)
    fig.suptitle("Figure 2: spectral growth")
    made["fig2"] = _save(fig, fig_dir / "fig2_sigma_max.png")

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    panels = [("logit_max_abs", max, "largest attention logit (max over layers)", "largest |logit|", True),
              ("entropy", min, "attention entropy (min over layers)", "entropy (nats)", False),
              ("jacobian_fro", min, "softmax-Jacobian norm (min over layers)", "softmax-Jacobian norm (Frobenius)", True)]
    for k, (ax, (key, reduce, title, ylabel, log)) in enumerate(zip(axes, panels)):
        _plot_panel(ax, _series(out_dir, results, lambda d, k=key, f=reduce: mechanism_curve(d, k, f)),
                    title=title, ylabel=ylabel, log=log, xmax=max_iters, legend=k == 2)
    fig.suptitle("Mechanism diagnostics on a fixed validation batch")
    made["fig3"] = _save(fig, fig_dir / "fig3_mechanism.png")

    figure = _quality_figure(out_dir, results, max_iters)
    if figure is not None:
        made["fig4"] = _save(figure, fig_dir / "fig4_direction_quality.png")
    return made


QUALITY = [("alignment_mean", "alignment ⟨G, A⟩ / ‖G‖* (mean over the group)", "alignment", False),
           ("violation_end_max", "tangent violation of A (max over the group)", "tangent violation (RMS)", True),
           ("momentum_norm_max", "momentum spectral norm (max over the group)", "‖G‖₂", True)]
#: Below this every tangent violation is float32 rounding: a panel of it shows only noise.
ROUNDING = 1e-6


def _quality_figure(out_dir: Path, results: list[dict], max_iters):
    """Direction quality of the constrained groups over training; the tangent-violation column
    only where some direction was not tangent beyond rounding (paper mode's)."""
    plt = _plt()
    grid = {(group, key): _series(out_dir, results, lambda d, g=group, k=key: health_curve(d, g, k))
            for group in ("attention", "mlp") for key, *_ in QUALITY}
    if not any(grid.values()):
        return None
    violations = [y for group in ("attention", "mlp") for runs in grid[(group, "violation_end_max")].values()
                  for _, y in runs]
    noisy = all(np.nanmax(y) < ROUNDING for y in violations if len(y))
    shown = [q for q in QUALITY if not (noisy and q[0] == "violation_end_max")]
    fig, axes = plt.subplots(2, len(shown), figsize=(6 * len(shown), 8.5), squeeze=False)
    for row, group in enumerate(("attention", "mlp")):
        for col, (key, title, ylabel, log) in enumerate(shown):
            _plot_panel(axes[row, col], grid[(group, key)], title=f"{group}: {title}", ylabel=ylabel, log=log,
                        xmax=max_iters, legend=col == len(shown) - 1)
    note = f" (every tangent violation stayed below {ROUNDING:g}, float32 rounding: not plotted)" if noisy else ""
    fig.suptitle("Direction quality over training, constrained groups" + note)
    return fig


#: What each chain stage's curve is, and the move that marks its onset (curves are not scaled).
STAGE_LEGEND = {"sigma_max": "attention σ_max (onset: ×1.41)", "logit_scale": "largest |logit| (onset: ×2)",
                "entropy": "attention entropy (onset: ÷2)", "jacobian": "softmax-Jacobian norm (onset: ÷2)",
                "divergence": "validation loss (onset: divergence)"}


def _panel_count(n: int) -> tuple[int, int, int]:
    """(runs shown, rows, columns) with no empty panel: up to 3 in a row, 4 as 2 x 2, else 6."""
    if n <= 3:
        return n, 1, n
    if n < 6:
        return 4, 2, 2
    return 6, 2, 3


def plot_causal_chains(out_dir: Path, chains: list[tuple[dict, dict]], path: Path, *, start_iter: int,
                       limit: int = 6) -> str | None:
    """One panel per run (``(result_row, chain)`` pairs, most interesting first): each chain
    stage's signal divided by its value at ``start_iter`` (log scale), with its onset marked;
    one legend for the figure, below the panels."""
    if not chains:
        return None
    shown, rows, cols = _panel_count(min(len(chains), limit))
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.3 * rows), squeeze=False)
    loaders = {stage: load for stage, (load, _) in CHAIN_SIGNALS.items()} | {"divergence": val_curve}
    for ax, (row, chain) in zip(axes.flat, chains[:shown]):
        run_dir = out_dir / row["run"]
        for i, stage in enumerate(CHAIN):
            xy = loaders[stage](run_dir)
            if xy is None:
                continue
            x, y = xy
            base = baseline(xy, start_iter) or np.nan
            ax.plot(x, y / base, color=f"C{i}", lw=1.6, label=STAGE_LEGEND[stage])
            if chain["onsets"][stage] is not None:
                ax.axvline(chain["onsets"][stage], color=f"C{i}", ls=":", lw=1.2)
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_title(f"{row['run']}: {row['verdict']}", fontsize=9)
        ax.set_xlabel("iteration (dotted lines: onsets)")
        ax.set_ylabel(f"value / value at iteration {start_iter}", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Causal chain: σ_max growth → logit inflation → entropy collapse → Jacobian collapse → divergence")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


def plot_comparison(labels: list[str], rows: list[dict], path: Path) -> str:
    """Sweeps side by side (:func:`manifold_muon.lab.compare.compare_rows`): final val loss, peak
    attention sigma_max and lowest attention entropy of each (allocation, mode) per sweep."""
    plt = _plt()
    panels = [("final_val_loss", "final validation loss (nats/token)", False),
              ("sigma_max", "peak attention σ_max", True), ("entropy", "lowest attention entropy (nats)", True)]
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
        ax.set_xlabel("sweep")
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the panels, off the data
    return _save(fig, path)
