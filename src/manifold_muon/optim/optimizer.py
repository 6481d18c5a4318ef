"""``ManifoldMuon``: one optimizer object for the whole model.

Each param group is plain data (strings and numbers only, so ``state_dict`` loads
under ``torch.load(weights_only=True)``); its options, their types and defaults are
:class:`~manifold_muon.optim.options.GroupOptions`, and every group is validated there when it is
added: an unknown key, a bad value or an unsupported parameter (complex, integer) is refused with
a message naming it and the valid choices.  Groups may carry what ``resolve`` adds (``names``,
``rule``) and what torch's schedulers add.

Muon momentum is the reference code's *sum* form::

    buf <- beta * buf + g ;   G = g + beta * buf      (Nesterov)

``torch.optim.Muon`` keeps an EMA instead (``buf <- beta buf + (1 - beta) g`` and
``G = g + beta (buf - g)``), which is exactly ``(1 - beta)`` times ours.  msign is
scale-invariant, so the two produce the same update up to rounding; only the
momentum buffers in their states differ by that factor.

Manifold groups take ``A = manifold_direction(W, G)``, then ``W <- retract(W - lr A)``
(the retraction last, then ``decay_toward_bound(W, lr)``, the identity except for a soft
cap); their weight decay defaults to 0 in the presets.  An ``"adamw"`` group with a manifold
takes torch's AdamW step and then retracts: the seed plan's "wrap any optimizer".

Weights start on their manifold: the constructor, and ``add_param_group`` after it (a layer
unfrozen later), project every managed parameter onto its manifold with ``Manifold.init`` (an
exact, SVD-based projection) under ``torch.no_grad``.  A weight already on its manifold to
rounding is left bit for bit as it is, so building a fresh optimizer over a resumed model and
loading its state dict continues exactly like the uninterrupted run.

A step applies whole or not at all: gradients are checked for non-finite values before any
group or buffer is touched.  ``nonfinite="skip"`` (the default) skips such a step with a
``RuntimeWarning`` naming the parameters; ``"raise"`` raises instead.  (``torch.amp.GradScaler``
skips overflowed steps before calling the optimizer, so it never reaches this check.)

Schedulers that cycle momentum (``OneCycleLR``, ``CyclicLR`` with ``cycle_momentum=True``) see
``betas`` in the defaults and cycle ``betas[0]`` of every group: AdamW groups follow it; Muon
groups read ``momentum``, which such a scheduler leaves fixed.

The optimizer never writes to ``p.grad``.

Under torch.distributed the ranks of ``process_group`` (default: every rank) share Muon's
matrix work (:mod:`~manifold_muon.optim.distributed`), which assumes they hold the same
gradients, as data parallelism makes them; the first step checks that they do.

Health statistics: set ``opt.collect_stats = True`` before a step and ``opt.stats`` holds,
per Muon-managed matrix (keyed by its name when the group has ``names``), the tangent
violation of the warm start and of the final direction, the alignment
``<G, A> / ||G||_*`` as returned and made feasible (``dual.repaired_alignment``), the
momentum's spectral norm and the manifold residual after the step, and for a group that
compiles (``compile``), ``compiled_alignment_gap``: the alignment of its compiled direction minus
that of the eager one the statistics step solved, so a miscompiled graph shows in training logs.
It costs a few small eigendecompositions, so collect it every N steps, not every step.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch.optim.adam import adam as _torch_adam

from .compiling import compiled_graphs_limit, mark_compile_constants
from .distributed import (check_ranks_share, from_owners, gather_slices, owned_indices, scatters,
                          to_owners, whole, whole_stack, world)
from .dual import DirectionResult, alignment, default_msign_dtype, solve_direction, stack_stats
from .layout import oriented, stored, write_matrices, write_oriented
from .manifolds import get_manifold
from .msign import msign
from .nonfinite import nonfinite_parameters
from .options import (ALGORITHMS, DEFAULTS, FLATTENED_WEIGHT_HINT, MSIGN_DTYPES, NONFINITE, GroupOptions,
                      check_group_keys, effective, validate_group)
from .precision import float32_matmul_precision

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ManifoldMuon", "GroupOptions", "ALGORITHMS", "MSIGN_DTYPES", "DEFAULTS", "effective",
           "FLATTENED_WEIGHT_HINT"]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _lr_scale(adjust: str | None, shape: torch.Size) -> float:
    rows, cols = shape[-2], shape[-1]
    if adjust == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def stack_direction(w, g, manifold, mode: str, msign_method: str, msign_steps, dtype) -> torch.Tensor:
    """Plain Muon's direction ``msign(G)``, or the direction ``mode`` solves for on ``manifold``,
    for one stack of same-shape matrices.  Pure: it is what a group's ``compile`` compiles."""
    if manifold.has_dual:
        return solve_direction(w, g, manifold, mode=mode, msign_method=msign_method, msign_steps=msign_steps,
                               dtype=dtype).direction
    return msign(g, msign_method, msign_steps, dtype=dtype)


