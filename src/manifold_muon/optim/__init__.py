"""The optimizer library: msign, manifolds, the direction solver, ManifoldMuon, allocation."""
from .allocation import PAPER_ALLOCATIONS, PRESETS, Rule, register_preset, allocation_records, format_allocation, get_preset, resolve, save_allocation
from .dual import DirectionResult, alignment, manifold_direction, solve_direction
from .manifolds import MANIFOLDS, DGram, Manifold, get_manifold, register_manifold
from .msign import msign
from .optimizer import ManifoldMuon
from .options import GroupOptions

__all__ = ["msign", "Manifold", "DGram", "MANIFOLDS", "get_manifold", "register_manifold", "manifold_direction", "solve_direction",
           "DirectionResult", "alignment", "ManifoldMuon", "GroupOptions", "Rule", "PRESETS", "PAPER_ALLOCATIONS", "get_preset", "register_preset", "resolve",
           "format_allocation", "allocation_records", "save_allocation"]
