"""``manifold-muon report DIR``: Table 1 (Markdown + CSV), the seed-gap test, Figure 1 (val
loss), Figure 2 (sigma_max of the attention and MLP groups, max over each group as the paper),
the mechanism figure, direction quality over training, and the causal chain of each run, all
linked from ``report.md``.  A sweep that compares direction-solver modes (``--modes``) gets one
row per (allocation, mode) and a paper-vs-improved table."""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .analysis import (CHAIN, CHAIN_LABELS, GAP_PAIRS, causal_chain, divergence_iter, finite_values, health_curve,
                       mechanism_peaks)
from .diagnostics import module_group
from .figures import make_figures, plot_causal_chains
from ..optim.allocation import PRESETS
from .comparisons import DIFFERENCE_COLUMNS, context_rows, difference_row, validation_noise
from .stability import DEFAULT_THRESHOLDS
from .stats import format_difference, mean_interval, welch_difference
from .sweep import collect_results

__all__ = ["build_report", "table_rows", "format_table", "gap_rows", "chain_rows", "mode_rows", "markdown_table"]

PRETTY = {"muon/none": "None (Muon)", "muon/stiefel": "Stiefel", "muon/dgram": "DGram", "muon/oblique": "Oblique",
          "muon/dgram-capped": "DGram, capped", "muon/dgram-cap2": "DGram, capped at 2",
          "muon/dgram-decay": "DGram, decayed toward 1",
          "muon/dgram-svd": "DGram (SVD retraction)",
          "adamw/none": "AdamW", "adamw/stiefel": "AdamW+Stiefel", "adamw/spectral": "AdamW+spectral"}


def _constraint_name(row: dict) -> str:
    key = f"{row['algorithm']}/{row['manifold']}"
    name = PRETTY.get(key, key)
    # The paper decays unconstrained weights and leaves manifold weights undecayed: say so
    # wherever a preset departs from that.
    decay = row.get("weight_decay", 0)
    if row["manifold"] != "none" and decay > 0:
        return f"{name} + weight decay {decay:g}"
    return f"{name}, no weight decay" if row["manifold"] == "none" and decay == 0 else name


def _constraint(run_dir: Path, group: str) -> str:
    rows = json.loads((run_dir / "allocation.json").read_text())
    return ", ".join(sorted({_constraint_name(r) for r in rows if module_group(r["name"]) == group})) or "-"


def _mean_std(values: list[float]) -> str:
    """The mean over seeds and its 95% t interval (a lone seed: its value)."""
    values = finite_values(values)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    mean, half = mean_interval(values)
    return f"{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}]"


def _by_variant(out_dir: Path, results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs grouped by (allocation, mode), in the sweep's allocation order, then mode."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["allocation"], r.get("mode", "improved"))].append(r)
    sweep = out_dir / "sweep.json"
    order = json.loads(sweep.read_text())["allocations"] if sweep.is_file() else []
    rank = {a: i for i, a in enumerate(order)}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0][0], len(rank)), kv[0][0], kv[0][1])))


def _modes(results: list[dict]) -> list[str]:
    return sorted({r.get("mode", "improved") for r in results})


def _result_text(runs: list[dict]) -> str:
    unstable = [r for r in runs if not r["stable"]]
    if not unstable:
        return f"stable ({len(runs)}/{len(runs)})"
    reasons = ", ".join(f"s{r['seed']}: {r['criterion']} @ {r['criterion_iter']}" for r in unstable)
    return f"unstable ({len(unstable)}/{len(runs)}; {reasons})"


def _span(values: list, fmt: str) -> str:
    """``lo-hi`` over seeds, or one value where they print alike."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return "-"
    lo, hi = format(values[0], fmt), format(values[-1], fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def _attention_text(run_dirs: list[Path]) -> str:
    """How far the runs went along the paper's mechanism, which the loss-based classifier cannot
    see: a collapse (entropy near 0 behind a large sigma_max) that stalls the loss without a spike."""
    peaks = [mechanism_peaks(d) for d in run_dirs]
    return (f"σ {_span([p['sigma_max'] for p in peaks], '.3g')}, "
            f"H {_span([p['entropy'] for p in peaks], '.3g')}")


def table_rows(out_dir, results: list[dict]) -> list[dict]:
    """Table 1: one row per allocation (and mode), in the sweep's order, aggregated over seeds."""
    out_dir = Path(out_dir)
    rows = []
    for (alloc, mode), runs in _by_variant(out_dir, results).items():
        first = out_dir / runs[0]["run"]
        rows.append({"allocation": alloc, "mode": mode, "attention": _constraint(first, "attention"),
                     "mlp": _constraint(first, "mlp"), "seeds": len(runs),
                     "final_val_loss": _mean_std([r["final_val_loss"] for r in runs]),
                     "best_val_loss": _mean_std([r["best_val_loss"] for r in runs]), "result": _result_text(runs),
                     "attention_mechanism": _attention_text([out_dir / r["run"] for r in runs])})
    return rows


