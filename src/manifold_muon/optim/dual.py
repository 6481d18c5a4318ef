"""The Manifold Muon direction: the steepest unit-spectral-norm tangent direction.

Problem (tall ``W``, ``m >= n``; wide inputs are transposed in and out)::

    max_A <G, A>   s.t.  ||A||_2 <= 1,   P(W^T A + A^T W) = 0

Its Lagrangian is linear in A, so for a multiplier ``Lam`` the maximiser is
``A(Lam) = msign(G + 2 W P(sym(Lam)))`` and the dual function is the nuclear
norm ``||G + 2 W P(sym(Lam))||_*``.  Dual ascent walks ``Lam`` down the dual's
gradient, which is the tangent violation ``H = P(W^T A + A^T W)``.

Three modes:

* ``"paper"`` reproduces the reference code exactly: unnormalised G, warm start
  ``-1/4 P(W^T G + G^T W)``, ``steps=20`` updates with step ``alpha (1 - k/steps)``
  (``alpha=0.1``), bf16 Polar Express, an early exit when ``RMS(H) < 1e-6``
  (which in bf16 practically never fires), and it returns the ``A`` of the last
  inner iteration as it stands, without repair.
* ``"improved"`` (default):
    - scale-free: ``G`` is divided by its RMS singular value ``||G||_F / sqrt(n)``,
      so ``alpha`` means the same for every gradient scale (the paper's effective
      step is ``alpha / ||G||`` and wrecks the warm start for small momenta);
    - the warm start is the exact tangent projection ``G - W S`` with
      ``S_ij = (W^T G + G^T W)_ij / (k_i + k_j)``, ``k = diag(W^T W)``; this equals
      the paper's only where ``k = 1`` (Stiefel, Oblique);
    - the dual is minimised by L-BFGS with per-matrix Armijo backtracking (up to
      ``steps`` iterations; the first step, before curvature is known, is ``alpha`` over the
      mean squared column norm of W, so a DGram matrix's solve does not depend on its scale);
    - the dual is evaluated with an ``m x n`` msign, or in ``n x n`` Gram space in float64
      (``dual_form``; :mod:`nuclear_dual`);
    - it starts from the better (lower dual value) of the exact warm start and a carried
      multiplier (``dual_init``, e.g. the previous optimizer step's);
    - square Stiefel therefore runs no dual steps: ``msign`` of the projected gradient is
      already tangent (``W^T A`` is skew), attains the dual bound, and the early stop fires;
    - each matrix stops (is frozen) once its scale-free violation ``RMS(H_ij / (d_i + d_j))``
      (``d`` = column norms) is below ``tol``, so a stack gives every matrix the answer it
      would get alone;
    - a final *repair*: the exact tangent projection of ``A`` and a rescale to
      spectral norm <= 1.  This makes the result feasible to rounding whatever
      the dual reached.  It is what handles square DGram, where every
      ``msign`` output is orthogonal and no multiplier makes it tangent: there the
      solver runs no iterations, and the repaired exact warm start is the answer, a
      deterministic direction that depends continuously on ``W`` and ``G``.
* ``"fast"``: the improved mode's warm start and repair with no dual iterations and no
  carried multiplier: ``A = repair(msign(G - W S0))``, one msign per matrix (in bfloat16
  unless told otherwise; the warm start is built in the msign's dtype, which rounds it to
  that anyway; Polar Express with 7 steps, not 10: ``FAST_MSIGN_STEPS``), as cheap as Muon
  plus three float32 ``m n^2`` products.  Its repair
  rescales by an estimate of the spectral norm (block Lanczos plus a residual term, which errs
  upward: ``spectral_norm_estimate``) instead of an eigendecomposition (slow on GPUs), so
  ``||A||_2 <= 1`` holds to that estimate's accuracy (tested to 1e-3), and the step may come
  out slightly shorter than it could be.  ``benchmarks/direction_quality.py`` measures its
  alignment against the other modes on real momenta.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from .manifolds import Manifold, as_tall, get_manifold, sym
from .msign import msign, quintic_schedule, work_dtype
from .norms import alignment, singular_values, spectral_norm, spectral_norm_estimate
from .nuclear_dual import GramDual, MatrixDual, batch_dot
from .precision import library_matmul_precision, low_precision_compute

__all__ = ["manifold_direction", "solve_direction", "DirectionResult", "DIRECTION_MODES", "DUAL_FORMS",
           "default_msign_dtype", "check_dual_form", "stack_stats",
           "alignment", "repaired_alignment", "spectral_norm", "spectral_norm_estimate", "singular_values"]

DIRECTION_MODES = ("paper", "fast", "improved")   # the reference, then by cost
PAPER_DEFAULTS = dict(steps=20, alpha=0.1, tol=1e-6)
IMPROVED_DEFAULTS = dict(steps=128, alpha=0.05, tol=2e-4)
FAST_DEFAULTS = dict(IMPROVED_DEFAULTS, steps=0)
# Fast mode's Polar Express runs the 7 optimised polynomials and skips the 3 repeats of the
# convergent last one: 30% of the msign cheaper, at an alignment within bf16 rounding of 10
# steps (benchmarks/fast_path.py); fewer steps lose alignment.
FAST_MSIGN_STEPS = 7
# Where the improved solver evaluates its dual (nuclear_dual.py): on the m x n matrix, or in
# n x n Gram space in float64 (opt-in: it pays only where float64 matmuls run near float32's
# speed, as on H100 tensor cores, not on CPUs).
DUAL_FORMS = ("matrix", "gram")


def check_dual_form(form: str, msign_method: str) -> None:
    """Refuse a dual form that does not exist, or the Gram form without a quintic iteration to
    mirror (``msign_method="svd"``)."""
    if form not in DUAL_FORMS:
        raise ValueError(f"unknown dual form {form!r}; valid choices: {', '.join(DUAL_FORMS)}")
    if form == "gram" and msign_method == "svd":
        raise ValueError("dual_form='gram' mirrors an iterative msign; msign_method='svd' has none "
                         "(valid with it: polar_express, newton_schulz)")


def default_msign_dtype(mode: str, work: torch.dtype = torch.float32, *, has_dual: bool = True) -> torch.dtype:
    """msign's compute dtype when none is given: ``work`` (float32, float64 for float64 input)
    for the improved mode's dual solver, whose L-BFGS needs accurate dual gradients; bfloat16
    everywhere else: paper mode (the reference's), fast mode (speed first: on tiny-GPT momenta
    it changed the alignment by under 0.002, ``benchmarks/direction_quality.py``) and plain
    Muon (as ``torch.optim.Muon`` and the reference)."""
    return work if mode == "improved" and has_dual else torch.bfloat16


@dataclass
class DirectionResult:
    """What the solver found.  Tensors are per matrix of the stack."""

    direction: torch.Tensor          # A, same shape and orientation as G
    dual: torch.Tensor | None        # final multiplier (tall n x n; improved mode: in units of normalised G)
    steps_taken: int
    violation_start: torch.Tensor    # tangent violation RMS(P(sym(W^T A))) of the warm start's A
    weight: torch.Tensor | None = None    # W as passed (a reference, not a copy), for violation_end
    manifold: Manifold | None = None
    evaluations: int = 0             # improved mode: dual evaluations (msigns), the solve's unit of cost

    @property
    def violation_end(self) -> torch.Tensor:
        """Tangent violation of the returned A, computed on demand (an ``m n^2`` product that
        the optimizer needs only on the steps that collect statistics).  It reads ``weight``
        as it is now, so a caller that updates W in place must read it first (the optimizer
        updates out of place)."""
        if self.manifold is None:
            return torch.zeros_like(self.violation_start)
        return self.manifold.tangent_violation(self.weight, self.direction)


def repaired_alignment(manifold: Manifold, w: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The alignment of ``A`` made feasible: its exact tangent projection at ``W``, rescaled to
    spectral norm 1.  The fair comparison for a direction that is not tangent (paper mode's);
    for a feasible one it is its alignment at full length."""
    a = manifold.tangent_project(w, a)
    return alignment(g, a / spectral_norm(a).clamp(min=1e-30)[..., None, None])


