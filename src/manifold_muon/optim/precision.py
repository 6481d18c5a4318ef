"""How precise the optimizer's float32 matmuls are, whatever the caller set globally.

Many training scripts lower float32 matmuls for speed with
``torch.set_float32_matmul_precision``: ``"high"`` runs them in TF32 on GPUs, ``"medium"``
also in bf16 on CPUs with bf16 units.  The constraints need more than that by default: the
retraction's Newton-Schulz, the tangent projections and the norm estimate are float32 work.
Under ``"medium"`` on a CPU with bf16 units the manifold residual after 20 steps was 8e-5
instead of 1e-8, and the fast direction's tangent violation 1e-3 instead of 4e-7.

So the optimizer and the library's public solver and manifold functions run their float32
matmuls at ``"highest"`` (IEEE) unless told otherwise: a param group's ``matmul_precision``
(the optimizer enters :func:`float32_matmul_precision` for it) or an enclosing
``with float32_matmul_precision(level)`` block.  Lowering it is a speed lever for GPUs,
where an IEEE float32 product costs several TF32 ones; its price is constraint accuracy
(the speed page of the docs quotes it).  Deliberately
low-precision work (the bf16 msign) is bf16 by dtype and unaffected by any of this.

bf16 work on a CPU without bf16 units (:func:`low_precision_compute`) is bf16 values in
float32 arithmetic: there a bf16 matmul falls back to a scalar kernel many times slower than
the float32 product with its result rounded to bf16, which computes the same values up to the
order of the float32 sums (``benchmarks/bf16_emulation.py`` times both).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

from .compiling import compile_constant

__all__ = ["MATMUL_PRECISIONS", "float32_matmul_precision", "library_matmul_precision", "matmul_eps",
           "low_precision_compute", "native_bf16_matmul", "rounded_to"]

MATMUL_PRECISIONS = ("highest", "high", "medium")   # torch.set_float32_matmul_precision's levels

# The backends whose float32 matmuls the setting lowers, with their per-backend attributes
# (torch >= 2.9): cuBLAS (TF32) and oneDNN on CPUs (TF32 or bf16).
_BACKENDS = ("cuda", "mkldnn")
# The level an enclosing float32_matmul_precision block chose; None outside any block.
_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("manifold_muon_matmul_precision", default=None)


@contextlib.contextmanager
def float32_matmul_precision(level: str = "highest"):
    """Run float32 matmuls at ``level`` inside the block, then put the caller's settings back.

    torch keeps a legacy setting and per-backend ones and refuses to run a cuBLAS float32
    matmul when the two disagree (its ``allowTF32CuBLAS`` check).  So the level is set
    through the legacy setter, which sets both consistently, and the exit restores the
    legacy value and then each backend's own.  A caller whose settings already disagree
    (torch cannot read the legacy value) gets the backends restored and the legacy value
    left at ``level``.
    """
    if level not in MATMUL_PRECISIONS:
        raise ValueError(f"unknown float32 matmul precision {level!r}; valid choices: {', '.join(MATMUL_PRECISIONS)}")
    matmul = [getattr(torch.backends, name).matmul for name in _BACKENDS]
    saved = [backend.fp32_precision for backend in matmul]
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller mixed the legacy and per-backend settings
        legacy = None
    token = _chosen.set(level)
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        _chosen.reset(token)
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for backend, value in zip(matmul, saved):
            backend.fp32_precision = value


@contextlib.contextmanager
def library_matmul_precision():
    """The library's public functions use this (as a decorator, ``@library_matmul_precision()``):
    IEEE float32 matmuls, or the level of an enclosing :func:`float32_matmul_precision` block.
    The choice is read at each call, not when the function is defined."""
    # Inside a block, whose level is already set, there is nothing to do.  Nor can there be
    # inside a compiled region, which cannot change global settings: the settings of its caller
    # hold there (the optimizer sets the group's level around its compiled direction).
    if torch.compiler.is_compiling() or _chosen.get() is not None:
        yield
        return
    with float32_matmul_precision("highest"):
        yield


def matmul_eps(dtype: torch.dtype, device: torch.device) -> float:
    """Machine epsilon of a ``dtype`` matmul on ``device`` under the current settings: the
    target of an iteration that refines to rounding.  TF32 (10 mantissa bits) on a GPU told to
    use it; otherwise the dtype's own.  (A CPU told to use bf16 may or may not have the units
    for it, so there the target stays float32's: at worst a wasted step.)"""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.fp32_precision == "tf32":
        return 2.0**-10
    return torch.finfo(dtype).eps


@compile_constant   # fixed per process: a compiled step reads it once, when tracing
def native_bf16_matmul(device_type: str) -> bool:
    """Whether bf16 matmuls on ``device_type`` run on bf16-capable units.  GPUs: yes.  CPUs:
    what oneDNN reports (AVX-512 or Arm's bf16 instructions); elsewhere torch falls back to a
    scalar bf16 kernel.  Environment variable ``MANIFOLD_MUON_BF16=native|emulated``
    overrides the answer (read once per process), e.g. to compare the two paths."""
    return _probe_bf16_units(device_type)


@functools.cache
def _probe_bf16_units(device_type: str) -> bool:
    forced = os.environ.get("MANIFOLD_MUON_BF16", "")
    if forced:
        if forced not in ("native", "emulated"):
            raise ValueError(f"MANIFOLD_MUON_BF16={forced!r}; valid choices: native, emulated")
        return forced == "native"
    if device_type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def low_precision_compute(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype in which to do matmul work meant for ``dtype`` on ``device``: ``dtype`` itself,
    except bf16 where the device has no bf16 units (:func:`native_bf16_matmul`), which gets
    float32.  A caller that keeps bf16's semantics there holds bf16 values in float32 and
    rounds each product back with :func:`rounded_to`, which is what a bf16 matmul computes
    (products of bf16 numbers are exact in float32, sums accumulate in float32, the result is
    rounded once) up to the order of the sums."""
    if dtype == torch.bfloat16 and not native_bf16_matmul(device.type):
        return torch.float32
    return dtype


def rounded_to(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and kept in its own dtype (``None``: ``x`` as it is)."""
    return x if dtype is None or dtype == x.dtype else x.to(dtype).to(x.dtype)