COLUMNS = [("allocation", "Allocation"), ("mode", "Mode"), ("attention", "Attention"), ("mlp", "MLP"),
           ("seeds", "Seeds"), ("final_val_loss", "Final val loss"), ("best_val_loss", "Best val loss"),
           ("result", "Result"), ("attention_mechanism", "Attention: peak σ_max, lowest entropy (nats)")]


def _cell(value) -> str:
    """A table cell: pipes escaped (``max|z|`` would split the row), newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(_cell(t) for _, t in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(r[k]) for k, _ in columns) + " |\n" for r in rows)


def format_table(rows: list[dict]) -> str:
    """Table 1 as Markdown; the Mode column only when the rows have more than one mode."""
    several = len({r["mode"] for r in rows}) > 1
    return markdown_table(rows, [c for c in COLUMNS if several or c[0] != "mode"])


def _mode_free(allocation: str) -> bool:
    """An allocation with no manifold weights: the direction-solver mode changes nothing in it."""
    return allocation in PRESETS and all(rule.manifold == "none" for rule in PRESETS[allocation])


def _runs_for_mode(variants: dict, allocation: str, mode: str) -> tuple[str, list[dict]] | None:
    """The runs of ``allocation`` in ``mode``; for a mode-free allocation, those of whichever
    mode it was run in (unconstrained Muon is run once, not once per mode)."""
    if (allocation, mode) in variants:
        return mode, variants[(allocation, mode)]
    if _mode_free(allocation):
        return next(((m, runs) for (a, m), runs in variants.items() if a == allocation), None)
    return None


def gap_rows(out_dir, results: list[dict]) -> list[dict]:
    """For each pair of :data:`GAP_PAIRS` present (per mode; a mode-free allocation pairs with
    every mode): the difference in mean final val loss with its 95% Welch interval and verdict
    (:func:`manifold_muon.lab.comparisons.difference_row`)."""
    variants = _by_variant(Path(out_dir), results)
    rows, seen = [], set()
    for mode in _modes(results):
        for a, b in GAP_PAIRS:
            found_a, found_b = _runs_for_mode(variants, a, mode), _runs_for_mode(variants, b, mode)
            if found_a is None or found_b is None or (a, found_a[0], b, found_b[0]) in seen:
                continue
            seen.add((a, found_a[0], b, found_b[0]))
            modes = found_a[0] if found_a[0] == found_b[0] else f"{found_a[0]} / {found_b[0]}"
            row = difference_row(f"{a} − {b}", modes, [r["final_val_loss"] for r in found_a[1]],
                                 [r["final_val_loss"] for r in found_b[1]])
            if row is not None:
                rows.append(row)
    return rows


GAP_COLUMNS = DIFFERENCE_COLUMNS


def chain_rows(out_dir, results: list[dict], *, factor: float = 2.0) -> list[tuple[dict, dict]]:
    """``(result_row, chain)`` for every run, unstable runs first, then by attention sigma_max
    growth since the end of warmup."""
    out_dir = Path(out_dir)
    pairs = []
    for r in results:
        cfg = json.loads((out_dir / r["run"] / "config.json").read_text())
        pairs.append((r, causal_chain(out_dir / r["run"], start_iter=cfg["warmup_iters"],
                                      divergence_iter=divergence_iter(out_dir / r["run"], r), factor=factor)))
    pairs.sort(key=lambda t: (t[0]["stable"], -(t[1]["peaks"]["sigma_max"] or 0.0)))
    return pairs


def _chain_markdown(chains: list[tuple[dict, dict]]) -> str:
    columns = [("run", "Run"), ("result", "Result")] + [(s, CHAIN_LABELS[s]) for s in CHAIN] + [("order", "In chain order")]
    rows = []
    for r, c in chains:
        row = {"run": r["run"], "result": "stable" if r["stable"] else r["criterion"],
               "order": ("yes" if c["in_order"] else "no") + f" ({c['reached']}/{len(CHAIN)} stages)"}
        row.update({s: "-" if c["onsets"][s] is None else c["onsets"][s] for s in CHAIN})
        rows.append(row)
    return markdown_table(rows, columns)


def _per_run(out_dir: Path, runs: list[dict], group: str, key: str, reduce) -> list[float]:
    """A health statistic of a group reduced over each run's training (runs without it skipped)."""
    curves = [health_curve(out_dir / r["run"], group, key) for r in runs]
    return [float(reduce(c[1])) for c in curves if c is not None]


