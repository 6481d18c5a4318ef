"""What the library's torch.compile'd directions need from the compiler, applied only when
the library first compiles.

A few helpers must be constants to a compiled graph (``torch.compiler.assume_constant_result``):
a fixed start block made with a seeded generator, a per-process hardware probe.  Marking them
at import would import ``torch._dynamo``, a large share of ``import manifold_muon``'s time,
paid by every ``manifold-muon`` command (``--help``, ``report``, ``compare``, ``pack``...).  So they are registered here at import and
marked by :func:`mark_compile_constants`, which the optimizer calls before its first
``torch.compile`` (the ``compile`` group key).  (A process that builds any torch optimizer
loads ``torch._dynamo`` anyway: ``torch.optim.Optimizer.add_param_group`` does, torch 2.13.)
"""
from __future__ import annotations

from functools import cache
from typing import Callable, TypeVar

import torch

__all__ = ["compile_constant", "mark_compile_constants", "compiled_graphs_limit"]

F = TypeVar("F", bound=Callable)
_registered: list[Callable] = []


def compile_constant(fn: F) -> F:
    """Register ``fn`` (a module-level function whose result is fixed per process and
    arguments) to be marked ``assume_constant_result`` before the library first compiles."""
    _registered.append(fn)
    return fn


@cache   # once per process
def mark_compile_constants() -> None:
    """Mark every registered function as a compile-time constant.  torch marks the function
    object in place (2.11 and 2.13 set an attribute and return it), so the modules' names need
    no rebinding."""
    for fn in _registered:
        torch.compiler.assume_constant_result(fn)


@cache
def compiled_graphs_limit() -> dict[str, int]:
    """Each stack shape, manifold and dtype is a graph of its own; a model has a few of each,
    and a bench holds every allocation at once, so torch's default of 8 per function is too
    few.  (torch renamed the setting; older releases call it cache_size_limit.)"""
    config = torch._dynamo.config   # torch imports its compiler on this first use
    return {("recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"): 64}
