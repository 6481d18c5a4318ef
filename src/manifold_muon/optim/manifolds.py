"""Matrix manifolds ``{W : P(W^T W) = P(I)}`` and the spectral-norm ball.

Each manifold is a small frozen object with pure methods.  Conventions:

* Matrices are handled *tall* (``m >= n``); every public method accepts wide
  matrices and stacks ``(..., m, n)`` and transposes internally (the paper's
  convention), so callers never have to.
* ``P`` is a self-adjoint projector on symmetric ``n x n`` matrices:
  identity (Stiefel), ``Off`` (DGram: zero the diagonal), ``Diag`` (Oblique).
  The tangent space at ``W`` is ``{A : P(W^T A + A^T W) = 0}`` and the normal
  space is ``{W S : S symmetric, S = P(S)}``.
* ``residual`` is scale-free, so one tolerance serves every manifold: the RMS,
  over the entries ``P`` selects, of the Gram violation after normalising the
  Gram by the column norms where the manifold leaves them free (DGram).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .msign import msign, msign_near_orthogonal, work_dtype
from .precision import library_matmul_precision

__all__ = ["Manifold", "DGram", "get_manifold", "register_manifold", "MANIFOLDS", "as_tall", "gram_diag_solve", "sym"]


def sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.mT)


def as_tall(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Return ``x`` transposed if wide (paper convention), and whether it was."""
    wide = x.shape[-2] < x.shape[-1]
    return (x.mT if wide else x), wide


def _untall(x: torch.Tensor, wide: bool) -> torch.Tensor:
    return x.mT if wide else x


