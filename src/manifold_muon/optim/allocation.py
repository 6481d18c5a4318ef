"""Module-wise allocation: ordered rules map parameter names to (algorithm, manifold).

A preset is data: a tuple of :class:`Rule`.  ``resolve(model, preset_or_rules)``
walks ``model.named_parameters()`` (tied parameters appear once; frozen ones are
skipped) and gives each parameter to the *first* rule whose regex matches its
qualified name (``re.search``) and whose ``ndim`` filter, if any, fits.  Every
trainable parameter must be claimed exactly once, and every rule but a catch-all
(pattern ``"."``) must claim at least one parameter: both are errors otherwise,
because a silent mismatch means the experiment is not the one you think.

Orientation: our math reads a weight as ``nn.Linear`` stores it, ``(out, in)``.
Hugging Face GPT-2's ``Conv1D`` stores ``(in, out)``; ``resolve`` detects it and
marks the group ``transposed=True`` so the optimizer works on ``W.mT``.  Stiefel
and DGram are then the same constraint as on the equivalent ``nn.Linear``
(this matters for square matrices, where "columns" are otherwise ambiguous).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field

import torch

from .manifolds import get_manifold
from .options import ALGORITHMS, DEFAULTS, FLATTENED_WEIGHT_HINT, effective

__all__ = ["Rule", "PRESETS", "PAPER_ALLOCATIONS", "PRESET_ALIASES", "register_preset", "resolve", "get_preset",
           "format_allocation", "allocation_records", "save_allocation", "muon_rule", "adamw_rule", "split_preset",
           "ATTENTION", "MLP", "ANY", "REST", "NAMING_CONVENTIONS"]

#: Where attention's and the MLP's matrices sit, by parameter name, per naming convention:
#: (attention pattern, MLP pattern).  Read off the parameter names of tiny models built with
#: torch 2.13, transformers 5.24.0 and timm 1.0.31's source (tests/test_allocation.py keeps
#: them).  A model named otherwise needs its own Rules.
NAMING_CONVENTIONS = {
    "nanoGPT, HF GPT-2": (r"attn\.(c_attn|c_proj)\.weight$", r"mlp\.(c_fc|c_proj)\.weight$"),
    "HF Llama, Mistral, Qwen2, Gemma": (r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight$",
                                        r"mlp\.(gate_proj|up_proj|down_proj)\.weight$"),
    "HF OPT, BART, Whisper": (r"(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)\.weight$",
                              r"layers\.\d+\.(fc1|fc2)\.weight$"),
    "HF Phi": (r"self_attn\.(q_proj|k_proj|v_proj|dense)\.weight$", r"mlp\.(fc1|fc2)\.weight$"),
    "HF ViT": (r"attention\.(q_proj|k_proj|v_proj|o_proj)\.weight$", r"mlp\.(fc1|fc2)\.weight$"),
    "HF GPT-NeoX (Pythia), Falcon": (r"(attention|self_attention)\.(query_key_value|dense)\.weight$",
                                     r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.weight$"),
    "HF BERT, RoBERTa": (r"attention\.(self\.(query|key|value)|output\.dense)\.weight$",
                         r"layer\.\d+\.(intermediate|output)\.dense\.weight$"),
    "HF T5": (r"(SelfAttention|EncDecAttention)\.[qkvo]\.weight$", r"DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$"),
    # nn.TransformerEncoderLayer / DecoderLayer: nn.MultiheadAttention under the names those
    # layers give it (a MultiheadAttention named otherwise needs a Rule), linear1 and linear2.
    "torch.nn.Transformer layers": (r"(self_attn|multihead_attn)\.(in_proj_weight|[qkv]_proj_weight|out_proj\.weight)$",
                                    r"(^|\.)linear[12]\.weight$"),
    "timm ViT, Swin": (r"attn\.(qkv|q_proj|k_proj|v_proj|proj)\.weight$", r"mlp\.(fc1|fc2)\.weight$"),
}
#: attention's projections in any of the conventions above
ATTENTION = "|".join(f"({attention})" for attention, _ in NAMING_CONVENTIONS.values())
#: the MLP's (feed-forward) projections in any of the conventions above
MLP = "|".join(f"({mlp})" for _, mlp in NAMING_CONVENTIONS.values())
ANY = r"."

# The paper's hyperparameters (its reference code's defaults).
ADAMW_LR, ADAMW_WD, MUON_LR = 6e-4, 0.1, 0.02


@dataclass(frozen=True)
class Rule:
    """``Rule(pattern, algorithm, manifold="none", *, ndim=None, **group_overrides)``.

    ``group_overrides`` become keys of the param group (lr, weight_decay, mode, ...).
    """

    pattern: str
    algorithm: str
    manifold: str = "none"
    ndim: int | None = None
    overrides: tuple = field(default=())

    def __init__(self, pattern: str, algorithm: str, manifold: str = "none", *, ndim: int | None = None,
                 **group_overrides):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; valid choices: {', '.join(ALGORITHMS)}")
        get_manifold(manifold)
        allowed = [k for k in DEFAULTS if k not in ("algorithm", "manifold", "transposed")]
        bad = set(group_overrides) - set(allowed)
        if bad:
            raise ValueError(f"unknown group option(s) {sorted(bad)}; valid choices: {', '.join(allowed)}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rule pattern {pattern!r} is not a valid regular expression: {e}") from None
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "manifold", manifold)
        object.__setattr__(self, "ndim", ndim)
        object.__setattr__(self, "overrides", tuple(sorted(group_overrides.items())))

    def matches(self, name: str, param: torch.Tensor) -> bool:
        return (self.ndim is None or param.ndim == self.ndim) and re.search(self.pattern, name) is not None

    def describe(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.overrides)
        nd = f", ndim={self.ndim}" if self.ndim is not None else ""
        pattern = _PATTERN_NAMES.get(self.pattern, repr(self.pattern))   # ATTENTION, not its 560 characters
        return f"Rule({pattern}, {self.algorithm!r}, {self.manifold!r}{nd}{extra})"


_PATTERN_NAMES = {ATTENTION: "ATTENTION", MLP: "MLP"}


def muon_rule(pattern: str, manifold: str, weight_decay: float | None = None) -> Rule:
    """Muon at the paper's rate on ``manifold``.  Unconstrained Muon keeps the paper's decoupled
    weight decay (0.1); manifold weights get none, as in the paper, unless asked."""
    if weight_decay is None:
        weight_decay = ADAMW_WD if manifold == "none" else 0.0
    return Rule(pattern, "muon", manifold, lr=MUON_LR, weight_decay=weight_decay)


def adamw_rule(pattern: str, manifold: str = "none") -> Rule:
    """AdamW at the paper's rate; with a manifold, the AdamW step is followed by a retraction."""
    return Rule(pattern, "adamw", manifold, lr=ADAMW_LR, weight_decay=0.0 if manifold != "none" else ADAMW_WD)


