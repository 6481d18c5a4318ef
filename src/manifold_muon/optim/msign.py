"""The matrix sign (polar factor) ``msign(X) = U V^T`` for ``X = U S V^T``.

Muon and Manifold Muon spend almost all their time here, so the iterative
methods are plain matmul polynomials that batch over leading dimensions.

Dtype policy
------------
* ``"polar_express"`` and ``"newton_schulz"`` compute in ``dtype``, which
  defaults to **float32** (float64 for float64 input).  bfloat16 is opt-in
  (``dtype=torch.bfloat16``): it is what the paper's reference code and
  ``torch.optim.Muon`` use and it is faster on tensor cores, but rounding the
  input to bf16 erases the directions of singular values below ~2^-8 of the
  largest, so it cannot meet "a few percent of the polar factor" at condition
  numbers near 1e3.  The optimizer uses bf16 for plain Muon and in paper and fast
  mode, float32 for the improved mode's dual solver (``dual.default_msign_dtype``).
* ``"svd"`` is the exact reference; it computes in float32, or in float64 when
  the input is float64.
* bf16 means bf16 values and rounding, not always bf16 arithmetic: on a CPU without bf16
  units (:func:`~manifold_muon.optim.precision.low_precision_compute`) the iteration runs in
  float32 and rounds every product to bf16, as a bf16 matmul does, at float32's speed.
* The result is always returned in the input's dtype.
* float32 means IEEE float32 unless a ``matmul_precision`` is chosen (see
  :mod:`manifold_muon.optim.precision`): a global TF32 (or CPU bf16) setting for float32
  matmuls does not loosen the constraints.

Accuracy (relative Frobenius error against the SVD polar factor, log-spaced
spectra; ``tests/test_msign.py`` asserts these): polar_express in float32 is
within 1% up to condition number 1e3; in bf16 within 3% up to 1e2 and 5-20% at
1e3.  Newton-Schulz's coefficients deliberately do *not* converge to U V^T
(singular values land in roughly [0.7, 1.2]); it mirrors ``torch.optim.Muon``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .precision import low_precision_compute, matmul_eps, rounded_to

__all__ = ["msign", "msign_near_orthogonal", "quintic_schedule", "QuinticSchedule", "MSIGN_METHODS",
           "NEWTON_SCHULZ_COEFFS", "POLAR_EXPRESS_COEFFS"]

# Keller Jordan's quintic (a, b, c): maximal slope at zero, not convergent to 1.
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al., arXiv 2505.16932): the optimal odd quintic for
# each step, for an input spectrum normalised into [~1e-3, 1].  Steps beyond the
# list repeat the last polynomial, which converges to 1.
POLAR_EXPRESS_COEFFS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# The safety factor widens each polynomial's domain to [0, 1.01] so that
# rounding which pushes a singular value slightly above 1 cannot blow up.
# p(x/1.01)*... is implemented by dividing the coefficients: a/s, b/s^3, c/s^5.
# The last polynomial is left as is, as in the reference implementation.
PE_SAFETY = 1.01

MSIGN_METHODS = ("polar_express", "newton_schulz", "svd")
_DEFAULT_STEPS = {"polar_express": 10, "newton_schulz": 5}


def _polar_express_schedule(steps: int, safety: float) -> list[tuple[float, float, float]]:
    stable = [(a / safety, b / safety**3, c / safety**5) for a, b, c in POLAR_EXPRESS_COEFFS[:-1]]
    stable.append(POLAR_EXPRESS_COEFFS[-1])
    return [stable[min(i, len(stable) - 1)] for i in range(steps)]


class QuinticSchedule(NamedTuple):
    """An iterative msign: its ``(a, b, c)`` per step and how its input is normalised."""

    coefficients: list[tuple[float, float, float]]
    safety: float            # the Frobenius norm is multiplied by this (Polar Express: 1.01)
    additive_guard: bool     # divide by ``norm * safety + eps`` (the reference) or ``max(norm, eps)`` (torch's Muon)

    def normaliser(self, frobenius_norm: torch.Tensor, eps: float) -> torch.Tensor:
        """What the input is divided by, each method's guard against a zero input as its source has it."""
        if self.additive_guard:
            return frobenius_norm * self.safety + eps
        return (frobenius_norm * self.safety).clamp(min=eps)


def quintic_schedule(method: str, steps: int | None = None) -> QuinticSchedule:
    """The iteration of an iterative ``method`` with ``steps`` steps (None: its default).
    Shared by :func:`msign` and the Gram-space form of the dual (``nuclear_dual.py``)."""
    if method not in _DEFAULT_STEPS:
        raise ValueError(f"no quintic schedule for msign method {method!r}; valid choices: {', '.join(_DEFAULT_STEPS)}")
    steps = _DEFAULT_STEPS[method] if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"msign steps must be >= 1, got {steps}")
    if method == "polar_express":
        return QuinticSchedule(_polar_express_schedule(steps, PE_SAFETY), PE_SAFETY, additive_guard=True)
    return QuinticSchedule([NEWTON_SCHULZ_COEFFS] * steps, 1.0, additive_guard=False)