def _eye_like(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def gram_diag_solve(rhs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Solve ``K S + S K = rhs`` for ``K = diag(k)``: ``S_ij = rhs_ij / (k_i + k_j)``.

    On every manifold here the Gram ``W^T W`` is diagonal, which makes the
    normal-space component of a matrix this closed-form divide.
    """
    denom = k.unsqueeze(-1) + k.unsqueeze(-2)
    return rhs / denom.clamp(min=torch.finfo(rhs.dtype).tiny)


@dataclass(frozen=True)
class Manifold:
    """Base: no constraint.  Subclasses override ``project`` and ``_retract_tall``."""

    name: str = "none"
    #: True where the dual-ascent direction solver applies (P is not zero).
    has_dual: bool = False
    #: True where a square matrix makes the direction problem degenerate: every msign output
    #: is orthogonal and none is tangent (DGram), so no multiplier solves it.
    degenerate_when_square: bool = False

    # ---- projector on symmetric n x n matrices -------------------------------------------
    def project(self, s: torch.Tensor) -> torch.Tensor:
        """The self-adjoint projector P."""
        return torch.zeros_like(s)

    # ---- tangent space -----------------------------------------------------------------
    @library_matmul_precision()
    def tangent_violation(self, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``RMS(P(sym(W^T A)))`` per matrix: 0 exactly when A is tangent at W."""
        wt, wide = as_tall(w)
        at = _untall(a, wide)
        h = self.project(sym(wt.mT @ at))
        return h.pow(2).mean(dim=(-2, -1)).sqrt()

    def normal_coefficients(self, w: torch.Tensor, g: torch.Tensor, *, projected: torch.Tensor | None = None
                            ) -> torch.Tensor:
        """Tall ``W, G`` -> symmetric ``S = P(S)`` with ``G - W S`` tangent (exact on the manifold).

        ``projected``: ``P(W^T G + G^T W)`` when the caller already has it (it is the costly part)."""
        k = w.pow(2).sum(dim=-2)
        return gram_diag_solve(self.project(wt_g_sym2(w, g)) if projected is None else projected, k)

    @library_matmul_precision()
    def tangent_project(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Orthogonal (Frobenius) projection of G onto the tangent space at W."""
        if not self.has_dual:
            return g
        wt, wide = as_tall(w)
        gt = _untall(g, wide)
        return _untall(gt - wt @ self.normal_coefficients(wt, gt), wide)

    # ---- retraction, init, residual ----------------------------------------------------------
    @library_matmul_precision()
    def retract(self, w: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
        """Map a point near the manifold onto it (identity on points already there).

        ``exact=True`` uses SVDs instead of matmul iterations: slower, but safe for
        arbitrary, badly conditioned inputs (it is what ``init`` uses)."""
        wt, wide = as_tall(w)
        return _untall(self._retract_tall(wt, exact), wide)

    def _retract_tall(self, w: torch.Tensor, exact: bool) -> torch.Tensor:
        return w

    def init(self, w: torch.Tensor) -> torch.Tensor:
        """Project an arbitrary initialisation onto the manifold (computed in float32 or better)."""
        work = w.to(work_dtype(w))
        # an unbounded step takes any decay toward a bound all the way: training starts within it
        return self.decay_toward_bound(self.retract(work, exact=True), math.inf).to(w.dtype)

    def residual(self, w: torch.Tensor) -> torch.Tensor:
        """Scale-free distance from the manifold, per matrix (0 on it)."""
        return torch.zeros(w.shape[:-2], dtype=w.dtype, device=w.device)

    def decay_toward_bound(self, w: torch.Tensor, lr: float) -> torch.Tensor:
        """Scale control applied once per optimizer step, after the retraction, with the step's
        learning rate (``init`` passes ``inf``).  The identity except on a DGram with a decayed cap."""
        return w


def wt_g_sym2(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``W^T G + G^T W`` for tall W, G."""
    c = w.mT @ g
    return c + c.mT


def _polar(w: torch.Tensor, exact: bool) -> torch.Tensor:
    """Polar factor for retractions: SVD when ``exact`` (init); else, in float32 (float64 for
    float64 input), the few Newton-Schulz steps a point next to the manifold needs
    (``msign_near_orthogonal``; Polar Express for points further away).  Matmul-only."""
    if exact:
        return msign(w, "svd")
    return msign_near_orthogonal(w)


@dataclass(frozen=True)
class Stiefel(Manifold):
    """``W^T W = I``: every singular value is 1.  Retraction: the polar factor."""

    name: str = "stiefel"
    has_dual: bool = True

    def project(self, s):
        return s

    def _retract_tall(self, w, exact):
        return _polar(w, exact).to(w.dtype)

    @library_matmul_precision()  # a 1e-8 residual must not read as TF32's 1e-4
    def residual(self, w):
        wt, _ = as_tall(w)
        gram = wt.mT @ wt
        return (gram - _eye_like(gram.shape[-1], gram)).pow(2).mean(dim=(-2, -1)).sqrt()


@dataclass(frozen=True)
class DGram(Manifold):
    """``Off(W^T W) = 0``: orthogonal columns of free norms (singular values = column norms).

    ``retraction="polar_colnorm"`` (default) is ``msign(W D^-1) D`` with ``D = colnorms(W)``:
    no SVD, and exactly the identity on DGram points (their columns are orthogonal, so
    ``W D^-1`` is its own polar factor).  Normalising the columns first matters for speed:
    near the manifold ``W D^-1`` has every singular value near 1, which
    ``msign_near_orthogonal`` finishes in a step or two, while ``W``'s own singular values
    (the column norms) spread over decades.
    ``retraction="svd"`` is the paper's ``U V^T diag(S)``; it assigns the j-th largest
    singular value to the j-th column, so it permutes column norms that are not sorted.

    ``cap`` (scale control, beyond the paper): after each retraction, columns longer than
    ``cap`` are shortened to it.  On DGram the singular values *are* the column norms, so
    this bounds ``sigma_max(W) <= cap`` while leaving columns free to shrink; the direction
    is DGram's (the cap acts as a projection, as weight clipping would).  ``cap=1`` is the
    Stiefel scale; ``cap=2`` lets a query-key product reach 4x the logits Stiefel allows.

    ``cap_decay`` (a soft cap): instead of clipping, each optimizer step multiplies the part
    of a column's norm above ``cap`` by ``1 - lr * cap_decay`` (``decay_toward_bound``):
    decoupled weight decay whose target is the cap instead of 0.  A column may then pass the
    cap while the gradient keeps pushing it and is drawn back when the push stops; if one step
    lengthens a column by at most ``lr`` (a direction of spectral norm 1), its overshoot
    settles below ``(1 - lr d) / d`` for ``d = cap_decay``, whatever the rate: about ``1 / d``.
    The set is then DGram itself (``residual`` ignores the overshoot); ``init`` still clips,
    so training starts within the cap.  ``cap=1, cap_decay=0.1`` matches the paper's weight decay.
    """

    name: str = "dgram"
    has_dual: bool = True
    degenerate_when_square: bool = True
    retraction: str = "polar_colnorm"
    cap: float | None = None
    cap_decay: float | None = None

    def __post_init__(self):
        if self.retraction not in ("polar_colnorm", "svd"):
            raise ValueError(f"unknown DGram retraction {self.retraction!r}; valid choices: polar_colnorm, svd")
        if self.cap is not None and not self.cap > 0:
            raise ValueError(f"DGram cap must be a positive column norm (or None for no cap), got {self.cap!r}")
        if self.cap_decay is not None and not (self.cap is not None and self.cap_decay > 0):
            raise ValueError(f"DGram cap_decay must be a positive rate with a cap to decay toward, got "
                             f"cap_decay={self.cap_decay!r}, cap={self.cap!r}; valid: cap > 0 and cap_decay > 0, "
                             "or cap_decay=None for a hard cap")

    def project(self, s):
        return s * (1 - _eye_like(s.shape[-1], s))

    def _retract_tall(self, w, exact):
        if self.retraction == "svd":
            work = w.to(work_dtype(w))
            u, s, vh = torch.linalg.svd(work, full_matrices=False)
            return self._clip_columns((u @ vh) * s.unsqueeze(-2)).to(w.dtype)
        norms = w.norm(dim=-2, keepdim=True)
        unit = w / norms.clamp(min=torch.finfo(w.dtype).tiny)
        return self._clip_columns(_polar(unit, exact) * norms).to(w.dtype)

    def _clip_columns(self, w: torch.Tensor) -> torch.Tensor:
        # the hard cap only: a soft one acts in decay_toward_bound
        if self.cap is None or self.cap_decay is not None:
            return w
        norms = w.norm(dim=-2, keepdim=True)
        return w * (self.cap / norms.clamp(min=self.cap))

    def decay_toward_bound(self, w, lr):
        if self.cap_decay is None:
            return w
        wt, wide = as_tall(w)
        norms = wt.norm(dim=-2, keepdim=True)
        over = (norms - self.cap).clamp(min=0)
        shrunk = norms - over * min(lr * self.cap_decay, 1.0)   # never past the cap
        return _untall(wt * (shrunk / norms.clamp(min=torch.finfo(w.dtype).tiny)), wide)

    @library_matmul_precision()  # a 1e-8 residual must not read as TF32's 1e-4
    def residual(self, w):
        wt, _ = as_tall(w)
        gram = wt.mT @ wt
        diag = gram.diagonal(dim1=-2, dim2=-1)
        d = diag.clamp(min=torch.finfo(w.dtype).tiny).rsqrt()
        cosines = gram * d.unsqueeze(-1) * d.unsqueeze(-2)
        off = self.project(cosines).pow(2).mean(dim=(-2, -1))
        if self.cap is None or self.cap_decay is not None:
            return off.sqrt()
        excess = (diag.sqrt() / self.cap - 1).clamp(min=0)  # relative overshoot of the cap
        return (off + excess.pow(2).mean(dim=-1)).sqrt()


@dataclass(frozen=True)
class Oblique(Manifold):
    """``diag(W^T W) = 1``: unit-norm columns.  Retraction: normalise columns."""

    name: str = "oblique"
    has_dual: bool = True

    def project(self, s):
        return torch.diag_embed(s.diagonal(dim1=-2, dim2=-1))

    def _retract_tall(self, w, exact):
        return w / w.norm(dim=-2, keepdim=True).clamp(min=1e-12)

    def residual(self, w):
        wt, _ = as_tall(w)
        return (wt.pow(2).sum(dim=-2) - 1).pow(2).mean(dim=-1).sqrt()


@dataclass(frozen=True)
class SpectralBall(Manifold):
    """``sigma_max(W) <= 1``: a convex set, not a manifold; its interior has every direction
    as tangent, so the direction is plain Muon and the retraction clips singular values."""

    name: str = "spectral"

    def _retract_tall(self, w, exact):
        work = w.to(work_dtype(w))
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        return ((u * s.clamp(max=1.0).unsqueeze(-2)) @ vh).to(w.dtype)

    def residual(self, w):
        work = w.to(work_dtype(w))
        return (torch.linalg.matrix_norm(work, ord=2) - 1).clamp(min=0).to(w.dtype)


MANIFOLDS = {
    "none": Manifold(),
    "stiefel": Stiefel(),
    "dgram": DGram(),
    "dgram-svd": DGram(name="dgram-svd", retraction="svd"),
    "oblique": Oblique(),
    "spectral": SpectralBall(),
}


def register_manifold(manifold: Manifold) -> Manifold:
    """Make a configured manifold nameable in rules and param groups, e.g.
    ``register_manifold(DGram(name="dgram-cap4", cap=4.0))``.  Groups hold names, not objects,
    so optimizer state dicts stay plain data (``torch.load(weights_only=True)`` reads them)."""
    if not isinstance(manifold, Manifold):
        raise TypeError(f"register_manifold needs a Manifold instance, got {type(manifold).__name__}")
    known = MANIFOLDS.get(manifold.name)
    if known is not None and known != manifold:
        raise ValueError(f"manifold name {manifold.name!r} is taken by {known!r}; choose another name")
    MANIFOLDS[manifold.name] = manifold
    return manifold


def get_manifold(name: str | Manifold) -> Manifold:
    """Look a manifold up by name: ``none, stiefel, dgram, dgram-svd, oblique, spectral``, or one
    added with :func:`register_manifold`."""
    if isinstance(name, Manifold):
        return name
    try:
        return MANIFOLDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown manifold {name!r}; valid choices: {', '.join(MANIFOLDS)}") from None
