"""msign against the SVD polar factor (float64 reference), with the tolerances written down."""
import pytest
import torch

from manifold_muon import msign
from conftest import matmul_dtypes, with_condition

SHAPES = [(48, 48), (96, 32), (32, 96)]
CONDS = [1.0, 10.0, 100.0, 1000.0]


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cond", CONDS)
def test_polar_express_default_float32_is_within_one_percent(shape, cond):
    x, polar = with_condition(*shape, cond)
    out = msign(x.float())
    assert out.dtype == torch.float32
    assert rel_err(out, polar) < 1e-2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cond", [1.0, 10.0, 100.0])
def test_polar_express_bf16_within_three_percent_up_to_cond_100(shape, cond):
    # bf16 input rounding erases directions whose singular value is below ~2^-8 of the
    # largest, so bf16 is only accurate for moderate conditioning: that is why the
    # default compute dtype is float32 and bf16 is opt-in.
    x, polar = with_condition(*shape, cond)
    assert rel_err(msign(x.float(), dtype=torch.bfloat16), polar) < 3e-2


def test_bf16_loses_accuracy_at_cond_1000_documenting_the_dtype_policy():
    x, polar = with_condition(96, 32, 1000.0)
    assert rel_err(msign(x.float(), dtype=torch.bfloat16), polar) > 3e-2
    assert rel_err(msign(x.float()), polar) < 1e-2


def test_batched_matches_per_matrix_and_keeps_leading_dims():
    x, polar = with_condition(40, 24, 100.0, batch=(2, 3))
    out = msign(x.float())
    assert out.shape == (2, 3, 40, 24)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], msign(x[i, j].float()), atol=1e-5, rtol=0)
    assert rel_err(out, polar) < 1e-2


def test_output_dtype_follows_input_and_svd_is_exact_in_float64():
    x, polar = with_condition(30, 20, 1000.0)
    assert msign(x, "svd").dtype == torch.float64
    assert rel_err(msign(x, "svd"), polar) < 1e-10
    assert msign(x.bfloat16()).dtype == torch.bfloat16


def test_newton_schulz_matches_torch_muon_iteration_and_is_not_converged():
    x, polar = with_condition(64, 32, 10.0)
    out = msign(x.float(), "newton_schulz", dtype=torch.bfloat16)
    s = torch.linalg.svdvals(out.double())
    # Keller Jordan's coefficients land singular values roughly in [0.7, 1.2], on purpose.
    assert 0.6 < s.min() < 0.95 and 1.0 < s.max() < 1.3
    from torch.optim._muon import _zeropower_via_newtonschulz
    ref = _zeropower_via_newtonschulz(x.float(), (3.4445, -4.7750, 2.0315), 5, 1e-7)
    torch.testing.assert_close(out, ref.float(), atol=2e-2, rtol=0)


def test_zero_input_maps_to_zero_and_bad_arguments_name_the_choices():
    assert torch.count_nonzero(msign(torch.zeros(5, 3))) == 0
    with pytest.raises(ValueError, match="polar_express, newton_schulz, svd"):
        msign(torch.ones(3, 3), "qr")
    with pytest.raises(ValueError, match="matrix"):
        msign(torch.ones(3))


@pytest.mark.parametrize("deviation", [1e-2, 1e-4, 0.2])
def test_newton_schulz_step_count_is_what_the_deviation_needs_and_no_more(deviation):
    from manifold_muon.optim.msign import newton_schulz_steps_needed
    tol = 4 * torch.finfo(torch.float64).eps
    steps = newton_schulz_steps_needed(deviation, tol)
    s = torch.tensor([1 - deviation, 1 + deviation], dtype=torch.float64)   # sigma^2 at the bound's ends
    for _ in range(steps - 1):
        s = s * (1.5 - 0.5 * s) ** 2
    assert (s - 1).abs().max() > 1e-16   # one step short: not yet converged ...
    s = s * (1.5 - 0.5 * s) ** 2
    assert (s - 1).abs().max() <= tol    # ... and the predicted count gets there


