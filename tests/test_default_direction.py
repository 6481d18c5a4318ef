"""The default direction (fast mode) against its contract on problems large enough that an
``n x n`` decomposition would show: feasible, about one msign of matmul FLOPs, no decomposition
of an ``n x n`` matrix on its path, and at least its measured share of a float64 dual bound."""
from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from manifold_muon import get_manifold, manifold_direction, msign
from manifold_muon.lab.decompositions import DecompositionRecorder
from manifold_muon.optim.dual import spectral_norm

from conftest import dual_bound, momentum_like, point_on

SHAPE = (192, 96)   # n = 96: beyond the Krylov-sized eigenproblems (32 x 32) the norm estimate may run


@pytest.mark.parametrize("man", ["stiefel", "dgram", "oblique"])
def test_the_default_is_feasible_cheap_and_free_of_n_by_n_decompositions(man):
    w = point_on(man, *SHAPE, seed=1).float()
    g = momentum_like(*SHAPE, seed=2).float()
    with FlopCounterMode(display=False) as one_msign:
        msign(g)
    with FlopCounterMode(display=False) as flops, DecompositionRecorder(min_size=SHAPE[1]) as decompositions:
        a = manifold_direction(w, g, man)
    assert decompositions.names == []
    assert flops.get_total_flops() <= 3 * one_msign.get_total_flops()
    manifold = get_manifold(man)
    assert float(manifold.tangent_violation(w, a)) <= 1e-3
    assert float(spectral_norm(a)) <= 1 + 1e-3


def test_the_recorder_sees_an_n_by_n_decomposition_where_there_is_one():
    w = point_on("stiefel", *SHAPE, seed=1).float()
    g = momentum_like(*SHAPE, seed=2).float()
    with DecompositionRecorder(min_size=SHAPE[1]) as decompositions:
        manifold_direction(w, g, "stiefel", mode="improved", steps=1)   # its repair takes an exact norm
    assert decompositions.names   # so the test above could fail


@pytest.mark.parametrize("man,floor", [("stiefel", 0.9), ("dgram", 0.75)])
def test_the_default_keeps_its_measured_share_of_the_dual_bound(man, floor):
    w = point_on(man, 48, 16, seed=3)
    g = momentum_like(48, 16, seed=4)
    a = manifold_direction(w.float(), g.float(), man).double()
    assert float((g * a).sum()) >= floor * dual_bound(w, g, man)
