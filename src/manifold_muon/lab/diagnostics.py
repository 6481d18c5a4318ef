"""Spectral and mechanism diagnostics.

* **Spectra** (the paper): for every Muon-managed matrix, its singular values, ``diag(W^T W)``
  (tall orientation), ``||Off(W^T W)||_F`` and ``||W||_F``, every N iterations.  Stored in one
  file, ``spectral.bin``, of fixed-size records (a numpy structured dtype described in
  ``spectral.json``), so it reads back with one ``np.fromfile`` and grows by one record per
  interval; the trainer picks the interval so that a run writes at most ``MAX_RECORDS``.
  ``pack --spectral-summary`` replaces a finished run's spectra by ``spectral_summary.bin``
  (+ ``.json``; ``pack`` then xz-packs the ``.bin`` as it does the other logs): the same records
  with only a few ranks of each spectrum kept (σ_max exact), so committed results stay small;
  the full files remain in the repository's history.
* **Mechanism** (the paper's future work), per attention layer on a fixed batch: the
  pre-softmax logit scale (max |z| and the mean top-1 minus top-2 gap), the mean attention
  entropy, the mean softmax-Jacobian Frobenius norm
  ``||diag(p) - p p^T||_F^2 = sum p_i^2 - 2 sum p_i^3 + (sum p_i^2)^2``, and
  ``||W_Q||_2 ||W_K||_2``.  Written to ``diagnostics.jsonl`` with per-group gradient norms and
  the optimizer's health statistics.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from ..optim.allocation import ATTENTION, MLP
from ..optim.dual import spectral_norm
from .runio import PACKED_SUFFIX, read_log_bytes, replace_file

__all__ = ["module_group", "SpectralRecorder", "read_spectral", "spectral_stats", "attention_mechanics",
           "softmax_jacobian_fro", "MAX_RECORDS", "summarize_health", "summarize_spectra"]

MAX_RECORDS = 256
#: What a spectral summary keeps of each spectrum (singular values, and diag(W^T W) sorted):
#: the largest, the quartiles and the smallest, by rank.
SUMMARY_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def module_group(name: str) -> str:
    """``attention``, ``mlp`` or ``other``, by the presets' patterns."""
    if re.search(ATTENTION, name):
        return "attention"
    if re.search(MLP, name):
        return "mlp"
    return "other"


@torch.no_grad()
def spectral_stats(w: torch.Tensor) -> dict[str, np.ndarray | float]:
    """Singular values (descending), Gram diagonal, off-diagonal Gram norm, Frobenius norm.
    Singular values come from the eigenvalues of the small Gram in float64: several times
    cheaper than an SVD and exact enough for spectra."""
    w = w.detach().double()
    if w.shape[-2] < w.shape[-1]:
        w = w.mT
    gram = w.mT @ w
    sv = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(-1)
    diag = gram.diagonal()
    off = (gram - torch.diag_embed(diag)).norm()
    return {"sv": sv.cpu().numpy(), "diag": diag.cpu().numpy(), "off": off.item(), "fro": w.norm().item()}


def _record_dtype(lengths: list[int]) -> np.dtype:
    """One record: the iteration, then per matrix ``i`` its ``lengths[i]`` singular values and Gram
    diagonal entries (all of them, or a summary's ranks), ``off`` and ``fro``."""
    fields = [("iter", "<i8")]
    for i, n in enumerate(lengths):
        fields += [(f"sv{i}", "<f4", (n,)), (f"diag{i}", "<f4", (n,)), (f"off{i}", "<f4"), (f"fro{i}", "<f4")]
    return np.dtype(fields)


