"""The two forms of the improved solver's dual (matrix and Gram space) and its step control."""
from functools import partial

import pytest
import torch

from manifold_muon import get_manifold, solve_direction
from manifold_muon.optim.dual import alignment
from manifold_muon.optim.manifolds import sym
from manifold_muon.optim.msign import msign, quintic_schedule
from manifold_muon.optim.nuclear_dual import GramDual, MatrixDual, polar_inverse_root
from conftest import dual_bound, momentum_like, point_on, with_condition


@pytest.mark.parametrize("method", ["polar_express", "newton_schulz"])
@pytest.mark.parametrize("shape", [(96, 24), (40, 40)])
def test_gram_polynomial_reproduces_the_matrix_iteration(method, shape):
    x, _ = with_condition(*shape, cond=100, seed=2)
    q = polar_inverse_root(x.mT @ x, quintic_schedule(method))
    torch.testing.assert_close(x @ q, msign(x, method), atol=1e-10, rtol=0)


@pytest.mark.parametrize("man", ["stiefel", "dgram"])
def test_gram_dual_equals_matrix_dual_in_float64(man):
    manifold = get_manifold(man)
    w, g = point_on(man, 120, 30, seed=5), momentum_like(120, 30, seed=5)
    noise = torch.randn(30, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    matrix = MatrixDual(manifold, w, g, partial(msign, dtype=torch.float64))
    gram = GramDual(manifold, w, g, quintic_schedule("polar_express"))
    for s in (-manifold.normal_coefficients(w, g), manifold.project(sym(noise))):
        (f1, g1, a1), (f2, g2, q) = matrix(s), gram(s)
        torch.testing.assert_close(f2, f1, rtol=1e-10, atol=0)
        torch.testing.assert_close(g2, g1, rtol=0, atol=1e-10 * g1.abs().max().item())
        torch.testing.assert_close(gram.primal(s, q), a1, rtol=0, atol=1e-10)


@pytest.mark.parametrize("man", ["stiefel", "dgram"])
def test_gram_form_solves_float32_problems_as_well_as_the_matrix_form(man):
    w, g = point_on(man, 128, 32, seed=6).float(), momentum_like(128, 32, seed=6).float()
    bound = dual_bound(w, g, man)
    for form in ("matrix", "gram"):
        r = solve_direction(w, g, man, dual_form=form, mode="improved")
        assert r.direction.dtype == torch.float32
        assert get_manifold(man).tangent_violation(w, r.direction) < 1e-6
        assert (g.double() * r.direction.double()).sum() >= 0.98 * bound, form


def test_dual_form_choices_are_checked():
    w, g = point_on("stiefel", 32, 8).float(), momentum_like(32, 8).float()
    with pytest.raises(ValueError, match="valid choices: matrix, gram"):
        solve_direction(w, g, "stiefel", dual_form="gramm")
    with pytest.raises(ValueError, match="msign_method='svd'"):
        solve_direction(w, g, "stiefel", dual_form="gram", msign_method="svd")


def test_dgram_solve_is_invariant_to_the_scale_of_w():
    # W and c W have the same tangent space, so the same direction.  The first L-BFGS step is
    # scaled by the columns' length; with a fixed first step, 30 W failed every line search and
    # returned its warm start (0.82 alignment where 0.97 was reachable, at 8x the evaluations).
    w, g = point_on("dgram", 192, 48, seed=7).float(), momentum_like(192, 48, seed=7).float()
    base = solve_direction(w, g, "dgram", steps=32, mode="improved")
    for c in (30.0, 0.03):
        scaled = solve_direction(c * w, g, "dgram", steps=32, mode="improved")
        assert scaled.evaluations <= 1.5 * base.evaluations
        torch.testing.assert_close(scaled.direction, base.direction, atol=2e-3 * base.direction.abs().max().item(), rtol=0)


def test_a_first_step_far_too_long_is_recovered_from():
    # alpha is only the first step; 1e4 fails its whole line search.  Without curvature pairs
    # the solver used to repeat that search until its cap; now it retries from below it.
    w, g = point_on("dgram", 96, 24, seed=8).float(), momentum_like(96, 24, seed=8).float()
    good = alignment(g, solve_direction(w, g, "dgram", steps=48, mode="improved").direction)
    warm = alignment(g, solve_direction(w, g, "dgram", steps=0, mode="improved").direction)
    far = alignment(g, solve_direction(w, g, "dgram", steps=48, alpha=1e4, mode="improved").direction)
    assert good > warm + 0.01            # there is something to recover
    assert far >= good - 0.005


def test_optimizer_group_key_dual_form_gives_the_same_steps_as_the_matrix_form(monkeypatch):
    from manifold_muon import ManifoldMuon
    evaluations = []
    gram_call = GramDual.__call__
    monkeypatch.setattr(GramDual, "__call__", lambda self, s: evaluations.append(1) or gram_call(self, s))
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(64, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    weights = {}
    for form in ("matrix", "gram"):
        p = torch.nn.Parameter(torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        opt = ManifoldMuon([{"params": [p], "manifold": "dgram", "mode": "improved", "dual_form": form,
                                "msign_dtype": "float64"}])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        weights[form] = p.detach().clone()
    assert evaluations                 # the key reached the solver ...
    assert (weights["matrix"] - weights["gram"]).abs().max() < 1e-6   # ... and changed only the route
    with pytest.raises(ValueError, match="valid choices: matrix, gram"):
        ManifoldMuon([torch.nn.Parameter(torch.zeros(4, 4))], dual_form="svd")