@cache
def _compiled_stack_direction():
    mark_compile_constants()
    return torch.compile(stack_direction, dynamic=False)   # static shapes: each stack its own kernels


def _compiles(group, manifold) -> bool:
    """Whether the group's direction goes through torch.compile: asked for, and free of the
    solvers' data-dependent stops (plain Muon, fast mode)."""
    return bool(group["compile"]) and (not manifold.has_dual or group["mode"] == "fast")


def _msign_dtype(group) -> torch.dtype:
    if group["msign_dtype"] is not None:
        return _DTYPES[group["msign_dtype"]]
    return default_msign_dtype(group["mode"], has_dual=get_manifold(group["manifold"]).has_dual)


def _on_manifold(manifold, w: torch.Tensor) -> bool:
    """Whether ``w`` is on the manifold to rounding (its scale-free residual within a few dozen
    ulps of its dtype): projecting it again would only move it by rounding."""
    tol = min(64 * torch.finfo(w.dtype).eps, 1e-2)
    return bool((manifold.residual(w.float()) <= tol).all())


@dataclass
class _Stack:
    """One batch of same-shape Muon matrices as a step sees it: the parameters, the indices of
    the stack this rank solves, their weights ``w`` and momenta ``g`` as ``(out, in)`` matrices,
    and whether the weights are FSDP2 shards that travel by all_to_all."""

    params: list
    mine: list
    w: torch.Tensor
    g: torch.Tensor
    scattered: bool