def _scaled_violation(column_norms: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Scale-free tangent violation ``RMS(H_ij / (d_i + d_j))`` of the candidate whose dual
    gradient is ``grad`` (``H = P(W^T A + A^T W) = 2 grad``), ``d`` the column norms of tall W."""
    d = column_norms
    return _rms(2 * grad / (d.unsqueeze(-1) + d.unsqueeze(-2)).clamp(min=1e-30))


def _paper(manifold, w, g, steps, alpha, tol, sign):
    project = manifold.project
    lam = -0.25 * project(w.mT @ g + g.mT @ w)
    a, violation_start, taken = None, None, 0
    for k in range(steps):
        a = sign(g + 2 * w @ project(sym(lam))).to(g.dtype)
        h = project(w.mT @ a + a.mT @ w)
        if violation_start is None:   # h = 2 P(sym(W^T A)): the tangent violation, doubled
            violation_start = 0.5 * _rms(h)
        taken = k + 1
        if h.pow(2).mean().sqrt() < tol:   # the reference's (batch-wide) absolute test
            break
        lam = lam - alpha * (1 - k / steps) * h
    if a is None:  # steps == 0: the warm start's direction
        a = sign(g + 2 * w @ project(sym(lam))).to(g.dtype)
        violation_start = manifold.tangent_violation(w, a)
    return a, lam, taken, violation_start


def _lbfgs_direction(dual, starts, steps, alpha, tol, history=10, backtracks=8):
    """Minimise the nuclear-norm dual by L-BFGS with per-matrix Armijo backtracking.

    Why not the paper's annealed gradient steps: at the optimum ``X`` typically has
    singular values ~1e-3 of its largest, msign's sensitivity is ~1/sigma, and a
    fixed step either crawls or oscillates.  Curvature pairs adapt the step per
    direction.  Every scalar is per matrix, so a stack is solved as independent problems.
    ``dual`` is either form of :mod:`nuclear_dual`; its candidate (``A``, or the Gram form's
    ``Q``) becomes the direction through ``dual.primal`` once, at the end.
    """
    column_norms = dual.w.norm(dim=-2)
    s, (f, grad, cand) = starts[0], dual(starts[0])
    for other in starts[1:]:  # per matrix, start from the candidate with the lowest dual value
        f2, g2, cand2 = dual(other)
        better = f2 < f
        s, f, grad, cand = (torch.where(better, other, s), torch.where(better, f2, f),
                            torch.where(better, g2, grad), torch.where(better, cand2, cand))
    violation_start = _rms(grad)   # grad is P(sym(W^T A)): the tangent violation of A
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    # The dual's curvature in S scales with W^T W (G is normalised), so the first step is
    # alpha over the mean squared column norm: alpha for unit columns (Stiefel), and the same
    # relative step for DGram columns of any length.
    gamma = alpha / column_norms.pow(2).mean(-1).clamp(min=1e-30)[..., None, None]
    taken = 0
    for _ in range(steps):
        # A matrix that meets the tolerance is frozen, so each matrix's answer is the same
        # whatever else shares its stack (what lets ranks split a stack; see distributed.py).
        active = (_scaled_violation(column_norms, grad) >= tol)[..., None, None]
        if not bool(active.any()):
            break
        taken += 1
        q, coeffs = grad.clone(), []
        for sk, yk, rho in reversed(pairs):  # L-BFGS two-loop recursion
            c = rho * batch_dot(sk, q)
            coeffs.append(c)
            q = q - c * yk
        q = gamma * q
        for (sk, yk, rho), c in zip(pairs, reversed(coeffs)):
            q = q + sk * (c - rho * batch_dot(yk, q))
        d = -q
        slope = batch_dot(grad, d)
        t = torch.ones_like(f)
        accepted = ~active
        s_new, f_new, g_new, cand_new = s, f, grad, cand
        for _ in range(backtracks):
            s_try = s + t * d
            f_try, g_try, cand_try = dual(s_try)
            ok = (f_try <= f + 1e-4 * t * slope) & ~accepted
            s_new, f_new = torch.where(ok, s_try, s_new), torch.where(ok, f_try, f_new)
            g_new, cand_new = torch.where(ok, g_try, g_new), torch.where(ok, cand_try, cand_new)
            accepted |= ok
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, 0.5 * t)
        # A failed search with no curvature pairs to age out (plain gradient steps) would be
        # repeated exactly; it is retried from below the smallest step it tried instead.
        failed = active & ~accepted
        if pairs:
            failed = failed & (sum((rp > 0).int() for _, _, rp in pairs) == 0)
        gamma = torch.where(failed, gamma * t, gamma)
        sk, yk = s_new - s, g_new - grad
        sy = batch_dot(sk, yk)
        valid = active & (sy > 1e-12 * batch_dot(sk, sk).clamp(min=1e-30))
        rho = torch.where(valid, 1.0 / sy.clamp(min=1e-30), torch.zeros_like(sy))
        pairs.append((torch.where(valid, sk, 0.0), torch.where(valid, yk, 0.0), rho))
        pairs = pairs[-history:]
        gamma = torch.where(valid, sy / batch_dot(yk, yk).clamp(min=1e-30), gamma)
        s, f, grad, cand = s_new, f_new, g_new, cand_new
    return dual.primal(s, cand), grad, s, taken, violation_start


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=(-2, -1)).sqrt()


def _normalised(g: torch.Tensor) -> torch.Tensor:
    """G divided by its RMS singular value ``||G||_F / sqrt(n)``: scale-free."""
    scale = g.norm(dim=(-2, -1), keepdim=True) / math.sqrt(g.shape[-1])
    return g / scale.clamp(min=1e-30)


def _repair(manifold, w, a, violation, estimate_norm):
    """Exact tangent projection (from ``violation`` = the dual's gradient ``P(sym(W^T A))``,
    already at hand), then a rescale to spectral norm at most 1.

    The factor 1 + 1e-6 absorbs the Gram's float32 rounding so the bound holds strictly.
    Fast mode trades that strictness for speed: its norm is an estimate that errs upward (see
    spectral_norm_estimate), so its ||A||_2 may exceed 1 by that estimate's rare shortfall."""
    a = a - w @ manifold.normal_coefficients(w, a, projected=2 * violation)
    norm = spectral_norm_estimate(a) if estimate_norm else spectral_norm(a)
    return a / (norm * (1 + 1e-6)).clamp(min=1.0)[..., None, None]


def _fast(manifold, w, g, sign, low):
    """``repair(msign(G - W S0))`` with the warm start built in ``low``, msign's dtype.

    Why ``low``: msign rounds its input to that dtype anyway, so products that only shape
    its input gain nothing from float32, and an H100's IEEE float32 peak is ~1/15 of its bf16 one.
    The dual's gradient and the repair stay in float32: they decide tangency."""
    # On a CPU without bf16 units the products run in float32 on the bf16-rounded inputs.
    compute = low_precision_compute(low, w.device)
    wl, gl = w.to(low).to(compute), _normalised(g).to(low).to(compute)
    a = sign(gl - wl @ manifold.normal_coefficients(wl, gl)).to(w.dtype)
    violation = manifold.project(sym(w.mT @ a))
    return _repair(manifold, w, a, violation, estimate_norm=True), _rms(violation)


def _improved(manifold, w, g, steps, alpha, tol, sign, dual_init, gram_schedule):
    """``gram_schedule``: the msign's ``QuinticSchedule`` to solve in Gram space, else None."""
    g = _normalised(g)
    # The exact tangent projection of G (X0 = G - W S0 is tangent) is always a candidate start:
    # for square Stiefel it attains the dual bound, so the early stop returns it with no steps,
    # even when a carried multiplier (dual_init) is offered and would be worse.
    starts = [-manifold.normal_coefficients(w, g)]
    if dual_init is not None:
        starts.append(manifold.project(sym(dual_init.to(g.dtype))))
    dual = GramDual(manifold, w, g, gram_schedule) if gram_schedule else MatrixDual(manifold, w, g, sign)
    if manifold.degenerate_when_square and w.shape[-2] == w.shape[-1]:
        # No multiplier makes a square DGram direction tangent; iterating would stop wherever the
        # cap falls, a discontinuous answer.  The repaired exact warm start depends continuously
        # on W and G, and is deterministic.
        starts, steps = starts[:1], 0
    a, violation, s, taken, violation_start = _lbfgs_direction(dual, starts, steps, alpha, tol)
    return _repair(manifold, w, a, violation, estimate_norm=False), s, taken, violation_start, dual.evaluations


@torch.no_grad()
@library_matmul_precision()
def solve_direction(
    W: torch.Tensor,
    G: torch.Tensor,
    manifold: str | Manifold,
    *,
    mode: str = "fast",
    steps: int | None = None,
    alpha: float | None = None,
    tol: float | None = None,
    msign_method: str = "polar_express",
    msign_steps: int | None = None,
    dtype: torch.dtype | None = None,
    dual_init: torch.Tensor | None = None,
    dual_form: str = "matrix",
) -> DirectionResult:
    """Solve for the Manifold Muon direction and report how well it was solved.

    ``W`` and ``G`` have the same shape ``(..., m, n)``.  Defaults depend on ``mode``
    (paper: steps 20, alpha 0.1, tol 1e-6; improved: see ``IMPROVED_DEFAULTS``; fast: no steps).
    ``msign_method``, ``msign_steps`` and ``dtype`` set the msign (``dtype`` default: see
    :func:`default_msign_dtype`; ``msign_steps`` default: the method's, except fast mode's
    Polar Express, ``FAST_MSIGN_STEPS``).  ``dual_init`` warm-starts the
    multiplier (improved mode, tall ``n x n``), e.g. with the previous step's ``dual``.
    ``dual_form`` (improved mode; see ``DUAL_FORMS``) evaluates the dual with an ``m x n``
    msign or in ``n x n`` Gram space in float64 (:mod:`nuclear_dual`).
    """
    if mode not in DIRECTION_MODES:
        raise ValueError(f"unknown direction mode {mode!r}; valid choices: {', '.join(DIRECTION_MODES)}")
    if W.shape != G.shape:
        raise ValueError(f"W and G must have the same shape, got {tuple(W.shape)} and {tuple(G.shape)}")
    check_dual_form(dual_form, msign_method)
    manifold = get_manifold(manifold)
    defaults = {"paper": PAPER_DEFAULTS, "improved": IMPROVED_DEFAULTS, "fast": FAST_DEFAULTS}[mode]
    steps = defaults["steps"] if steps is None else int(steps)
    alpha = defaults["alpha"] if alpha is None else float(alpha)
    tol = defaults["tol"] if tol is None else float(tol)
    if mode == "fast" and steps:
        raise ValueError(f"fast mode takes no dual steps, got steps={steps}; for dual iterations "
                         f"use mode='improved' with steps={steps}")

    work = work_dtype(G)
    dtype = dtype or default_msign_dtype(mode, work, has_dual=manifold.has_dual)
    if msign_steps is None and mode == "fast" and msign_method == "polar_express" and manifold.has_dual:
        msign_steps = FAST_MSIGN_STEPS
    sign = partial(msign, method=msign_method, steps=msign_steps, dtype=dtype)
    if not manifold.has_dual:  # none / spectral ball: plain Muon direction
        a = sign(G).to(G.dtype)
        return DirectionResult(a, None, 0, torch.zeros(G.shape[:-2], device=G.device))

    w, wide = as_tall(W.to(work))
    g = (G.mT if wide else G).to(work)
    evaluations = 0
    if mode == "paper":
        a, lam, taken, v0 = _paper(manifold, w, g, steps, alpha, tol, sign)
    elif mode == "fast":
        (a, v0), lam, taken = _fast(manifold, w, g, sign, dtype), None, 0
    else:
        schedule = quintic_schedule(msign_method, msign_steps) if dual_form == "gram" else None
        a, lam, taken, v0, evaluations = _improved(manifold, w, g, steps, alpha, tol, sign, dual_init, schedule)
    return DirectionResult((a.mT if wide else a).to(G.dtype), lam, taken, v0, W, manifold, evaluations)


def manifold_direction(W, G, manifold, *, mode: str = "fast", steps=None, alpha=None, tol=None,
                       **kwargs) -> torch.Tensor:
    """The Manifold Muon direction ``A`` (same shape as ``G``); the update is ``W - lr * A``.

    ``A`` has spectral norm <= 1, is tangent to the manifold at ``W`` and satisfies
    ``<G, A> > 0``.  See :func:`solve_direction` for the options and the module
    docstring for the two modes.
    """
    return solve_direction(W, G, manifold, mode=mode, steps=steps, alpha=alpha, tol=tol, **kwargs).direction


def stack_stats(manifold: Manifold, g, a, w, result: DirectionResult | None, compiled_gap=None) -> list[dict]:
    """Health statistics of one stepped stack, one dict per matrix: the alignment of the
    direction ``a`` with the momentum ``g`` as returned and made feasible, the momentum's
    spectral norm, the new weight ``w``'s manifold residual, the solve's tangent violations
    (``result``; None for plain Muon and compiled directions) and ``compiled_gap``."""
    align = alignment(g, a)
    # made feasible (tangent, norm 1): comparable across modes, paper mode's included
    repaired = repaired_alignment(manifold, result.weight, g, a) if result is not None else align
    momentum_norm, residual = spectral_norm(g.float()), manifold.residual(w.float())
    stats = []
    for i in range(len(g)):
        stats.append({"manifold": manifold.name, "alignment": align[i].item(), "momentum_norm": momentum_norm[i].item(),
                      "alignment_repaired": repaired[i].item(), "residual": residual[i].item(),
                      "violation_start": result.violation_start[i].item() if result is not None else 0.0,
                      "violation_end": result.violation_end[i].item() if result is not None else 0.0})
        if compiled_gap is not None:
            stats[-1]["compiled_alignment_gap"] = compiled_gap[i].item()
    return stats
