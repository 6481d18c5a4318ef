"""The param-group options of :class:`~manifold_muon.ManifoldMuon`: one typed spec, its defaults,
and the one place every group is validated.

Param groups stay plain dicts (schedulers edit ``lr``; ``state_dict`` loads under
``torch.load(weights_only=True)``); :class:`GroupOptions` is the spec they are checked against.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields

import torch

from .dual import DIRECTION_MODES, check_dual_form
from .manifolds import get_manifold
from .msign import MSIGN_METHODS
from .precision import MATMUL_PRECISIONS

__all__ = ["GroupOptions", "DEFAULTS", "ALGORITHMS", "MSIGN_DTYPES", "ADJUST_LR", "KNOWN_EXTRA_KEYS", "NONFINITE",
           "effective", "validate_group", "check_group_keys", "FLATTENED_WEIGHT_HINT"]

ALGORITHMS = ("muon", "adamw")
MSIGN_DTYPES = ("bfloat16", "float32", "float64")
ADJUST_LR = (None, "original", "match_rms_adamw")
NONFINITE = ("skip", "raise")   # what a step with a non-finite gradient does

# Said where a 1D parameter meets a matrix rule: FSDP1's flattened views are the likely cause.
FLATTENED_WEIGHT_HINT = ("if it is a weight flattened to 1D, as FSDP1 shows them, shard with FSDP2's "
                         "fully_shard instead: it keeps each weight's shape, and ManifoldMuon steps it")

#: Keys a group may carry besides the options: ``params``, what :func:`~manifold_muon.resolve`
#: adds (``names``, ``rule``), and what torch's learning-rate schedulers add.
KNOWN_EXTRA_KEYS = ("params", "names", "rule", "initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum",
                    "base_momentum", "swa_lr")


@dataclass(frozen=True)
class GroupOptions:
    """Every option of a param group, with its type and default.

    Attributes:
        algorithm: ``"muon"`` (matrices: 2D, or conv filters read as ``(out, in * kernel size)``)
            or ``"adamw"``.
        manifold: ``none``, ``stiefel``, ``dgram``, ``dgram-svd``, ``oblique``, ``spectral``, or a
            name given to :func:`~manifold_muon.register_manifold`.
        lr: learning rate (Muon: the step's length in spectral norm); ``None``: 0.02 for Muon,
            1e-3 for AdamW (torch's).
        weight_decay: decoupled, ``p <- p (1 - lr wd)`` before the update; ``None``: 0 for Muon,
            0.01 for AdamW (torch's).
        momentum: Muon's momentum ``beta``, in ``[0, 1)``.
        nesterov: Muon: use the Nesterov combination ``G = g + beta buf``.
        mode: the Manifold Muon direction solver: ``"improved"``, ``"fast"`` or ``"paper"``
            (see :mod:`manifold_muon.optim.dual`).
        dual_steps: the solver's iterations (``None``: the mode's default).
        dual_alpha: the solver's first step size (``None``: the mode's default).
        dual_tol: the solver's scale-free stopping tolerance (``None``: the mode's default).
        dual_form: improved mode's dual evaluations: ``"matrix"`` (an ``m x n`` msign) or
            ``"gram"`` (``n x n`` work in float64).
        carry_dual: improved mode: warm-start the multiplier from the previous step's (saved in
            the state); momentum moves slowly, so the solve restarts near its optimum.
        msign_method: ``polar_express``, ``newton_schulz`` or ``svd``.
        msign_steps: the msign's iterations (``None``: the method's default; fast mode's
            direction uses 7 Polar Express steps).
        msign_dtype: ``"bfloat16"``, ``"float32"``, ``"float64"`` or ``None`` (float32 for improved
            mode's solver, else bfloat16).
        matmul_precision: the group's float32 matmuls: ``"highest"`` (IEEE), ``"high"`` or
            ``"medium"`` (TF32 on GPUs, a speed lever).
        compile: ``torch.compile`` the direction of plain Muon and of fast mode, one graph per
            stack shape; a failure warns once and runs eager.
        adjust_lr: Muon's lr shape scaling, as ``torch.optim.Muon``'s ``adjust_lr_fn``: ``None``
            (the paper: none), ``"original"`` or ``"match_rms_adamw"``.
        betas: AdamW's ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: AdamW's denominator term, ``>= 0``.
        transposed: the weight is stored ``(in, out)`` (Hugging Face ``Conv1D``); the math sees
            ``W.mT``.  :func:`~manifold_muon.resolve` sets it.
    """

    algorithm: str = "muon"
    manifold: str = "none"
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.95
    nesterov: bool = True
    mode: str = "fast"
    dual_steps: int | None = None
    dual_alpha: float | None = None
    dual_tol: float | None = None
    dual_form: str = "matrix"
    carry_dual: bool = True
    msign_method: str = "polar_express"
    msign_steps: int | None = None
    msign_dtype: str | None = None
    matmul_precision: str = "highest"
    compile: bool = False
    adjust_lr: str | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    transposed: bool = False


#: Every option's default, as a plain dict (what ``ManifoldMuon.defaults`` starts from).
DEFAULTS = {f.name: f.default for f in fields(GroupOptions)}

#: lr and weight decay default by algorithm (the paper's Muon; torch.optim.AdamW's own).
ALGORITHM_DEFAULTS = {"muon": dict(lr=0.02, weight_decay=0.0), "adamw": dict(lr=1e-3, weight_decay=0.01)}


def effective(group: dict, key: str):
    """A group's setting as the optimizer will use it (its own, else the algorithm's default)."""
    value = group.get(key)
    if value is None and key in ("lr", "weight_decay"):
        return ALGORITHM_DEFAULTS.get(group.get("algorithm", "muon"), {}).get(key)
    return DEFAULTS.get(key) if value is None and key not in group else value


def _did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_group_keys(keys) -> None:
    """Refuse keys that are neither options nor known extras, naming the valid ones: a
    misspelled option, or one this optimizer does not have (``maximize``, ``foreach``, ...)
    must not be ignored silently."""
    for key in keys:
        if key not in DEFAULTS and key not in KNOWN_EXTRA_KEYS:
            raise TypeError(f"unknown ManifoldMuon option {key!r}{_did_you_mean(key, DEFAULTS)}; "
                             f"valid options: {', '.join(DEFAULTS)}")


def _check_choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, choices))}")


def _as_float(key: str, value) -> float:
    """A hyperparameter as a Python float: numbers and one-element tensors (a tensor lr, as torch
    allows), nothing else."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{key} must be a number or a one-element tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_rates(group: dict) -> None:
    """lr, weight decay, momentum, eps and betas: finite numbers in their ranges."""
    lr, wd = _as_float("lr", group["lr"]), _as_float("weight_decay", group["weight_decay"])
    momentum, eps = _as_float("momentum", group["momentum"]), _as_float("eps", group["eps"])
    for key, value in (("lr", lr), ("weight_decay", wd), ("eps", eps)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} must be finite and >= 0, got {value}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0 <= _as_float(f"betas[{i}]", beta) < 1:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")


