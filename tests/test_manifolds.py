"""The contract every manifold keeps, in float64 (geoopt-style shared tests)."""
import pytest
import torch

from manifold_muon import MANIFOLDS, get_manifold, msign
from conftest import point_on

CONSTRAINED = ["stiefel", "dgram", "dgram-svd", "dgram-capped", "oblique"]
SHAPES = [(40, 16), (16, 40), (24, 24)]


def random(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", list(MANIFOLDS))
@pytest.mark.parametrize("shape", SHAPES)
def test_init_lands_on_the_manifold(name, shape):
    man = get_manifold(name)
    w = man.init(3.0 * random(shape))
    assert man.residual(w) < 1e-10
    if name == "spectral":
        assert torch.linalg.matrix_norm(w, 2) <= 1 + 1e-10


@pytest.mark.parametrize("name", list(MANIFOLDS))
@pytest.mark.parametrize("shape", SHAPES)
def test_retraction_lands_on_manifold_and_is_identity_there(name, shape):
    man = get_manifold(name)
    w = man.init(random(shape))
    torch.testing.assert_close(man.retract(w), w, atol=1e-9, rtol=0)
    moved = man.retract(w + 0.05 * random(shape, seed=1))
    assert man.residual(moved) < 1e-9


def test_residual_detects_points_off_each_manifold():
    w = random((30, 10))
    for name in CONSTRAINED:
        assert get_manifold(name).residual(w) > 1e-2, name
    assert get_manifold("spectral").residual(5 * w / torch.linalg.matrix_norm(w, 2)) == pytest.approx(4.0)


@pytest.mark.parametrize("name", CONSTRAINED)
@pytest.mark.parametrize("shape", SHAPES)
def test_tangent_projection_satisfies_constraint_and_is_idempotent(name, shape):
    man = get_manifold(name)
    w = point_on("dgram" if name.startswith("dgram") else name, *shape)
    g = random(shape, seed=2)
    t = man.tangent_project(w, g)
    assert man.tangent_violation(w, t) < 1e-12
    torch.testing.assert_close(man.tangent_project(w, t), t, atol=1e-12, rtol=0)
    # Orthogonal projection: the removed part is normal, so orthogonal to every tangent vector.
    assert abs(((g - t) * t).sum()) < 1e-9 * g.norm() ** 2


def test_dgram_svd_free_retraction_is_identity_on_unsorted_column_norms_where_svd_form_permutes():
    w = point_on("dgram", 40, 6, colnorm_range=(0.3, 3.0), seed=3)
    norms = w.norm(dim=0)
    assert not torch.all(norms[:-1] >= norms[1:])  # unsorted, as after training
    torch.testing.assert_close(get_manifold("dgram").retract(w), w, atol=1e-9, rtol=0)
    svd_form = get_manifold("dgram-svd").retract(w)
    torch.testing.assert_close(svd_form.norm(dim=0), norms.sort(descending=True).values, atol=1e-9, rtol=0)
    assert (svd_form - w).norm() > 0.1


@pytest.mark.parametrize("offset", [0.1, 1e-3])   # far (Polar Express) and near (Newton-Schulz)
def test_dgram_retraction_is_polar_of_unit_columns_times_column_norms(offset):
    w = point_on("dgram", 20, 8, colnorm_range=(0.05, 3.0), seed=4) + offset * random((20, 8))
    norms = w.norm(dim=0, keepdim=True)
    expected = msign(w / norms, "svd") * norms
    torch.testing.assert_close(get_manifold("dgram").retract(w), expected, atol=1e-9, rtol=0)


def test_capped_dgram_clips_long_columns_to_the_cap_and_bounds_sigma_max():
    from manifold_muon.optim.manifolds import DGram
    w = point_on("dgram", 40, 6, colnorm_range=(0.2, 3.0), seed=5)
    norms = w.norm(dim=0)
    assert (norms > 1).any() and (norms < 1).any()
    capped = get_manifold("dgram-capped")
    assert capped.residual(w) > 0.1                       # over the cap: off the set
    out = capped.retract(w)
    torch.testing.assert_close(out.norm(dim=0), norms.clamp(max=1.0), atol=1e-9, rtol=0)
    short = norms < 1
    torch.testing.assert_close(out[:, short], w[:, short], atol=1e-9, rtol=0)   # short columns untouched
    assert torch.linalg.matrix_norm(out, 2) <= 1 + 1e-9 and capped.residual(out) < 1e-9
    assert torch.linalg.matrix_norm(DGram(cap=2.5).retract(w), 2) <= 2.5 + 1e-9
    loose = get_manifold("dgram-cap2").retract(w)
    torch.testing.assert_close(loose.norm(dim=0), norms.clamp(max=2.0), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="cap must be a positive"):
        DGram(cap=0.0)


@pytest.mark.parametrize("shape", [(40, 3), (3, 40)])
def test_soft_cap_shrinks_only_the_overshoot_by_lr_times_decay_and_keeps_the_columns_orthogonal(shape):
    from manifold_muon.optim.manifolds import DGram
    soft = DGram(cap=1.0, cap_decay=0.1)
    tall = point_on("dgram", 40, 3, seed=6)
    tall = tall / tall.norm(dim=0) * torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64)
    w = tall if shape == (40, 3) else tall.T
    torch.testing.assert_close(soft.retract(w), w, atol=1e-9, rtol=0)   # the retraction does not clip ...
    assert soft.residual(w) < 1e-9                                        # ... the set is DGram itself
    out = soft.decay_toward_bound(w, lr=2.5)                              # keeps 1 - 2.5 * 0.1 of the overshoot
    out_tall = out if shape == (40, 3) else out.T
    expected = torch.tensor([0.5, 1.375, 2.5], dtype=torch.float64)
    torch.testing.assert_close(out_tall.norm(dim=0), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out_tall / expected, tall / tall.norm(dim=0), atol=1e-12, rtol=0)
    hard = soft.decay_toward_bound(tall, lr=50.0)                         # lr d >= 1: the hard cap, not past it
    torch.testing.assert_close(hard.norm(dim=0), torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.linalg.matrix_norm(soft.init(w), 2) <= 1 + 1e-9                # init starts within the cap
    assert get_manifold("dgram-capped").decay_toward_bound(w, lr=2.5) is w      # hard caps: identity
    for bad in ({"cap_decay": 0.1}, {"cap": 1.0, "cap_decay": 0.0}):
        with pytest.raises(ValueError, match="cap_decay must be a positive rate"):
            DGram(**bad)


def test_spectral_retraction_clips_singular_values_only_above_one():
    u, _ = torch.linalg.qr(random((12, 5)))
    v, _ = torch.linalg.qr(random((5, 5), seed=1))
    s = torch.tensor([3.0, 1.5, 0.9, 0.5, 0.1], dtype=torch.float64)
    out = get_manifold("spectral").retract((u * s) @ v.T)
    torch.testing.assert_close(torch.linalg.svdvals(out), s.clamp(max=1.0), atol=1e-10, rtol=0)


def test_stack_of_matrices_is_handled_per_matrix():
    man = get_manifold("stiefel")
    ws = man.init(random((3, 20, 8)))
    assert ws.shape == (3, 20, 8) and man.residual(ws).shape == (3,)
    for i in range(3):
        torch.testing.assert_close(ws[i], man.init(random((3, 20, 8))[i]), atol=1e-10, rtol=0)


def test_manifolds_are_immutable_and_unknown_names_list_the_choices():
    with pytest.raises(Exception):
        get_manifold("stiefel").name = "dgram"
    with pytest.raises(ValueError, match="none, stiefel, dgram, dgram-svd, oblique, spectral"):
        get_manifold("grassmann")


def test_a_registered_manifold_is_usable_by_name_in_rules_and_checkpoints(tmp_path):
    from torch import nn
    from manifold_muon import DGram, ManifoldMuon, Rule, register_manifold, resolve
    from manifold_muon.optim.manifolds import MANIFOLDS
    try:
        c2 = register_manifold(DGram(name="dgram-c2-test", cap=2.0))
        assert register_manifold(DGram(name="dgram-c2-test", cap=2.0)) == c2  # same object again: fine
        with pytest.raises(ValueError, match="is taken by"):
            register_manifold(DGram(name="dgram-c2-test", cap=3.0))
        with pytest.raises(ValueError, match="is taken by"):
            register_manifold(DGram(name="stiefel"))
        model = nn.Sequential(nn.Linear(8, 24, bias=False))
        opt = ManifoldMuon(resolve(model, [Rule(r"weight", "muon", "dgram-c2-test", lr=0.1)]))
        for _ in range(30):
            model(torch.randn(4, 8)).pow(2).sum().mul(-1).backward()   # pushes the weights to grow
            opt.step()
            opt.zero_grad()
        assert torch.linalg.matrix_norm(model[0].weight.detach().double(), 2) <= 2.0 + 1e-5
        torch.save(opt.state_dict(), tmp_path / "opt.pt")
        torch.load(tmp_path / "opt.pt", weights_only=True)
    finally:
        MANIFOLDS.pop("dgram-c2-test", None)