@pytest.mark.parametrize("shape", [(60, 20), (20, 60), (24, 24)])
@pytest.mark.parametrize("spread", [1e-3, 0.05, 2.0])   # near (Newton-Schulz) ... far (Polar Express)
def test_near_orthogonal_msign_matches_the_svd_polar_factor(shape, spread):
    from manifold_muon.optim.msign import msign_near_orthogonal
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(min(shape), min(shape), generator=gen, dtype=torch.float64))
    s = 1 + spread * (torch.rand(min(shape), generator=gen, dtype=torch.float64) - 0.5)
    x = (u * s) @ v.T
    x = x if shape[0] >= shape[1] else x.T
    reference = msign(x, "svd")
    out = msign_near_orthogonal(x)
    torch.testing.assert_close(out, reference, atol=1e-9 if spread < 1 else 1e-6, rtol=0)
    if spread < 1:   # Newton-Schulz ran the steps its bound asked for: orthonormal to float64 rounding
        tall = out if shape[0] >= shape[1] else out.T
        assert (tall.T @ tall - torch.eye(min(shape), dtype=torch.float64)).norm() < 1e-13
    torch.testing.assert_close(msign_near_orthogonal(x.float()), reference.float(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("method", ["polar_express", "newton_schulz"])
def test_bf16_without_bf16_units_is_bf16_rounding_in_float32_arithmetic(bf16_units, method):
    # On a CPU without bf16 units a bf16 matmul is a scalar fallback (75x the float32 one on
    # an AVX2 CPU); emulated, every product is float32 and rounded to bf16.
    x, polar = with_condition(96, 32, 10.0, batch=(3,))
    bf16_units(True)
    native, native_dtypes = matmul_dtypes(lambda: msign(x.float(), method, dtype=torch.bfloat16))
    bf16_units(False)
    emulated, emulated_dtypes = matmul_dtypes(lambda: msign(x.float(), method, dtype=torch.bfloat16))
    assert native_dtypes == {torch.bfloat16} and emulated_dtypes == {torch.float32}
    assert torch.equal(emulated, emulated.bfloat16().float())   # the values stay bf16 numbers
    # the same computation up to the order of float32 sums: a bf16 rounding apart, and no
    # closer to the polar factor than bf16 allows (float32 arithmetic alone would be 1e-6 away)
    assert rel_err(emulated, native.double()) < 2e-2
    if method == "polar_express":
        assert 2e-3 < rel_err(emulated, polar) < 1.5 * rel_err(native, polar)


def test_one_emulated_product_equals_the_bf16_product_where_sums_are_exact(bf16_units):
    # integers below 2^4: products and sums are exact in float32, so only the final rounding
    # to bf16 (8 bits) shows, and it must be the bf16 matmul's own
    from manifold_muon.optim.msign import _odd_quintic_iterations
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-15, 16, (2, 6, 40), generator=gen).float()
    native = _odd_quintic_iterations(x.bfloat16(), [(1.0, 3.0, 0.0)])
    emulated = _odd_quintic_iterations(x, [(1.0, 3.0, 0.0)], round_to=torch.bfloat16)
    assert not torch.equal(emulated, x + 3 * (x @ x.mT) @ x)   # rounding did happen ...
    assert torch.equal(emulated, native.float())                # ... exactly as bf16 does it


def test_bf16_emulation_can_be_forced_and_a_bad_choice_is_named(monkeypatch):
    from manifold_muon.optim import precision
    for value, expected in (("native", True), ("emulated", False)):
        monkeypatch.setenv("MANIFOLD_MUON_BF16", value)
        precision._probe_bf16_units.cache_clear()
        assert precision.native_bf16_matmul("cpu") is expected
    monkeypatch.setenv("MANIFOLD_MUON_BF16", "fast")
    precision._probe_bf16_units.cache_clear()
    with pytest.raises(ValueError, match="'fast'; valid choices: native, emulated"):
        precision.native_bf16_matmul("cpu")
    monkeypatch.delenv("MANIFOLD_MUON_BF16")
    precision._probe_bf16_units.cache_clear()
    assert precision.native_bf16_matmul("cuda") is True
