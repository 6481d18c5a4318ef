"""manifold-muon: Muon and Manifold Muon with module-wise weight-space geometry."""
from .optim import (MANIFOLDS, GroupOptions, PAPER_ALLOCATIONS, PRESETS, register_preset, DGram, DirectionResult, Manifold, ManifoldMuon, Rule, alignment,
                    allocation_records, format_allocation, get_manifold, get_preset, manifold_direction,
                    msign, register_manifold, resolve, save_allocation, solve_direction)

__version__ = "0.1.0"

__all__ = ["msign", "Manifold", "DGram", "MANIFOLDS", "get_manifold", "register_manifold", "manifold_direction", "solve_direction",
           "DirectionResult", "alignment", "ManifoldMuon", "GroupOptions", "Rule", "PRESETS", "PAPER_ALLOCATIONS", "get_preset", "register_preset", "resolve",
           "format_allocation", "allocation_records", "save_allocation", "__version__"]