class SpectralRecorder:
    """Appends one fixed-size record per call to ``spectral.bin`` (see the module docstring)."""

    def __init__(self, run_dir, named: dict[str, torch.Tensor]):
        if (Path(run_dir) / "spectral_summary.json").is_file():
            raise ValueError(f"{run_dir}: its spectra were summarized (pack --spectral-summary), so training it "
                             "further would leave a gap in them; restore the full spectral.bin from git history "
                             "or train into a new out_dir")
        self.names = list(named)
        sizes = {n: min(p.shape[-2:]) for n, p in named.items()}
        self.dtype = _record_dtype([sizes[n] for n in self.names])
        self.path = Path(run_dir) / "spectral.bin"
        header = {"names": self.names, "groups": [module_group(n) for n in self.names],
                  "sizes": [sizes[n] for n in self.names], "dtype": self.dtype.descr}
        (Path(run_dir) / "spectral.json").write_text(json.dumps(header))

    def truncate(self, below_iter: int) -> None:
        """On resume: drop records the checkpoint will write again."""
        if self.path.is_file():
            keep = np.fromfile(self.path, dtype=self.dtype)
            keep[keep["iter"] < below_iter].tofile(self.path)

    def record(self, it: int, named: dict[str, torch.Tensor]) -> None:
        rec = np.zeros((), dtype=self.dtype)
        rec["iter"] = it
        for i, n in enumerate(self.names):
            s = spectral_stats(named[n])
            rec[f"sv{i}"], rec[f"diag{i}"], rec[f"off{i}"], rec[f"fro{i}"] = s["sv"], s["diag"], s["off"], s["fro"]
        with open(self.path, "ab") as f:
            f.write(rec.tobytes())


def read_spectral(run_dir) -> tuple[dict, np.ndarray] | tuple[None, None]:
    """``(header, records)`` of a run, full or summarized (the header then has ``summary``), or
    ``(None, None)`` if it recorded no spectra."""
    run_dir = Path(run_dir)
    for stem in ("spectral", "spectral_summary"):   # full spectra while they exist (a summary may be half made)
        data = read_log_bytes(run_dir / f"{stem}.bin")   # plain or packed (runio.pack_run)
        if (run_dir / f"{stem}.json").is_file() and data is not None:
            break
    else:
        return None, None
    header = json.loads((run_dir / f"{stem}.json").read_text())
    dtype = np.dtype([tuple(f) if len(f) == 2 else (f[0], f[1], tuple(f[2])) for f in header["dtype"]])
    whole = len(data) - len(data) % dtype.itemsize   # a record torn by a crash is dropped
    return header, np.frombuffer(data[:whole], dtype=dtype)


def _kept_ranks(size: int) -> list[int]:
    return sorted({round(q * (size - 1)) for q in SUMMARY_QUANTILES})


def summarize_spectra(run_dir) -> bool:
    """Replace a finished run's full spectra (``spectral.bin``, plain or packed) by their summary,
    ``spectral_summary.bin`` + ``.json``: per record and matrix, the singular values and the sorted
    ``diag(W^T W)`` at the ranks of ``SUMMARY_QUANTILES`` (so ``sv{i}[:, 0]`` is still sigma_max),
    ``off`` and ``fro`` unchanged.  Lossy; for committed results (a ``gpt2-reduced`` run's spectra
    shrink about 60x).  The summary is written whole before the full files go, and readers prefer
    the full ones, so a crash loses nothing (run again, it finishes the removal).  Returns False
    where the run has no spectra."""
    run_dir = Path(run_dir)
    header, rec = read_spectral(run_dir)
    if header is None:
        return False
    if "summary" not in header:
        ranks = [_kept_ranks(size) for size in header["sizes"]]
        summary = np.zeros(len(rec), dtype=_record_dtype([len(kept) for kept in ranks]))
        summary["iter"] = rec["iter"]
        for i, kept in enumerate(ranks):
            summary[f"sv{i}"] = rec[f"sv{i}"][:, kept]
            summary[f"diag{i}"] = -np.sort(-rec[f"diag{i}"], axis=1)[:, kept]   # descending, as the singular values
            summary[f"off{i}"], summary[f"fro{i}"] = rec[f"off{i}"], rec[f"fro{i}"]
        replace_file(run_dir / "spectral_summary.bin", summary.tobytes())
        replace_file(run_dir / "spectral_summary.json", json.dumps(
            {**header, "dtype": summary.dtype.descr,
             "summary": {"quantiles": list(SUMMARY_QUANTILES), "ranks": ranks,
                         "of": "singular values (descending) and diag(W^T W) sorted descending"}}).encode())
    for name in ("spectral.json", "spectral.bin", "spectral.bin" + PACKED_SUFFIX):   # also what a crash left
        (run_dir / name).unlink(missing_ok=True)
    return True


