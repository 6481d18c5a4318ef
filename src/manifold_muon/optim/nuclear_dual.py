"""The dual function of the Manifold Muon direction, in two forms.

For tall ``W`` (``m x n``, ``m >= n``), momentum ``G`` and a symmetric multiplier ``S``
(already projected, ``S = P(S)``), the dual is the nuclear norm ``f(S) = ||X||_*`` of
``X = G + W S``.  With ``A = msign(X)``: ``f(S) = <X, A>`` and ``grad f(S) = P(sym(W^T A))``
(the tangent violation of ``A``).  One msign gives the value, the gradient and the primal
candidate ``A``.

* :class:`MatrixDual` runs the msign on the ``m x n`` matrix ``X`` at every evaluation.
* :class:`GramDual` never forms ``X``.  From ``K = W^T W``, ``C = W^T G`` and ``D = G^T G``
  (three ``m n^2`` products, once) it has ``M = X^T X = D + C^T S + S C + S K S``, runs the
  same quintic iteration on the ``n x n`` side (``A = X Q`` with ``Q`` a polynomial in ``M``,
  :func:`polar_inverse_root`), and gets ``f = tr(M Q)`` and ``W^T A = (C + K S) Q``.  Only
  the final ``A = X Q`` is ``m x n``.  Per evaluation of a 10-step iteration that is about 42
  ``n^3`` products against ``(22 m/n + 10) n^3``: 2.2x fewer flops at ``m = 4n``, more at
  ``m = n``.

  It runs in float64.  ``M`` squares the condition number of ``X``, whose singular values
  near the dual's optimum span 1e3 and more, and float32 cannot resolve them (the float32 Gram
  form falls far short of the dual bound where the matrix form reaches it; TF32 goes NaN).  In
  float64 it matches the matrix form.  So it pays only where float64 matmuls run about as fast
  as IEEE float32 ones (H100 tensor cores), not on CPUs, where float64 runs at half speed
  (``benchmarks/fast_path.py`` times both forms).  Opt-in: ``dual_form="gram"``.
"""
from __future__ import annotations

import torch

from .manifolds import sym

__all__ = ["MatrixDual", "GramDual", "polar_inverse_root", "batch_dot"]


def batch_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-matrix Frobenius inner product, shaped to broadcast against the stack."""
    return (x * y).sum(dim=(-2, -1), keepdim=True)


class MatrixDual:
    """``f``, its gradient and ``A`` from an ``m x n`` msign per evaluation (``sign``)."""

    def __init__(self, manifold, w, g, sign):
        self.manifold, self.w, self.g, self.sign = manifold, w, g, sign
        self.evaluations = 0

    def __call__(self, s):
        """(value, gradient, candidate) at ``s``; here the candidate is ``A`` itself."""
        x = self.g + self.w @ s
        a = self.sign(x).to(x.dtype)
        self.evaluations += 1
        return batch_dot(x, a), self.manifold.project(sym(self.w.mT @ a)), a

    def primal(self, s, candidate):
        return candidate


def polar_inverse_root(m: torch.Tensor, schedule, eps: float = 1e-7) -> torch.Tensor:
    """``Q`` such that ``X Q`` is the quintic iteration's msign of any ``X`` with ``X^T X = m``.

    ``schedule`` is a ``msign.QuinticSchedule``.  Its iteration ``A <- A (a I + b Y + c Y^2)``,
    ``Y = A^T A``, started at ``A = X / s`` with ``s`` from ``||X||_F = sqrt(tr M)`` (as
    :func:`msign.msign` normalises), keeps
    ``A = X Q``, so it runs on ``Q`` alone: ``Q <- Q P``.  ``Y`` is recomputed as
    ``Q^T M Q`` (the iterate's own Gram, as the matrix form recomputes ``A^T A``) rather than
    updated as ``P Y P``, so rounding in ``Q`` does not drift away from ``Y``.
    """
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    frobenius = m.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=0).sqrt()[..., None, None]
    scale = schedule.normaliser(frobenius, eps)
    q = eye / scale
    y = m / scale**2
    steps = schedule.coefficients
    for step, (a, b, c) in enumerate(steps):
        p = c * (y @ y) + b * y + a * eye
        q = q @ p
        if step + 1 < len(steps):
            y = q.mT @ m @ q
    return q


class GramDual:
    """``f``, its gradient and ``A`` from ``n x n`` work only, in float64 (see the module docstring).

    ``schedule`` is the msign's (``msign.quintic_schedule``).  The candidate
    is ``Q``; :meth:`primal` turns the final one into ``A = (G + W S) Q``.  Values and
    gradients come back in ``w``'s dtype, as the L-BFGS works in it."""

    def __init__(self, manifold, w, g, schedule, dtype: torch.dtype = torch.float64):
        self.manifold, self.w, self.g, self.dtype = manifold, w, g, dtype
        self.schedule = schedule
        wd, gd = w.to(dtype), g.to(dtype)
        self.k, self.c, self.d = wd.mT @ wd, wd.mT @ gd, gd.mT @ gd
        self.evaluations = 0

    def __call__(self, s):
        s = s.to(self.dtype)
        ks = self.k @ s
        cts = self.c.mT @ s
        m = self.d + cts + cts.mT + s @ ks
        q = polar_inverse_root(m, self.schedule)
        self.evaluations += 1
        value = batch_dot(m, q.mT)   # tr(M Q) = <X, X Q>
        grad = self.manifold.project(sym((self.c + ks) @ q))
        return value.to(self.w.dtype), grad.to(self.w.dtype), q

    def primal(self, s, candidate):
        x = self.g.to(self.dtype) + self.w.to(self.dtype) @ s.to(self.dtype)
        return (x @ candidate).to(self.w.dtype)
