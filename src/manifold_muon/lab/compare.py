"""``manifold-muon compare DIR DIR ...``: sweeps that differ in one setting (say the Muon
learning rate), side by side.  Per (allocation, mode) and sweep: the final val loss, the
classifier's verdict, and how far the paper's mechanism went (peak attention sigma_max, peak
attention logit, lowest attention entropy), as a table and as curves against the setting.

Everything is read back from the runs' own files, so sweeps made at different times compare."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from .analysis import finite_values, mechanism_peaks
from .stats import format_difference, welch_difference
from .config import config_from_dict, config_to_dict
from .figures import plot_comparison
from ..optim.dual import DIRECTION_MODES
from .report import markdown_table
from .sweep import OPERATIONAL, collect_results

__all__ = ["run_config", "differing_settings", "mechanism_peaks", "code_versions", "compare_rows", "build_comparison"]

#: Settings that name, log or operate a run without changing its training (the seed and the
#: variant are the rows, not the treatment).
NOT_A_TREATMENT = OPERATIONAL | {"out_dir", "seed", "allocation", "mode", "diag_interval", "eval_interval",
                                 "eval_iters", "inject_nonfinite_at"}


def run_config(run_dir: Path) -> dict:
    """A run's config as one flat namespace (model fields beside training fields, as overrides
    are); fields its version of the package did not have yet take today's defaults."""
    config = config_from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    flat = config_to_dict(config)
    # what the run trained with: "-1, weight_decay's value" is read as that value
    flat["muon_weight_decay"] = config.decay_for("muon")
    return {**flat.pop("model"), **flat}


def differing_settings(configs: list[dict]) -> list[str]:
    """The training settings whose values differ between the given configs, in config order."""
    keys = dict.fromkeys(k for c in configs for k in c if k not in NOT_A_TREATMENT)
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def code_versions(sweep_dirs: list[Path], runs: list[set[str]]) -> list[list[str]]:
    """Per sweep, the distinct codes that made the named runs (``runs``: one set of run names per
    sweep), as git commit, torch and device, from their ``env.json``."""
    return [sorted({(e.get("git_sha") or "?")[:7] + f" (torch {e.get('torch', '?')}, {e.get('device', '?')})"
                    for e in (json.loads((d / name / "env.json").read_text()) for name in sorted(names)
                              if (d / name / "env.json").is_file())})
            for d, names in zip(sweep_dirs, runs)]


def _mean(values) -> float | None:
    values = finite_values(values)
    return statistics.mean(values) if values else None


def _std(values) -> float | None:
    values = finite_values(values)
    return statistics.stdev(values) if len(values) > 1 else None


def _sweep_label(settings: list[str], config: dict, sweep_dir: Path) -> str:
    return ", ".join(f"{k}={config[k]}" for k in settings) or sweep_dir.name


def _variant_order(sweep_dirs: list[Path]):
    """Sort key: allocations in the sweeps' own order (their ``sweep.json``), then modes as
    :data:`DIRECTION_MODES` lists them."""
    specs = [json.loads((d / "sweep.json").read_text()) for d in sweep_dirs if (d / "sweep.json").is_file()]
    rank = {a: i for i, a in enumerate(dict.fromkeys(a for spec in specs for a in spec["allocations"]))}
    return lambda v: (rank.get(v[0], len(rank)), v[0], DIRECTION_MODES.index(v[1]) if v[1] in DIRECTION_MODES else 0)


def compare_rows(sweep_dirs: list[Path], allocations=None) -> tuple[list[str], list[str], list[dict]]:
    """``(settings, labels, rows)``: the settings that differ between the sweeps, one label per
    sweep, and one row per (allocation, mode) with, per sweep, its runs' names, the seed-mean
    final val loss, the number of unstable seeds and the seed-mean mechanism peaks (None where a
    sweep lacks the variant).  ``allocations``: keep only these rows (default: every allocation of any sweep)."""
    results = [collect_results(d, write=False) for d in sweep_dirs]
    for d, res in zip(sweep_dirs, results):
        if not res:
            raise ValueError(f"{d} holds no finished run (no */summary.json); run `manifold-muon sweep` first")
    configs = [run_config(d / res[0]["run"]) for d, res in zip(sweep_dirs, results)]
    settings = differing_settings(configs)
    labels = [_sweep_label(settings, c, d) for c, d in zip(configs, sweep_dirs)]
    variants = sorted(dict.fromkeys((r["allocation"], r.get("mode", "improved")) for res in results for r in res),
                      key=_variant_order(sweep_dirs))
    if allocations:
        present = list(dict.fromkeys(a for a, _ in variants))
        missing = [a for a in allocations if a not in present]
        if missing:
            raise ValueError(f"allocation(s) {missing} are in none of the sweeps; valid choices: {', '.join(present)}")
        variants = [v for v in variants if v[0] in allocations]
    rows = []
    for alloc, mode in variants:
        row = {"allocation": alloc, "mode": mode, "sweeps": []}
        for d, res in zip(sweep_dirs, results):
            runs = [r for r in res if r["allocation"] == alloc and r.get("mode", "improved") == mode]
            peaks = [mechanism_peaks(d / r["run"]) for r in runs]
            row["sweeps"].append(None if not runs else {
                "runs": [r["run"] for r in runs], "seeds": len(runs), "unstable": sum(not r["stable"] for r in runs),
                "final_val_loss": _mean([r["final_val_loss"] for r in runs]),
                "final_val_std": _std([r["final_val_loss"] for r in runs]),
                "finals": finite_values([r["final_val_loss"] for r in runs]),
                **{k: _mean([p[k] for p in peaks]) for k in ("sigma_max", "logit", "entropy")}})
        rows.append(row)
    return settings, labels, rows


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    loss = "-" if entry["final_val_loss"] is None else f"{entry['final_val_loss']:.3f}"
    if entry["final_val_std"] is not None:
        loss += f" ± {entry['final_val_std']:.3f}"
    flag = f", {entry['unstable']}/{entry['seeds']} unstable" if entry["unstable"] else ""
    peaks = "/".join("-" if entry[k] is None else f"{entry[k]:.3g}" for k in ("sigma_max", "logit", "entropy"))
    return f"{loss}{flag} ({peaks})"