def _odd_quintic_iterations(x: torch.Tensor, schedule, round_to: torch.dtype | None = None) -> torch.Tensor:
    """x <- a x + b (x x^T) x + c (x x^T)^2 x, with x wide so x x^T is the small Gram.
    ``round_to``: each product is rounded to that dtype (bf16 emulated in float32)."""
    for a, b, c in schedule:
        gram = rounded_to(x @ x.mT, round_to)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if gram.ndim == 3 else torch.addmm(gram, gram, gram, beta=b, alpha=c)
        poly = rounded_to(poly, round_to)
        x = torch.baddbmm(x, poly, x, beta=a) if x.ndim == 3 else torch.addmm(x, poly, x, beta=a)
        x = rounded_to(x, round_to)
    return x


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision matrix work defaults to: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _svd_polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x.to(work_dtype(x)), full_matrices=False)
    return u @ vh


def msign(
    X: torch.Tensor,
    method: str = "polar_express",
    steps: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Polar factor ``U V^T`` of ``X`` (shape ``(..., m, n)``), batched over leading dims.

    Args:
        X: a matrix or a stack of matrices; tall, wide or square.
        method: ``"polar_express"`` (default: 10 steps, 1.01 safety factor, as the
            paper's reference code), ``"newton_schulz"`` (Muon's quintic, 5 steps)
            or ``"svd"`` (exact).
        steps: iterations for the iterative methods; defaults as above.
        dtype: compute dtype of the iterative methods (default float32, float64 for
            float64 input; see the module docstring).
        eps: guards the Frobenius normalisation of an all-zero input, which maps to zero.
    """
    if X.ndim < 2:
        raise ValueError(f"msign needs a matrix or a stack of matrices, got shape {tuple(X.shape)}")
    if method not in MSIGN_METHODS:
        raise ValueError(f"unknown msign method {method!r}; valid choices: {', '.join(MSIGN_METHODS)}")
    if method == "svd":
        return _svd_polar(X).to(X.dtype)
    schedule = quintic_schedule(method, steps)

    out_dtype = X.dtype
    lead = X.shape[:-2]
    x = X.reshape(-1, *X.shape[-2:]) if X.ndim > 3 else X
    dtype = dtype or work_dtype(X)
    # bf16 on a CPU without bf16 units: bf16 values in float32 arithmetic, each result rounded
    compute = low_precision_compute(dtype, X.device)
    round_to = dtype if compute != dtype else None
    x = x.to(dtype).to(compute)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation so the Gram x x^T is the small one
        x = x.mT
    # Frobenius norm bounds the spectral norm; Polar Express's 1.01 keeps rounding inside the domain.
    norm = rounded_to(x.norm(dim=(-2, -1), keepdim=True), round_to)
    x = rounded_to(x / rounded_to(schedule.normaliser(norm, eps), round_to), round_to)
    x = _odd_quintic_iterations(x.contiguous(), schedule.coefficients, round_to)
    if tall:
        x = x.mT
    return x.reshape(*lead, *x.shape[-2:]).to(out_dtype)


def newton_schulz_steps_needed(deviation: float, tol: float) -> int:
    """Cubic Newton-Schulz steps that take ``max|sigma^2 - 1| <= deviation`` below ``tol``.

    One step maps ``s = sigma^2 = 1 + d`` to ``1 - 3/4 d^2 + 1/4 d^3``, so the bound
    ``d <- 3/4 d^2 + 1/4 d^3`` holds per step (quadratic convergence: 1e-2 -> 8e-5 -> 5e-9)."""
    steps = 0
    while deviation > tol:
        deviation = 0.75 * deviation**2 + 0.25 * deviation**3
        steps += 1
    return steps


def msign_near_orthogonal(X: torch.Tensor, *, dtype: torch.dtype | None = None,
                          max_deviation: float = 0.25) -> torch.Tensor:
    """Polar factor of matrices whose singular values are already close to 1.

    This is the retraction's case: a point on Stiefel moved by ``lr * A`` with ``A`` tangent
    has ``X^T X = I + lr^2 A^T A``.  Polar Express must first divide by the Frobenius norm
    (which puts every singular value near ``1/sqrt(n)``) and then spends 10 quintic steps
    climbing back; cubic Newton-Schulz ``X <- X - X (X^T X - I) / 2`` without that
    normalisation converges quadratically from where X already is, usually in 1-2 steps
    of two ``m n^2`` products each (Polar Express: 10 steps of two plus an ``n^3``).

    The Gram's deviation ``||X^T X - I||_F`` (which bounds every ``|sigma^2 - 1|``) sets the
    number of steps, to reach ``4 eps`` of the compute dtype (of TF32 where a GPU is told to
    use it: steps past that would refine rounding noise).  If any matrix of the stack
    deviates by more than ``max_deviation`` (e.g. an AdamW step wrapped by a retraction),
    the whole stack takes Polar Express instead.  Reading the deviation is one host sync.
    """
    if X.ndim < 2:
        raise ValueError(f"msign needs a matrix or a stack of matrices, got shape {tuple(X.shape)}")
    dtype = dtype or work_dtype(X)
    wide = X.shape[-2] < X.shape[-1]
    x = (X.mT if wide else X).to(dtype)  # tall, so the Gram X^T X is the small side
    eye = torch.eye(x.shape[-1], dtype=dtype, device=x.device)
    excess = x.mT @ x - eye
    deviation = float(excess.norm(dim=(-2, -1)).max()) if excess.numel() else 0.0
    if not deviation <= max_deviation:  # also catches NaN
        return msign(X, "polar_express", dtype=dtype)
    for step in range(newton_schulz_steps_needed(deviation, 4 * matmul_eps(dtype, x.device))):
        if step:
            excess = x.mT @ x - eye
        x = x - 0.5 * (x @ excess)
    return (x.mT if wide else x).to(X.dtype)
