"""Spectral norms and alignment per matrix of a stack: exact (from the small Gram's
eigenvalues) and estimated (block Lanczos, matmul-only, for fast mode's repair on GPUs)."""
from __future__ import annotations

import torch

from .compiling import compile_constant
from .manifolds import as_tall
from .msign import work_dtype

__all__ = ["alignment", "singular_values", "spectral_norm", "spectral_norm_estimate", "top_ritz_pair"]


def singular_values(a: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Singular values per matrix, ascending, from the eigenvalues of the small Gram: several
    times cheaper than an SVD.  Computed in ``dtype`` (default float32, float64 for float64)."""
    at, _ = as_tall(a)
    work = at.to(dtype or work_dtype(at))
    return torch.linalg.eigvalsh(work.mT @ work).clamp(min=0).sqrt()


_lanczos_starts: dict[tuple, torch.Tensor] = {}


@compile_constant   # a compiled step takes it as a constant, not a generator call
def _lanczos_start(n: int, block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Lanczos's start block: ``block`` fixed orthonormal Gaussian columns (``n x block``), the
    same on every device, made once per size (and so no host-to-device copy per call)."""
    key = (n, block, dtype, device)
    if key not in _lanczos_starts:
        start = torch.randn(n, block, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        _lanczos_starts[key] = torch.linalg.qr(start)[0].to(dtype=dtype, device=device)
    return _lanczos_starts[key]


def _orthonormal_columns(v: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt within a block whose columns are already orthogonal to the basis (so any
    combination of them is too).  A column whose norm is below ``floor`` is rounding noise of
    an invariant Krylov space (e.g. Gram = I) and becomes zero rather than normalised noise."""
    columns = []
    for i in range(v.shape[-1]):
        c = v[..., i:i + 1]
        for q in columns:
            c = c - q * (q * c).sum(-2, keepdim=True)
        norm = c.norm(dim=-2, keepdim=True)
        columns.append(torch.where(norm > floor, c / norm.clamp(min=1e-30), 0.0))
    return torch.cat(columns, dim=-1)


def top_ritz_pair(gram: torch.Tensor, steps: int = 16, block: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest Ritz value of a symmetric PSD stack on a block Krylov space (``block`` fixed
    start vectors, ``steps`` products with ``gram``, dimension at most ``steps * block``) and
    its Ritz vector, per matrix.  The value is a lower bound on the largest eigenvalue."""
    n = gram.shape[-1]
    block = min(block, n)
    k = min(steps * block, n)
    # The basis has all k columns from the start, zero until filled: zero columns change no
    # projection, and fixed shapes (no growing concatenation) are what torch.compile's CPU
    # backend gets right (it miscompiled the concatenating form, torch 2.13).
    place = torch.eye(k, dtype=gram.dtype, device=gram.device)   # place[a:b]: puts b - a columns at a
    start = _lanczos_start(n, block, gram.dtype, gram.device)
    basis = (start @ place[:block]).expand(*gram.shape[:-2], n, k)
    floor = 1e-5 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    for first in range(block, k, block):
        width = min(block, k - first)
        v = gram @ basis[..., first - block:first - block + width]   # the previous block, one product
        for _ in range(2):   # twice, as rounding demands
            v = v - basis @ (basis.mT @ v)
        basis = basis + _orthonormal_columns(v, floor) @ place[first:first + width]
    values, vectors = torch.linalg.eigh(basis.mT @ gram @ basis)
    return values[..., -1], basis @ vectors[..., -1:]


def spectral_norm_estimate(a: torch.Tensor, steps: int = 16, block: int = 2) -> torch.Tensor:
    """``||A||_2`` per matrix, estimated from slightly above, with matmuls only (float32, or float64).

    Why not :func:`spectral_norm`: a batched eigendecomposition of ``n x n`` Grams is slow on
    GPUs (it costs more than a whole training step at GPT-2 small's shapes), and the fast
    mode's repair needs one per matrix per step.  This runs block Lanczos on the small Gram ``M``
    (two fixed start vectors, 16 steps: a Krylov space of dimension 32, whose projected
    ``32 x 32`` eigenproblem is still one batched call on CUDA) and returns
    ``sqrt(theta + ||M y - theta y||)`` for its top Ritz pair ``(theta, y)``.  ``theta`` alone
    is a lower bound; from one start vector it fell up to 2.5e-2 short along fast-mode training
    (a start that barely touches the top eigenvector of a clustered top spectrum).  The
    residual is small once ``theta`` has converged and large when it has not, so adding it
    errs upward.  That is measured, not proved (``benchmarks/norm_estimate.py`` measures how far
    below the true norm it falls, rarely and by well under 1e-3, and above it, a step that
    much shorter; the tests hold fast mode's norm to 1e-3 along training).  Each
    matrix's answer does not depend on its stack.
    """
    at, _ = as_tall(a)
    work = at.to(work_dtype(at))
    gram = work.mT @ work
    theta, y = top_ritz_pair(gram, steps, block)
    residual = (gram @ y - theta[..., None, None] * y).norm(dim=(-2, -1))
    return (theta.clamp(min=0) + residual).sqrt().to(a.dtype)


def alignment(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``<G, A> / ||G||_*`` per matrix (float64): 1 for Muon's unconstrained optimum."""
    nuclear = singular_values(g, torch.float64).sum(-1)
    return (g.double() * a.double()).sum(dim=(-2, -1)) / nuclear.clamp(min=1e-30)


def spectral_norm(a: torch.Tensor) -> torch.Tensor:
    """``||A||_2`` per matrix."""
    return singular_values(a)[..., -1].to(a.dtype)
