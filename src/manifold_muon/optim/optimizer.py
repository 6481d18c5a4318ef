"""``ManifoldMuon``: one optimizer object for the whole model.

Each param group is plain data (strings and numbers only, so ``state_dict`` loads
under ``torch.load(weights_only=True)``):

==================  =====================================================================
key                 meaning
==================  =====================================================================
``algorithm``       ``"muon"`` (matrices: 2D, or conv filters read as ``(out, in * kernel
                    size)``) or ``"adamw"``
``manifold``        ``none | stiefel | dgram | dgram-svd | oblique | spectral``
``lr``              learning rate (Muon: step length in spectral norm); default 0.02 for
                    Muon, 1e-3 for AdamW (torch's)
``weight_decay``    decoupled: ``p <- p (1 - lr wd)`` before the update; default 0 for
                    Muon, 0.01 for AdamW (torch's)
``momentum``        Muon momentum ``beta`` (default 0.95)
``nesterov``        Muon: use the Nesterov combination (default True)
``mode``            Manifold Muon direction solver: ``"improved"``, ``"fast"`` or ``"paper"``
``dual_steps``,     direction-solver settings (``None``: the mode's default,
``dual_alpha``,     see :mod:`manifold_muon.optim.dual`)
``dual_tol``
``dual_form``       improved mode's dual evaluations: ``"matrix"`` (an ``m x n`` msign, the
                    default) or ``"gram"`` (``n x n`` work in float64; see
                    :mod:`manifold_muon.optim.nuclear_dual` for where it pays)
``carry_dual``      improved mode: warm-start the dual multiplier from the previous step
                    (default True; momentum moves slowly, so the solve restarts close
                    to its optimum and stops early; the multiplier is saved in the state)
``msign_method``    ``polar_express | newton_schulz | svd``
``msign_steps``     iterations of the msign (None: the method's default, Polar Express 10;
                    7 in fast mode's direction, ``dual.FAST_MSIGN_STEPS``)
``msign_dtype``     ``"bfloat16" | "float32" | None`` (None: float32 for improved mode's dual
                    solver, else bf16; see ``dual.default_msign_dtype``)
``matmul_precision`` the group's float32 matmuls: ``"highest"`` (IEEE, default, whatever the
                    caller set globally), ``"high"`` or ``"medium"`` (TF32 on GPUs: a speed
                    lever; see :mod:`manifold_muon.optim.precision`)
``compile``         ``torch.compile`` the direction of plain Muon and of fast mode, one graph
                    per stack shape (default False; paper and improved mode stop on
                    data-dependent tests every iteration and stay eager, as do steps that
                    collect statistics; if compiling fails the group warns once and runs eager)
``adjust_lr``       Muon lr shape scaling as ``torch.optim.Muon``'s ``adjust_lr_fn``:
                    ``None`` (the paper: none), ``"original"``, ``"match_rms_adamw"``
``betas``, ``eps``  AdamW
``transposed``      the weight is stored ``(in, out)`` (HF ``Conv1D``): the math sees ``W.mT``
==================  =====================================================================

Groups may carry extra plain-data keys (``resolve`` adds ``names`` and ``rule``).

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
exact, SVD-based projection) under ``torch.no_grad``.  Pass ``project_init=False`` when the
weights are already there, e.g. right before loading a checkpoint.

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
from functools import cache

import torch
from torch.optim.adam import adam as _torch_adam

from .compiling import compiled_graphs_limit, mark_compile_constants
from .distributed import (check_ranks_share, from_owners, gather_slices, owned_indices, scatters,
                          to_owners, whole, whole_stack, world)
from .dual import DIRECTION_MODES, alignment, check_dual_form, default_msign_dtype, solve_direction, stack_stats
from .layout import oriented, stored, write_matrices, write_oriented
from .manifolds import get_manifold
from .msign import MSIGN_METHODS, msign
from .precision import MATMUL_PRECISIONS, float32_matmul_precision

__all__ = ["ManifoldMuon", "ALGORITHMS", "MSIGN_DTYPES"]

# Said where a 1D parameter meets a matrix rule: FSDP1's flattened views are the likely cause.
FLATTENED_WEIGHT_HINT = ("if it is a weight flattened to 1D, as FSDP1 shows them, shard with FSDP2's "
                         "fully_shard instead: it keeps each weight's shape, and ManifoldMuon steps it")

ALGORITHMS = ("muon", "adamw")
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
MSIGN_DTYPES = tuple(_DTYPES)
_ADJUST_LR = (None, "original", "match_rms_adamw")

DEFAULTS = dict(
    algorithm="muon", manifold="none", lr=None, weight_decay=None, momentum=0.95, nesterov=True,
    mode="improved", dual_steps=None, dual_alpha=None, dual_tol=None, dual_form="matrix", carry_dual=True,
    msign_method="polar_express", msign_steps=None, msign_dtype=None, matmul_precision="highest",
    compile=False, adjust_lr=None, betas=(0.9, 0.95), eps=1e-8, transposed=False,
)


# lr and weight decay default by algorithm (the reference's Muon; torch.optim.AdamW's own).
ALGORITHM_DEFAULTS = {"muon": dict(lr=0.02, weight_decay=0.0), "adamw": dict(lr=1e-3, weight_decay=0.01)}


def effective(group: dict, key: str):
    """A group's setting as the optimizer will use it (its own, else the algorithm's default)."""
    value = group.get(key)
    if value is None and key in ("lr", "weight_decay"):
        return ALGORITHM_DEFAULTS.get(group.get("algorithm", "muon"), {}).get(key)
    return DEFAULTS.get(key) if value is None and key not in group else value


def _check_choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, choices))}")


def _lr_scale(adjust: str | None, shape: torch.Size) -> float:
    rows, cols = shape[-2], shape[-1]
    if adjust == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _fill_missing_keys(optimizer: "ManifoldMuon"):
    """After ``load_state_dict``: a checkpoint saved before a group key existed gets its default."""
    for group in optimizer.param_groups:
        for key, value in DEFAULTS.items():
            group.setdefault(key, value)


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


class ManifoldMuon(torch.optim.Optimizer):
    """Muon, Manifold Muon and AdamW, chosen per param group (see the module docstring)."""

    def __init__(self, params, *, project_init: bool = True, process_group=None, **defaults):
        unknown = set(defaults) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown ManifoldMuon option(s) {sorted(unknown)}; valid: {', '.join(DEFAULTS)}")
        self.project_init = project_init   # read by add_param_group, which torch's constructor calls
        self.process_group = process_group   # the ranks that share the matrix work; None: every rank
        self._ranks_checked = False
        super().__init__(params, {**DEFAULTS, **defaults})  # each group passes through add_param_group
        self.register_load_state_dict_post_hook(_fill_missing_keys)
        self.collect_stats = False
        self.stats: dict[str, dict] = {}
        self.compile_error: str | None = None   # why compiling failed, after which every group runs eager

    @staticmethod
    def _fill_algorithm_defaults(group):
        for key in ("lr", "weight_decay"):
            group[key] = effective(group, key)

    @staticmethod
    def _validate(group):
        _check_choice("algorithm", group["algorithm"], ALGORITHMS)
        manifold = get_manifold(group["manifold"])  # raises with the valid choices
        _check_choice("direction mode", group["mode"], DIRECTION_MODES)
        _check_choice("msign method", group["msign_method"], MSIGN_METHODS)
        _check_choice("msign dtype", group["msign_dtype"], (None, *_DTYPES))
        _check_choice("matmul precision", group["matmul_precision"], MATMUL_PRECISIONS)
        _check_choice("compile", group["compile"], (False, True))
        check_dual_form(group["dual_form"], group["msign_method"])
        steps = group["msign_steps"]
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"msign_steps must be a positive integer or None (the method's default), got {steps!r}")
        if group["mode"] == "fast" and group["dual_steps"]:
            raise ValueError(f"mode='fast' takes no dual steps, got dual_steps={group['dual_steps']!r}; "
                             f"use mode='improved' for dual iterations")
        _check_choice("adjust_lr", group["adjust_lr"], _ADJUST_LR)
        if group["lr"] < 0 or group["weight_decay"] < 0 or not 0 <= group["momentum"] < 1:
            raise ValueError(f"need lr >= 0, weight_decay >= 0, 0 <= momentum < 1; got lr={group['lr']}, "
                             f"weight_decay={group['weight_decay']}, momentum={group['momentum']}")
        for p in group["params"]:
            if (group["algorithm"] == "muon" or manifold.name != "none") and p.ndim < 2:
                raise ValueError(f"algorithm={group['algorithm']!r}, manifold={manifold.name!r} needs matrices "
                                 f"(2D, or conv filters read as (out, in * kernel size)), got shape "
                                 f"{tuple(p.shape)}; give it a group with algorithm='adamw', manifold='none', as "
                                 f"resolve(model, preset_or_rules) does for biases and norms ({FLATTENED_WEIGHT_HINT})")

    def add_param_group(self, param_group):
        """torch's, then this optimizer's per-algorithm defaults and validation (the constructor
        adds its groups through here too)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._fill_algorithm_defaults(group)
        self._validate(group)
        if self.project_init:
            self._project_group(group)

    def project_to_manifolds(self):
        """Put every manifold-managed parameter on its manifold (exact projection)."""
        for group in self.param_groups:
            self._project_group(group)

    @staticmethod
    @torch.no_grad()
    def _project_group(group):
        manifold = get_manifold(group["manifold"])
        if manifold.name != "none":
            for p in group["params"]:
                write_oriented(p, manifold.init(oriented(whole(p), group)), group)

    @torch.no_grad()
    def step(self, closure=None):
        self.stats = {}
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._ranks_checked:
            check_ranks_share(self._named_muon_params(), self.process_group)
            self._ranks_checked = True
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # the group's own float32 matmul precision, whatever the caller set globally
            with float32_matmul_precision(group["matmul_precision"]):
                if group["algorithm"] == "adamw":
                    self._adamw(group, params)
                else:
                    self._muon(group, params)
        return loss

    def _named_muon_params(self) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of every Muon matrix: what the ranks share."""
        named = []
        for i, group in enumerate(self.param_groups):
            if group["algorithm"] != "muon":
                continue
            names = group.get("names") or [f"parameter {j} of group {i}" for j in range(len(group["params"]))]
            named += zip(names, group["params"])
        return named

    # ---- AdamW: torch's own functional implementation ----------------------------------------
    def _adamw(self, group, params):
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("ManifoldMuon does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _torch_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, decoupled_weight_decay=True,
                    amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        manifold = get_manifold(group["manifold"])
        if manifold.name != "none":  # "wrap any optimizer": AdamW step, then retract
            for p in params:
                w = oriented(whole(p), group)
                write_oriented(p, manifold.decay_toward_bound(manifold.retract(w), group["lr"]), group)

    # ---- Muon and Manifold Muon ---------------------------------------------------------------
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

    def _muon(self, group, params):
        manifold = get_manifold(group["manifold"])
        lr, wd = group["lr"], group["weight_decay"]
        by_shape = defaultdict(list)  # batch same-shape matrices through one solve
        for p in params:
            by_shape[(tuple(p.shape), p.dtype, p.device)].append(p)
        rank, world_size = world(self.process_group)
        for batch in by_shape.values():
            # Every rank updates every momentum buffer (grads are identical after DDP; under FSDP2
            # each rank its rows) and solves only its slice of the stack, `mine` ...
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
            scale = lr * _lr_scale(group["adjust_lr"], w.shape)
            result, duals = None, None
            compiling = _compiles(group, manifold) and self.compile_error is None
            if compiling and not self.collect_stats:
                a = self._compiled_direction(group, manifold, w, g)
            elif manifold.has_dual:
                carry = group["carry_dual"] and group["mode"] == "improved"
                states = [self.state[batch[i]] for i in mine]
                dual_init = torch.stack([st["dual"] for st in states]) if carry and "dual" in states[0] else None
                result = solve_direction(w, g, manifold, mode=group["mode"], steps=group["dual_steps"],
                                         alpha=group["dual_alpha"], tol=group["dual_tol"], dual_init=dual_init,
                                         dual_form=group["dual_form"],
                                         msign_method=group["msign_method"], msign_steps=group["msign_steps"],
                                         dtype=_msign_dtype(group))
                a = result.direction
                if carry:
                    duals = gather_slices(result.dual.to(w.dtype), k, world_size, self.process_group)
            else:
                a = stack_direction(w, g, manifold, group["mode"], group["msign_method"], group["msign_steps"],
                                    _msign_dtype(group))
            # A statistics step solves eager; a compiling group also checks its compiled graph there.
            compiled_gap = self._compiled_gap(group, manifold, w, g, a) if compiling and self.collect_stats else None
            # Out of place: the solve's result keeps this w (DirectionResult.weight) for its statistics.
            if wd:
                w = w * (1 - lr * wd)
            w = torch.add(w, a.to(w.dtype), alpha=-scale)
            if manifold.name != "none":
                w = manifold.decay_toward_bound(manifold.retract(w), lr)
            if self.collect_stats:  # before the gather: each rank reports the matrices it solved
                self._record_stats(group, [batch[i] for i in mine], manifold, g, a, w, result, compiled_gap)
            # ... then shares its results: each rank's rows of them (FSDP2), or all of them (all_gather).
            if scattered:
                from_owners(stored(w, batch[0], group), batch, rank, world_size)
            else:
                write_matrices(batch, list(gather_slices(w, k, world_size, self.process_group).unbind(0)), group)
            if duals is not None:
                for p, dual in zip(batch, duals):
                    self.state[p]["dual"] = dual

    def _compiled_direction(self, group, manifold, w, g) -> torch.Tensor:
        args = (w, g, manifold, group["mode"], group["msign_method"], group["msign_steps"], _msign_dtype(group))
        try:
            with torch._dynamo.config.patch(**compiled_graphs_limit()), warnings.catch_warnings():
                # torch's compiler warns about its own internals (torch 2.13): nothing a user can act on
                warnings.filterwarnings("ignore", message=".*torch._prims_common.check", category=FutureWarning)
                return _compiled_stack_direction()(*args)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: warn once, then run eager
            self.compile_error = f"{type(e).__name__}: {str(e)[:300]}"
            warnings.warn(f"ManifoldMuon: torch.compile of the direction failed, running eager from now on "
                          f"({self.compile_error})", RuntimeWarning, stacklevel=3)
            return stack_direction(*args)   # a genuine error (e.g. out of memory) raises here

    def _compiled_gap(self, group, manifold, w, g, a) -> torch.Tensor:
        """Alignment of the compiled direction minus that of the eager one, per matrix: what
        compiling changed, in the unit that matters (elementwise gaps mislead where G has tiny
        singular values, whose msign rounding decides).  A miscompiled graph moves it by tenths.
        Alignment is linear in the direction, so one nuclear norm of G serves (the costly part)."""
        return alignment(g, self._compiled_direction(group, manifold, w, g) - a)

    def _record_stats(self, group, batch, manifold, g, a, w, result, compiled_gap=None):
        names = dict(zip(map(id, group["params"]), group.get("names", [])))
        for p, stats in zip(batch, stack_stats(manifold, g, a, w, result, compiled_gap)):
            self.stats[names.get(id(p), f"param{id(p)}")] = stats