def _markdown(labels: list[str], rows: list[dict]) -> str:
    columns = [("allocation", "Allocation"), ("mode", "Mode")] + [(i, label) for i, label in enumerate(labels)]
    cells = [{"allocation": r["allocation"], "mode": r["mode"], **{i: _cell(e) for i, e in enumerate(r["sweeps"])}}
             for r in rows]
    return markdown_table(cells, columns)


def _differences(labels: list[str], rows: list[dict]) -> str:
    """Each later sweep against the first, per allocation and mode: the difference in mean final
    val loss with its 95% Welch interval (inconclusive where it contains zero)."""
    columns = [("allocation", "Allocation"), ("mode", "Mode")] + [(i, f"{label} − {labels[0]}")
                                                                  for i, label in enumerate(labels) if i]
    cells = []
    for r in rows:
        first = r["sweeps"][0]
        row = {"allocation": r["allocation"], "mode": r["mode"]}
        for i, entry in enumerate(r["sweeps"]):
            if i:
                row[i] = ("-" if entry is None or first is None or not entry["finals"] or not first["finals"]
                          else format_difference(welch_difference(entry["finals"], first["finals"]), 3))
        cells.append(row)
    return markdown_table(cells, columns)


def _write_csv(path: Path, labels: list[str], rows: list[dict]) -> None:
    keys = ("seeds", "unstable", "final_val_loss", "final_val_std", "sigma_max", "logit", "entropy")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["allocation", "mode", "sweep", *keys])
        for r in rows:
            for label, entry in zip(labels, r["sweeps"]):
                if entry is not None:
                    writer.writerow([r["allocation"], r["mode"], label, *(entry[k] for k in keys)])


def build_comparison(sweep_dirs, out_dir, allocations=None) -> Path:
    """Write ``compare.md``, ``compare.csv`` and ``fig_compare.png`` into ``out_dir``
    (``allocations``: only these, as :func:`compare_rows`)."""
    sweep_dirs = [Path(d) for d in sweep_dirs]
    if len(sweep_dirs) < 2:
        raise ValueError(f"compare needs two or more sweep directories, got {len(sweep_dirs)}")
    for d in sweep_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"sweep directory {d} does not exist")
    settings, labels, rows = compare_rows(sweep_dirs, allocations)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "compare.csv", labels, rows)
    fig = plot_comparison(labels, rows, out_dir / "fig_compare.png")
    # the code of the runs the table shows, so that --allocations narrows this note as it does the table
    versions = code_versions(sweep_dirs, [{n for r in rows if r["sweeps"][i] for n in r["sweeps"][i]["runs"]}
                                          for i in range(len(sweep_dirs))])
    every_version = set().union(*versions)
    made_by = ("All runs were made by the same code: " + every_version.pop() + "." if len(every_version) == 1 else
               "The runs were made by more than one version of the code, so a difference may come from the code "
               "as well as from the setting: "
               + "; ".join(f"`{d.name}`: {' + '.join(v) or 'unknown'}" for d, v in zip(sweep_dirs, versions)) + ".")
    differ = (f"The sweeps differ in {', '.join(f'`{k}`' for k in settings)}; every other training setting is the same."
              if settings else "The sweeps' training settings are identical; columns are named by directory.")
    text = f"""# Comparison: {', '.join(d.name for d in sweep_dirs)}

{differ} Each cell is the final val loss (mean ± standard deviation over seeds where there are
several; how many seeds the classifier of `manifold_muon.lab.stability` called unstable), then in
parentheses the run's largest attention sigma_max / largest attention logit |z| / lowest
attention entropy (nats), each the mean over seeds of the run's extreme.

{_markdown(labels, rows)}
Differences from `{sweep_dirs[0].name}` in mean final val loss, with 95% Welch intervals
(inconclusive: the interval contains zero; no interval with fewer than two seeds a side):

{_differences(labels, rows)}
![Comparison]({fig})

{made_by}

Sweeps: {', '.join(f'`{d}`' for d in sweep_dirs)}. Data: [compare.csv](compare.csv).
"""
    (out_dir / "compare.md").write_text(text)
    return out_dir / "compare.md"