#: Everything the matrix rules did not claim: AdamW, decay on 2D+ only (the paper's split).
REST = (Rule(ANY, "adamw", ndim=1, lr=ADAMW_LR, weight_decay=0.0), Rule(ANY, "adamw", lr=ADAMW_LR, weight_decay=ADAMW_WD))


def split_preset(attention: Rule, mlp: Rule) -> tuple[Rule, ...]:
    """A preset from a rule for attention's matrices and one for the MLP's (patterns
    :data:`ATTENTION` and :data:`MLP`), the rest AdamW."""
    return (attention, mlp) + REST


def _geometries(attention: str, mlp: str, rule=muon_rule) -> tuple[Rule, ...]:
    return split_preset(rule(ATTENTION, attention), rule(MLP, mlp))


#: The paper's five allocations, in its order: (attention, MLP) geometry under Muon.
PAPER_ALLOCATIONS = ("unconstrained", "all-stiefel", "all-dgram", "hetero", "hetero-inv")
_PAPER_GEOMETRIES = (("none", "none"), ("stiefel", "stiefel"), ("dgram", "dgram"), ("stiefel", "dgram"),
                     ("dgram", "stiefel"))

PRESETS: dict[str, tuple[Rule, ...]] = {
    name: _geometries(attention, mlp) for name, (attention, mlp) in zip(PAPER_ALLOCATIONS, _PAPER_GEOMETRIES)}
PRESETS.update({
    # the nine of the plan the paper grew from: AdamW baseline, Muon placements, "wrap any
    # optimizer" (an AdamW step, then a Stiefel retraction), the spectral-norm ball
    "baseline": _geometries("none", "none", adamw_rule),
    "muon-all": _geometries("none", "none"),
    "muon-attention": split_preset(muon_rule(ATTENTION, "none"), adamw_rule(MLP)),
    "muon-ffn": split_preset(adamw_rule(ATTENTION), muon_rule(MLP, "none")),
    "stiefel-all": _geometries("stiefel", "stiefel", adamw_rule),
    "stiefel-attention": split_preset(adamw_rule(ATTENTION, "stiefel"), adamw_rule(MLP)),
    "stiefel-ffn": split_preset(adamw_rule(ATTENTION), adamw_rule(MLP, "stiefel")),
    "spectral-all": _geometries("spectral", "spectral", adamw_rule),
    "manifold-muon": _geometries("stiefel", "stiefel"),
})

#: Earlier names, kept working with a DeprecationWarning.
PRESET_ALIASES = {old.replace("-", "_"): old for old in
                  ("muon-all", "muon-attention", "muon-ffn", "stiefel-all", "stiefel-attention", "stiefel-ffn",
                   "spectral-all", "manifold-muon")}


def register_preset(name: str, rules) -> tuple[Rule, ...]:
    """Make a sequence of :class:`Rule` nameable as a preset (``resolve(model, name)``, the
    lab's ``--allocation``).  Names are kebab-case; a taken name is an error unless the rules
    are the same."""
    rules = tuple(rules)
    if not rules or not all(isinstance(r, Rule) for r in rules):
        raise TypeError(f"register_preset({name!r}, rules) needs a non-empty sequence of Rule")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]+(-[a-z0-9.]+)*", name):
        raise ValueError(f"preset name {name!r} must be kebab-case (lowercase words joined by '-')")
    known = PRESETS.get(name)
    if known is not None and known != rules or name in PRESET_ALIASES:
        raise ValueError(f"preset name {name!r} is taken; choose another name")
    PRESETS[name] = rules
    return rules