def mode_rows(out_dir, results: list[dict]) -> list[dict]:
    """Paper vs improved, per allocation: final val loss, stability, and the run-mean direction
    quality (alignment and max tangent violation) of the attention and MLP groups."""
    out_dir = Path(out_dir)
    variants = _by_variant(out_dir, results)
    rows = []
    for alloc in dict.fromkeys(a for a, _ in variants):
        row = {"allocation": alloc}
        for mode in ("paper", "improved"):
            runs = variants.get((alloc, mode), [])
            row[f"{mode}_val"] = _mean_std([r["final_val_loss"] for r in runs]) if runs else "-"
            row[f"{mode}_result"] = _result_text(runs) if runs else "-"
            for group in ("attention", "mlp"):
                align = _per_run(out_dir, runs, group, "alignment_mean", np.mean)
                viol = _per_run(out_dir, runs, group, "violation_end_max", np.max)
                repaired = _per_run(out_dir, runs, group, "alignment_repaired_mean", np.mean)
                feasible = f" ({np.mean(repaired):.3f})" if repaired else ""
                row[f"{mode}_{group}"] = (f"{np.mean(align):.3f}{feasible} / {max(viol):.0e}" if align else "-")
        row["gap"] = _mode_gap_text([r["final_val_loss"] for r in variants.get((alloc, "improved"), [])],
                                    [r["final_val_loss"] for r in variants.get((alloc, "paper"), [])])
        rows.append(row)
    return rows


def _mode_gap_text(improved: list, paper: list) -> str:
    """Improved minus paper in mean final loss with its 95% Welch interval (with fewer than two
    seeds a side, the bare difference, which no interval backs)."""
    improved, paper = finite_values(improved), finite_values(paper)
    if not improved or not paper:
        return "-"
    return format_difference(welch_difference(improved, paper), 4)


MODE_COLUMNS = [("allocation", "Allocation"), ("paper_val", "Paper: final val"), ("paper_result", "Paper: result"),
                ("improved_val", "Improved: final val"), ("improved_result", "Improved: result"),
                ("gap", "Improved - paper"),
                ("paper_attention", "Paper attn: align / viol"), ("improved_attention", "Improved attn: align / viol"),
                ("paper_mlp", "Paper MLP: align / viol"), ("improved_mlp", "Improved MLP: align / viol")]


def _max_iters(out_dir: Path, result: dict) -> int:
    return json.loads((out_dir / result["run"] / "config.json").read_text())["max_iters"]