def softmax_jacobian_fro(p: torch.Tensor) -> torch.Tensor:
    """``||diag(p) - p p^T||_F`` per row of probabilities ``p`` (last dim), without forming it."""
    s2, s3 = p.pow(2).sum(-1), p.pow(3).sum(-1)
    return (s2 - 2 * s3 + s2.pow(2)).clamp(min=0).sqrt()


def _qk_weights(attn) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(attn, "c_attn"):
        d = attn.c_attn.weight.shape[1]
        return attn.c_attn.weight[:d], attn.c_attn.weight[d: 2 * d]
    return attn.q_proj.weight, attn.k_proj.weight


@torch.no_grad()
def attention_mechanics(model, idx: torch.Tensor) -> list[dict]:
    """Per attention layer of :class:`manifold_muon.lab.model.GPT` on the batch ``idx`` (B, T)."""
    from .model import _rotary
    inputs = []
    hooks = [(blk.attn if hasattr(blk, "attn") else blk.self_attn).register_forward_pre_hook(
        lambda mod, args: inputs.append((mod, args[0]))) for blk in model.transformer.h]
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    rows = []
    for layer, (attn, x) in enumerate(inputs):
        wq, wk = _qk_weights(attn)
        b, t, c = x.shape
        nh = attn.n_head
        q = (x.float() @ wq.float().T).view(b, t, nh, c // nh).transpose(1, 2)
        k = (x.float() @ wk.float().T).view(b, t, nh, c // nh).transpose(1, 2)
        if not hasattr(attn, "c_attn"):
            q, k = _rotary(q, attn.theta), _rotary(k, attn.theta)
        z = q @ k.transpose(-1, -2) / math.sqrt(c // nh)                      # (B, H, T, T)
        causal = torch.ones(t, t, dtype=torch.bool, device=z.device).tril()
        z = z.masked_fill(~causal, float("-inf"))
        p = torch.softmax(z, dim=-1)
        top2 = z[..., 1:, :].topk(2, dim=-1).values                          # rows with >= 2 keys
        entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(-1)
        spectral = spectral_norm(wq.float()) * spectral_norm(wk.float())
        rows.append({"layer": layer, "logit_max_abs": z.masked_fill(~causal, 0).abs().max().item(),
                     "logit_gap": (top2[..., 0] - top2[..., 1]).mean().item(),
                     "entropy": entropy.mean().item(), "jacobian_fro": softmax_jacobian_fro(p).mean().item(),
                     "wq_wk_spectral": spectral.item()})
    return rows


def summarize_health(stats: dict[str, dict]) -> dict[str, dict]:
    """Optimizer health per (group, manifold): mean alignment (as returned and made feasible),
    max violations and residual, and how far compiling moved the alignment where the group
    compiles."""
    out: dict[str, dict] = {}
    for name, s in stats.items():
        key = module_group(name)
        agg = out.setdefault(key, {"manifold": s["manifold"], "alignment_mean": 0.0, "alignment_min": 1.0,
                                   "alignment_repaired_mean": 0.0,
                                   "violation_start_max": 0.0, "violation_end_max": 0.0, "residual_max": 0.0,
                                   "momentum_norm_max": 0.0, "n": 0})
        agg["n"] += 1
        agg["alignment_mean"] += (s["alignment"] - agg["alignment_mean"]) / agg["n"]
        agg["alignment_min"] = min(agg["alignment_min"], s["alignment"])
        agg["alignment_repaired_mean"] += (s["alignment_repaired"] - agg["alignment_repaired_mean"]) / agg["n"]
        for k in ("violation_start", "violation_end", "residual", "momentum_norm"):
            agg[f"{k}_max"] = max(agg[f"{k}_max"], s[k])
        if "compiled_alignment_gap" in s:   # groups that compile their direction: the largest change
            agg["compiled_alignment_gap_max"] = max(agg.get("compiled_alignment_gap_max", 0.0),
                                                    abs(s["compiled_alignment_gap"]))
    return out