def _check_solver_numbers(group: dict) -> None:
    """Step counts are integers (msign's at least 1); the solver's alpha and tol positive."""
    for key, least in (("dual_steps", 0), ("msign_steps", 1)):
        steps = group[key]
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < least):
            raise ValueError(f"{key} must be an integer >= {least} or None (the default), got {steps!r}")
    for key in ("dual_alpha", "dual_tol"):
        if group[key] is not None and not _as_float(key, group[key]) > 0:
            raise ValueError(f"{key} must be > 0 or None (the mode's default), got {group[key]!r}")


def _check_choices(group: dict) -> None:
    _check_choice("algorithm", group["algorithm"], ALGORITHMS)
    get_manifold(group["manifold"])  # raises with the valid choices
    _check_choice("direction mode", group["mode"], DIRECTION_MODES)
    _check_choice("msign method", group["msign_method"], MSIGN_METHODS)
    _check_choice("msign dtype", group["msign_dtype"], (None, *MSIGN_DTYPES))
    _check_choice("matmul precision", group["matmul_precision"], MATMUL_PRECISIONS)
    _check_choice("adjust_lr", group["adjust_lr"], ADJUST_LR)
    for flag in ("compile", "nesterov", "carry_dual", "transposed"):
        _check_choice(flag, group[flag], (False, True))
    check_dual_form(group["dual_form"], group["msign_method"])
    if group["mode"] == "fast" and group["dual_steps"]:
        raise ValueError(f"mode='fast' takes no dual steps, got dual_steps={group['dual_steps']!r}; "
                         f"use mode='improved' for dual iterations")


def _check_params(group: dict) -> None:
    manifold = get_manifold(group["manifold"])
    for p in group["params"]:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"ManifoldMuon optimizes tensors; a param group holds a {type(p).__name__}")
        if p.is_complex():
            raise TypeError(f"ManifoldMuon supports real parameters only, got one of dtype {p.dtype} and shape "
                            f"{tuple(p.shape)}; view it as real pairs with torch.view_as_real, or optimize it elsewhere")
        if not p.is_floating_point():
            raise TypeError(f"ManifoldMuon optimizes floating-point parameters, got dtype {p.dtype}")
        if (group["algorithm"] == "muon" or manifold.name != "none") and p.ndim < 2:
            raise ValueError(f"algorithm={group['algorithm']!r}, manifold={manifold.name!r} needs matrices "
                             f"(2D, or conv filters read as (out, in * kernel size)), got shape "
                             f"{tuple(p.shape)}; give it a group with algorithm='adamw', manifold='none', as "
                             f"resolve(model, preset_or_rules) does for biases and norms ({FLATTENED_WEIGHT_HINT})")


def validate_group(group: dict) -> None:
    """Check every key and value of a complete group (defaults filled in); raise ``ValueError``
    or ``TypeError`` naming the bad key or value and the valid choices."""
    check_group_keys(group)
    _check_choices(group)
    _check_rates(group)
    _check_solver_numbers(group)
    _check_params(group)