def _write_table(report_dir: Path, rows: list[dict]) -> str:
    table = format_table(rows)
    (report_dir / "table1.md").write_text(table)
    with open(report_dir / "table1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    return table


def _head(out_dir: Path, results: list[dict], cfg: dict, table: str) -> str:
    """The setup, the study's scale beside the paper's, Table 1 and the comparisons."""
    m = cfg["model"]
    tokens = cfg["batch_size"] * cfg["grad_accum"] * m["block_size"]
    thresholds = ", ".join(f"{k}={v}" for k, v in DEFAULT_THRESHOLDS.items())
    modes = _modes(results)
    gaps = gap_rows(out_dir, results)
    gap_text = (markdown_table(gaps, GAP_COLUMNS) if gaps else
                "None of the compared pairs of allocations is in this sweep.\n")
    seeds = sorted({len(runs) for runs in _by_variant(out_dir, results).values()})
    context = markdown_table(context_rows(out_dir, results), [("what", ""), ("here", "This study"), ("paper", "The paper")])
    return f"""# Report: {out_dir.name}

Setup: preset `{cfg['preset']}`, {m['arch']} with {m['n_layer']} layers, d={m['n_embd']}, {m['n_head']} heads,
context {m['block_size']}; {cfg['max_iters']} iterations of {tokens:,} tokens (per process); data `{cfg['data_dir']}`;
direction solver mode(s): {', '.join(f'`{x}`' for x in modes)}. Only the allocation{' and the mode' if len(modes) > 1 else ''}
(and the seed) differ between runs. Seeds per row: {', '.join(map(str, seeds))}.

## Scale

{context}
The manifolds act on the attention and MLP matrices only; where they are a small share of the
parameters (a large vocabulary on a narrow model), the geometry's effect on the loss is diluted.

## Table 1

{table}
Final val loss is the last evaluation: the mean over seeds and its 95% t interval (one seed: its
value). Stability: the classifier of `manifold_muon.lab.stability` (thresholds: {thresholds}); it reads
the loss only. The last column is the paper's mechanism, over the run (range over seeds): the
largest attention σ_max and the lowest attention entropy (min over layers; the uniform
distribution over the context has log(context) nats). An entropy near 0 is an attention
collapse, which can stall the loss without a spike and so pass as stable.

## Comparisons

{gap_text}
Each difference is of mean final val loss with its 95% Welch interval; **inconclusive** means
the interval contains zero: the seeds cannot tell the two apart, which is not evidence that they
are equal. "Detectable at 80% power" is the smallest true difference a two-sided t test at
these seeds' pooled spread would find four times in five: differences well below it are out of
this sweep's reach. {validation_noise(out_dir, results)}
"""


def _mode_section(out_dir: Path, results: list[dict]) -> str:
    return f"""## Paper mode vs improved mode

{markdown_table(mode_rows(out_dir, results), MODE_COLUMNS)}
align: the direction's alignment `<G,A>/||G||_*`, mean over the run's diagnostics and the
group's matrices, and in parentheses the same for the direction made feasible (projected onto the
tangent space, rescaled to spectral norm 1: the fair comparison for paper mode; runs logged
before it existed have none); viol: the largest tangent violation `RMS(P(sym(W^T A)))` seen.
Improved - paper: the difference of mean final val losses with its 95% Welch interval
(inconclusive where it contains zero; no interval with fewer than two seeds a side).
"""


def _figure_sections(figs: dict) -> list[str]:
    sections = [f"""## Figure 1: validation loss and final losses

![Figure 1]({figs['fig1']})

## Figure 2: sigma_max of the attention and MLP groups

![Figure 2]({figs['fig2']})

## Mechanism diagnostics

![Mechanism]({figs['fig3']})
"""]
    if "fig4" in figs:
        sections.append(f"""## Direction quality over training

![Direction quality]({figs['fig4']})
""")
    return sections


def _chain_section(cfg: dict, chains, chain_fig) -> str:
    return f"""## The causal chain

Onset iteration of each stage, against the run's own value at the end of warmup (iteration
{cfg['warmup_iters']}): the logit scale doubling, attention sigma_max growing by sqrt(2) (a logit's bound
grows as sigma_max squared, so this is the growth that doubles it), entropy and softmax-Jacobian
norm halving, and divergence (first non-finite step or the classifier's verdict). "In chain
order" means the stages that happened did so in this order (ties allowed: diagnostics are
sampled every `diag_interval` iterations). Stable runs are shown too, as controls.

{_chain_markdown(chains)}
{f'![Causal chain]({chain_fig})' if chain_fig else ''}

Files: [table1.md](table1.md), [table1.csv](table1.csv); per run: `eval.jsonl`, `metrics.jsonl`,
`diagnostics.jsonl`, `spectral.bin` (+ `spectral.json`), `summary.json`.
"""


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
    table = _write_table(report_dir, table_rows(out_dir, results))
    cfg = json.loads((out_dir / results[0]["run"] / "config.json").read_text())
    figs = make_figures(out_dir, results, report_dir, max_iters=max(_max_iters(out_dir, r) for r in results))
    chains = chain_rows(out_dir, results)
    chain_fig = plot_causal_chains(out_dir, chains, report_dir / "fig5_causal_chain.png", start_iter=cfg["warmup_iters"])
    sections = [_head(out_dir, results, cfg, table)]
    if len(_modes(results)) > 1:
        sections.append(_mode_section(out_dir, results))
    sections += _figure_sections(figs)
    sections.append(_chain_section(cfg, chains, chain_fig))
    (report_dir / "report.md").write_text("\n".join(sections))
    return report_dir / "report.md"