class ManifoldMuon(torch.optim.Optimizer):
    """Muon, Manifold Muon and AdamW, chosen per param group (see the module docstring).

    Args:
        params: parameters or param groups, e.g. ``resolve(model, "hetero")``.
        project_init: project managed weights onto their manifolds when their group is added
            (weights already there are left as they are).
        process_group: the ranks that share the matrix work (default: every rank).  It cannot
            be pickled: a deepcopied or unpickled optimizer uses the default group.
        nonfinite: what a step with a non-finite gradient does: ``"skip"`` (warn, change
            nothing) or ``"raise"``.
        **options: defaults for every group; see :class:`~manifold_muon.optim.options.GroupOptions`.
    """

    def __init__(self, params: Iterable, *, project_init: bool = True, process_group: ProcessGroup | None = None,
                 nonfinite: str = "skip", **options: Any):
        check_group_keys(options)
        if nonfinite not in NONFINITE:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; valid choices: {', '.join(NONFINITE)}")
        self.project_init = project_init   # read by add_param_group, which torch's constructor calls
        self.process_group = process_group   # the ranks that share the matrix work; None: every rank
        self.nonfinite = nonfinite
        self._init_runtime()
        super().__init__(params, {**DEFAULTS, **options})  # each group passes through add_param_group

    def _init_runtime(self):
        """What a step keeps between calls but a copy need not carry."""
        self._ranks_checked = False
        self.collect_stats = False
        self.stats: dict[str, dict] = {}
        self.compile_error: str | None = None   # why compiling failed, after which every group runs eager

    # ---- the torch.optim contract: copies, pickles, state dicts ----------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state.update(project_init=self.project_init, nonfinite=self.nonfinite, collect_stats=self.collect_stats,
                     compile_error=self.compile_error)
        return state   # process_group: a live communicator, never pickled

    def __setstate__(self, state):
        options = {key: state.pop(key) for key in ("project_init", "nonfinite", "collect_stats", "compile_error")
                   if key in state}
        super().__setstate__(state)
        self._init_runtime()
        self.process_group = None
        self.__dict__.update(options)

    def load_state_dict(self, state_dict):
        """torch's, then each group's missing options get their defaults (a checkpoint saved
        before an option existed) and AdamW step counters saved as numbers become tensors."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in DEFAULTS.items():
                group.setdefault(key, value)
        for state in self.state.values():
            if "step" in state and not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]))

    def add_param_group(self, param_group):
        """Validate the group whole (defaults filled in) before it joins: a refused group
        leaves the optimizer as it was.  Then project its weights onto their manifold."""
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        for key in ("lr", "weight_decay"):
            group[key] = effective(group, key)
        validate_group(group)
        super().add_param_group(group)
        if self.project_init:
            self._project_group(self.param_groups[-1])

    def project_to_manifolds(self):
        """Put every manifold-managed parameter on its manifold (exact projection)."""
        for group in self.param_groups:
            self._project_group(group)

    @staticmethod
    @torch.no_grad()
    def _project_group(group):
        manifold = get_manifold(group["manifold"])
        if manifold.name == "none":
            return
        for p in group["params"]:
            w = oriented(whole(p), group)
            if p.numel() and not _on_manifold(manifold, w):
                write_oriented(p, manifold.init(w), group)

    # ---- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        self.stats = {}
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._ranks_checked:
            check_ranks_share(self._named_params(("muon",)), self.process_group)
            self._ranks_checked = True
        if not self._gradients_finite():
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.numel()]
            if params:
                # the group's own float32 matmul precision, whatever the caller set globally
                with float32_matmul_precision(group["matmul_precision"]):
                    (self._adamw if group["algorithm"] == "adamw" else self._muon)(group, params)
        return loss

    def _named_params(self, algorithms=ALGORITHMS) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of every parameter of the groups with these algorithms."""
        named = []
        for i, group in enumerate(self.param_groups):
            if group["algorithm"] in algorithms:
                names = group.get("names") or [f"parameter {j} of group {i}" for j in range(len(group["params"]))]
                named += zip(names, group["params"])
        return named

    def _gradients_finite(self) -> bool:
        """Whether every gradient is finite (one check over all of them, across the ranks);
        if not, warn or raise (``nonfinite``) naming the parameters."""
        bad = nonfinite_parameters(self._named_params(), self.process_group)
        if not bad:
            return True
        listed = ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else "")
        message = f"non-finite gradient in {len(bad)} parameter(s): {listed}"
        if self.nonfinite == "raise":
            raise FloatingPointError(f"ManifoldMuon: {message}; no parameter or buffer was changed")
        warnings.warn(f"ManifoldMuon skipped this step whole: {message}", RuntimeWarning, stacklevel=3)
        return False

    # ---- AdamW: torch's own functional implementation --------------------------------------------
    def _adamw(self, group, params):
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _torch_adam(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, decoupled_weight_decay=True,
                    amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        manifold = get_manifold(group["manifold"])
        if manifold.name != "none":  # "wrap any optimizer": AdamW step, then retract
            for p in params:
                w = oriented(whole(p), group)
                write_oriented(p, manifold.decay_toward_bound(manifold.retract(w), group["lr"]), group)

    # ---- Muon and Manifold Muon: load, direction, apply, store -------------------------------------
    def _muon(self, group, params):
        manifold = get_manifold(group["manifold"])
        by_shape = defaultdict(list)  # same-shape matrices go through one solve
        for p in params:
            by_shape[(tuple(p.shape), p.dtype, p.device)].append(p)
        for batch in by_shape.values():
            stack = self._load(group, batch)
            a, result = self._direction(group, manifold, stack)
            gap = self._compiled_gap(group, manifold, stack, a) if self.collect_stats else None
            w = self._apply(group, manifold, stack, a)
            if self.collect_stats:  # before the gather: each rank reports the matrices it solved
                self._record_stats(group, [batch[i] for i in stack.mine], manifold, stack.g, a, w, result, gap)
            self._store(group, stack, w, result)

    def _momentum_directions(self, group, batch) -> list[torch.Tensor]:
        """Update the batch's momentum buffers and return each matrix's ``G``.  One foreach
        operation per line for the whole batch: on a GPU a launch or two, not one per matrix."""
        bufs = []
        for p in batch:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in batch]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        if not group["nesterov"]:
            return bufs   # the caller stacks them: a copy
        return torch._foreach_add(torch._foreach_mul(bufs, group["momentum"]), grads)

    def _load(self, group, batch) -> _Stack:
        """Every rank updates every momentum buffer (gradients are identical after DDP; under
        FSDP2 each rank its rows), then takes the weights and momenta of its slice of the stack."""
        rank, world_size = world(self.process_group)
        k = len(batch)
        mine = owned_indices(k, rank, world_size)
        directions = self._momentum_directions(group, batch)
        scattered = scatters(batch, self.process_group)
        if scattered:   # FSDP2: one all_to_all brings this rank the momenta and weights of its slice
            g, w = (torch.stack([oriented(x, group) for x in field])
                    for field in to_owners([directions, batch], rank, world_size))
        else:   # replicated (DDP): whole already; another DTensor layout: gathered whole, one collective
            wholes = whole_stack([*directions, *batch])
            g = torch.stack([oriented(wholes[i], group) for i in mine])
            w = torch.stack([oriented(wholes[k + i], group) for i in mine])
        return _Stack(batch, mine, w, g, scattered)

    def _direction(self, group, manifold, stack: _Stack) -> tuple[torch.Tensor, DirectionResult | None]:
        """The stack's directions, and the solver's result where it ran eager on a manifold.
        A statistics step solves eager, so that its statistics describe the solve."""
        if _compiles(group, manifold) and self.compile_error is None and not self.collect_stats:
            return self._compiled_direction(group, manifold, stack.w, stack.g), None
        if not manifold.has_dual:
            return stack_direction(stack.w, stack.g, manifold, group["mode"], group["msign_method"],
                                   group["msign_steps"], _msign_dtype(group)), None
        states = [self.state[stack.params[i]] for i in stack.mine]
        carry = self._carries(group) and "dual" in states[0]
        result = solve_direction(stack.w, stack.g, manifold, mode=group["mode"], steps=group["dual_steps"],
                                 alpha=group["dual_alpha"], tol=group["dual_tol"],
                                 dual_init=torch.stack([st["dual"] for st in states]) if carry else None,
                                 dual_form=group["dual_form"], msign_method=group["msign_method"],
                                 msign_steps=group["msign_steps"], dtype=_msign_dtype(group))
        return result.direction, result

    @staticmethod
    def _carries(group) -> bool:
        return bool(group["carry_dual"]) and group["mode"] == "improved"

    @staticmethod
    def _apply(group, manifold, stack: _Stack, a: torch.Tensor) -> torch.Tensor:
        """The stack's new weights: decay, the step, then the retraction (out of place: the
        solver's result keeps the old weights for its statistics)."""
        lr, wd, w = float(group["lr"]), float(group["weight_decay"]), stack.w   # a one-element tensor lr too
        if wd:
            w = w * (1 - lr * wd)
        w = torch.add(w, a.to(w.dtype), alpha=-lr * _lr_scale(group["adjust_lr"], w.shape))
        if manifold.name != "none":
            w = manifold.decay_toward_bound(manifold.retract(w), lr)
        return w

    def _store(self, group, stack: _Stack, w: torch.Tensor, result: DirectionResult | None):
        """Share the new weights, each rank's rows of them (FSDP2) or all of them (all_gather),
        and keep the solver's multipliers for the next step's warm start."""
        k, world_size = len(stack.params), world(self.process_group)[1]
        if stack.scattered:
            from_owners(stored(w, stack.params[0], group), stack.params, *world(self.process_group))
        else:
            write_matrices(stack.params, list(gather_slices(w, k, world_size, self.process_group).unbind(0)), group)
        if result is not None and self._carries(group):
            duals = gather_slices(result.dual.to(w.dtype), k, world_size, self.process_group)
            for p, dual in zip(stack.params, duals):
                self.state[p]["dual"] = dual

    # ---- compiling and statistics ------------------------------------------------------------------
    def _compiled_direction(self, group, manifold, w, g) -> torch.Tensor:
        args = (w, g, manifold, group["mode"], group["msign_method"], group["msign_steps"], _msign_dtype(group))
        try:
            with torch._dynamo.config.patch(**compiled_graphs_limit()), warnings.catch_warnings():
                # torch's compiler warns about its own internals: nothing a user can act on
                warnings.filterwarnings("ignore", message=".*torch._prims_common.check", category=FutureWarning)
                return _compiled_stack_direction()(*args)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: warn once, then run eager
            self.compile_error = f"{type(e).__name__}: {str(e)[:300]}"
            warnings.warn(f"ManifoldMuon: torch.compile of the direction failed, running eager from now on "
                          f"({self.compile_error})", RuntimeWarning, stacklevel=3)
            return stack_direction(*args)   # a genuine error (e.g. out of memory) raises here

    def _compiled_gap(self, group, manifold, stack: _Stack, a) -> torch.Tensor | None:
        """For a compiling group: the alignment of the compiled direction minus that of the
        eager one the statistics step solved, per matrix: what compiling changed, in the unit
        that matters (elementwise gaps mislead where G has tiny singular values, whose msign
        rounding decides).  Alignment is linear in the direction, so one nuclear norm serves."""
        if not (_compiles(group, manifold) and self.compile_error is None):
            return None
        return alignment(stack.g, self._compiled_direction(group, manifold, stack.w, stack.g) - a)

    def _record_stats(self, group, batch, manifold, g, a, w, result, compiled_gap=None):
        names = dict(zip(map(id, group["params"]), group.get("names", [])))
        for p, stats in zip(batch, stack_stats(manifold, g, a, w, result, compiled_gap)):
            self.stats[names.get(id(p), f"param{id(p)}")] = stats