def get_preset(name: str) -> tuple[Rule, ...]:
    """The rules of a named preset (raises with the valid names if unknown)."""
    if isinstance(name, str) and name in PRESET_ALIASES:
        warnings.warn(f"preset name {name!r} is deprecated; use {PRESET_ALIASES[name]!r}", DeprecationWarning,
                      stacklevel=2)
        name = PRESET_ALIASES[name]
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown allocation preset {name!r}; valid choices: {', '.join(PRESETS)}") from None


def _is_transposed_storage(module: torch.nn.Module) -> bool:
    # Hugging Face's Conv1D (GPT-2) stores (in, out); identified by name so that
    # transformers stays an optional dependency.
    return type(module).__name__ == "Conv1D"


def _owner_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    return owners


def resolve(model: torch.nn.Module, preset_or_rules, **overrides) -> list[dict]:
    """Param groups for :class:`ManifoldMuon`, one per (rule, orientation).

    ``preset_or_rules`` is a preset name or a sequence of :class:`Rule`.  ``overrides``
    are applied to every group (e.g. ``mode="paper"``).  Each group carries ``names``
    (the qualified parameter names) and ``rule`` (its description) for the table.
    """
    rules = get_preset(preset_or_rules) if isinstance(preset_or_rules, str) else tuple(preset_or_rules)
    if not rules or not all(isinstance(r, Rule) for r in rules):
        raise ValueError("preset_or_rules must be a preset name or a non-empty sequence of Rule; "
                         f"valid presets: {', '.join(PRESETS)}")
    owners = _owner_modules(model)
    groups: dict[tuple[int, bool], dict] = {}
    claimed = [0] * len(rules)
    unclaimed = []
    for name, param in model.named_parameters():  # tied parameters are yielded once
        if not param.requires_grad:
            continue
        index = next((i for i, r in enumerate(rules) if r.matches(name, param)), None)
        if index is None:
            unclaimed.append(name)
            continue
        rule = rules[index]
        if rule.manifold != "none" and param.ndim < 2:
            raise ValueError(f"rule {rule.describe()} puts manifold {rule.manifold!r} on {name!r} of shape "
                             f"{tuple(param.shape)}; manifolds need matrices (2D, or conv filters). Valid "
                             f"manifolds for it: 'none' ({FLATTENED_WEIGHT_HINT})")
        claimed[index] += 1
        transposed = _is_transposed_storage(owners[name])
        group = groups.setdefault((index, transposed), {
            "params": [], "names": [], "algorithm": rule.algorithm, "manifold": rule.manifold,
            "transposed": transposed, "rule": rule.describe(), **dict(rule.overrides), **overrides})
        group["params"].append(param)
        group["names"].append(name)
    if unclaimed:
        raise ValueError(f"no rule claims parameter(s) {unclaimed[:8]}{' ...' if len(unclaimed) > 8 else ''}; "
                         "add a catch-all rule such as Rule('.', 'adamw')")
    # A catch-all left with nothing to catch is no mismatch (an encoder has no embeddings).
    idle = [rules[i] for i, n in enumerate(claimed) if n == 0 and rules[i].pattern != ANY]
    if idle:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        known = ""
        if any(r.pattern in _PATTERN_NAMES for r in idle):
            known = (f"; ATTENTION and MLP know the names of {'; '.join(NAMING_CONVENTIONS)}: for a model "
                     "named otherwise, write Rules with its names")
        raise ValueError(f"rule(s) {[r.describe() for r in idle]} match no parameter (or only ones an earlier "
                         f"rule claimed); valid names include: {', '.join(names[:12])}"
                         f"{' ...' if len(names) > 12 else ''}{known}")
    return [groups[k] for k in sorted(groups)]


def allocation_records(groups: list[dict]) -> list[dict]:
    """One JSON-ready row per parameter: name, shape, algorithm, manifold, lr, weight decay, rule."""
    rows = []
    for g in groups:
        for name, p in zip(g.get("names", []), g["params"]):
            rows.append({"name": name, "shape": list(p.shape), "algorithm": g["algorithm"],
                         "manifold": g["manifold"], "transposed": g.get("transposed", False),
                         "lr": effective(g, "lr"), "weight_decay": effective(g, "weight_decay"),
                         "rule": g.get("rule", "")})
    return rows


def format_allocation(groups: list[dict]) -> str:
    """The resolved table as aligned text (print it, save it with the run)."""
    rows = allocation_records(groups)
    header = ("parameter", "shape", "algorithm", "manifold", "lr", "wd")
    body = [(r["name"], "x".join(map(str, r["shape"])) + (" (in,out)" if r["transposed"] else ""),
             r["algorithm"], r["manifold"], f"{r['lr']:g}", f"{r['weight_decay']:g}") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def save_allocation(groups: list[dict], path) -> None:
    with open(path, "w") as f:
        json.dump(allocation_records(groups), f, indent=1)

