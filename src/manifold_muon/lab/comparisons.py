"""What a report says about its runs beyond the table: each comparison's difference with its 95%
Welch interval, the smallest difference the seeds could have detected, the validation subset's
own noise, and the scale of the study against the paper's."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from .analysis import finite_values
from .runio import read_jsonl
from .stats import format_difference, min_detectable_difference, welch_difference

__all__ = ["difference_row", "DIFFERENCE_COLUMNS", "context_rows", "validation_noise", "PAPER_SCALE"]

#: The paper's setup (GPT-2 small, 50,000 steps of 64 x 1024 tokens, 200 validation batches),
#: and the share of its parameters in the attention and MLP matrices the manifolds manage.
PAPER_SCALE = {"parameters": 124_475_904, "managed_share": 0.683, "tokens": 50_000 * 65_536,
               "val_tokens": 200 * 65_536, "final_val_loss": "3.35–3.39"}

DIFFERENCE_COLUMNS = [("pair", "a − b"), ("mode", "Mode"), ("seeds", "Seeds a / b"),
                      ("difference", "Difference in mean final val loss [95% CI]"), ("verdict", "Verdict"),
                      ("p", "Welch p"), ("detectable", "Detectable at 80% power")]


def difference_row(pair: str, mode: str, a: list[float], b: list[float]) -> dict | None:
    """One comparison: ``mean(a) - mean(b)`` with its Welch interval and verdict, and the smallest
    true difference a test at these seeds' pooled spread would find 80% of the time."""
    a, b = finite_values(a), finite_values(b)
    if not a or not b:
        return None
    d = welch_difference(a, b)
    pooled = (math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1)) / (len(a) + len(b) - 2))
              if len(a) > 1 and len(b) > 1 else math.nan)
    detectable = min_detectable_difference(pooled, len(a), len(b))
    verdict = d.verdict if d.verdict == "inconclusive" or not math.isfinite(d.low) else f"{d.verdict} loss for a"
    difference = format_difference(d, 4) if math.isfinite(d.low) else f"{d.estimate:+.4f}"   # the verdict says why
    return {"pair": pair, "mode": mode, "seeds": f"{len(a)} / {len(b)}", "difference": difference,
            "verdict": verdict, "p": "-" if math.isnan(d.p_value) else f"{d.p_value:.3f}",
            "detectable": "-" if math.isnan(detectable) else f"{detectable:.4f}"}


def _parameters(run_dir: Path) -> tuple[int, int]:
    """(all trainable parameters, those in manifold-managed matrices) from the run's allocation."""
    rows = json.loads((run_dir / "allocation.json").read_text())
    total = sum(math.prod(r["shape"]) for r in rows)
    managed = sum(math.prod(r["shape"]) for r in rows if r["manifold"] != "none")
    return total, managed


def context_rows(out_dir: Path, results: list[dict]) -> list[dict]:
    """The study's scale beside the paper's: model size, the share of parameters the manifolds
    manage (largest over the allocations), tokens seen, validation tokens, final losses."""
    first = out_dir / results[0]["run"]
    cfg = json.loads((first / "config.json").read_text())
    world = json.loads((first / "env.json").read_text()).get("world_size", 1) if (first / "env.json").exists() else 1
    per_step = cfg["batch_size"] * cfg["grad_accum"] * cfg["model"]["block_size"] * world
    shares = [_parameters(out_dir / r["run"]) for r in results]
    total = shares[0][0]
    managed = max(m for _, m in shares) / total
    losses = finite_values([r["final_val_loss"] for r in results])
    loss_span = f"{min(losses):.2f}–{max(losses):.2f}" if losses else "-"
    val_tokens = cfg["eval_iters"] * cfg["batch_size"] * cfg["model"]["block_size"] * world
    paper = PAPER_SCALE
    return [{"what": "parameters", "here": f"{total / 1e6:.2f} M", "paper": f"{paper['parameters'] / 1e6:.0f} M"},
            {"what": "share in manifold-managed matrices", "here": f"{managed:.1%}", "paper": f"{paper['managed_share']:.0%}"},
            {"what": "tokens seen", "here": f"{cfg['max_iters'] * per_step / 1e6:.2f} M",
             "paper": f"{paper['tokens'] / 1e9:.1f} B"},
            {"what": "validation tokens (one fixed subset)", "here": f"{val_tokens:,}", "paper": f"{paper['val_tokens']:,}"},
            {"what": "final validation loss", "here": loss_span, "paper": paper["final_val_loss"]}]


def validation_noise(out_dir: Path, results: list[dict]) -> str:
    """The validation subset's sampling error, where runs recorded per-batch losses: the standard
    error of the mean over its batches, median over runs.  Seeds share the subset, so this noise
    is in no seed spread and no interval above."""
    errors = []
    for r in results:
        evals = read_jsonl(out_dir / r["run"] / "eval.jsonl")
        batches = evals[-1].get("val_batch_losses") if evals else None
        if batches and len(batches) > 1:
            errors.append(statistics.stdev(batches) / math.sqrt(len(batches)))
    if not errors:
        return ("These runs did not record per-batch validation losses (runs from this version on do), so the "
                "subset's own sampling error is not estimated here.")
    return (f"Measured from {len(errors)} run(s)' per-batch validation losses, the subset's standard error is "
            f"{statistics.median(errors):.4f} nats (median over runs): a difference smaller than about twice that "
            "could come from which tokens the subset holds.")
