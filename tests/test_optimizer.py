"""ManifoldMuon against torch's own optimizers, and on a small model."""
import io

import pytest
import torch

from manifold_muon import ManifoldMuon, get_manifold, resolve
from manifold_muon.optim.precision import float32_matmul_precision, matmul_eps
from conftest import TinyGPT, markov_batches


def clone_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_adamw_group_matches_torch_adamw():
    shapes = [(8, 5), (5,), (3, 4, 2)]
    ours, ref = clone_params(shapes), clone_params(shapes)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = ManifoldMuon([{"params": ours, "algorithm": "adamw", **kw}])
    ref_opt = torch.optim.AdamW(ref, **kw)
    for step in range(10):
        set_grads(ours, step), set_grads(ref, step)
        opt.step(), ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)  # fp32 rounding tolerances


@pytest.mark.parametrize("shape", [(32, 16), (16, 32), (24, 24)])
def test_muon_group_matches_torch_muon_with_conventions_mapped(shape):
    # torch.optim.Muon: EMA momentum (= (1 - beta) x our sum form; msign removes the
    # factor), bf16 Newton-Schulz 5, "original" lr scaling sqrt(max(1, rows/cols)).
    ours, ref = clone_params([shape]), clone_params([shape])
    opt = ManifoldMuon([{"params": ours}], lr=0.02, momentum=0.95, weight_decay=0.1,
                       msign_method="newton_schulz", msign_dtype="bfloat16", adjust_lr="original")
    ref_opt = torch.optim.Muon(ref, lr=0.02, momentum=0.95, weight_decay=0.1, adjust_lr_fn="original")
    for step in range(10):
        set_grads(ours, step), set_grads(ref, step)
        opt.step(), ref_opt.step()
        # bf16 rounding of (1 - beta)-scaled inputs differs slightly; updates are 0.02-sized
        assert (ours[0] - ref[0]).norm() < 2e-3 * ref[0].norm()
    torch.testing.assert_close(opt.state[ours[0]]["momentum_buffer"] * 0.05,
                               ref_opt.state[ref[0]]["momentum_buffer"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("nesterov", [True, False])
def test_sum_style_momentum_by_hand(nesterov):
    p = clone_params([(6, 4)])
    opt = ManifoldMuon([{"params": p}], lr=0.1, momentum=0.9, nesterov=nesterov, msign_method="svd")
    w0, beta, buf = p[0].detach().clone(), 0.9, torch.zeros(6, 4)
    for step in range(3):
        set_grads(p, step)
        g = p[0].grad.clone()
        buf = beta * buf + g
        u, _, vt = torch.linalg.svd(g + beta * buf if nesterov else buf, full_matrices=False)
        w0 = w0 - 0.1 * (u @ vt)
        opt.step()
    torch.testing.assert_close(p[0].detach(), w0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("algorithm,manifold", [("muon", "stiefel"), ("muon", "dgram"), ("muon", "oblique"),
                                                ("muon", "spectral"), ("adamw", "stiefel"), ("adamw", "spectral")])
def test_manifold_groups_start_and_stay_on_their_manifold(algorithm, manifold):
    p = clone_params([(20, 8), (8, 20)])
    opt = ManifoldMuon([{"params": p, "algorithm": algorithm, "manifold": manifold, "lr": 0.05}])
    man = get_manifold(manifold)
    assert all(man.residual(x.detach()) < 1e-5 for x in p)  # projected at construction
    for step in range(5):
        set_grads(p, step)
        opt.step()
    assert all(man.residual(x.detach()) < 1e-5 for x in p)


@pytest.mark.parametrize("project_init", [True, False])
def test_a_group_added_after_construction_is_projected_as_the_constructor_projects(project_init):
    first, later = clone_params([(12, 6), (12, 6)])   # later: a layer unfrozen part way through training
    before = later.detach().clone()
    opt = ManifoldMuon([{"params": [first], "manifold": "stiefel"}], project_init=project_init)
    opt.add_param_group({"params": [later], "manifold": "dgram"})
    dgram = get_manifold("dgram")
    if project_init:
        assert dgram.residual(later.detach()) < 1e-5
        assert torch.equal(later.detach(), dgram.init(before))
    else:
        assert torch.equal(later.detach(), before) and dgram.residual(before) > 0.1


@pytest.mark.parametrize("manifold", ["none", "stiefel", "dgram"])
def test_conv_filters_step_as_their_flattened_matrix(manifold):
    # A conv weight (out, in, kh, kw) is the matrix (out, in*kh*kw): its step must be the step of
    # that matrix held as a 2D parameter (two of the same shape, so they are also batched).
    filters = clone_params([(6, 2, 3, 3), (6, 2, 3, 3)])
    matrices = [torch.nn.Parameter(f.detach().reshape(6, 18).clone()) for f in filters]
    opts = [ManifoldMuon([{"params": ps, "algorithm": "muon", "manifold": manifold, "mode": "fast", "lr": 0.05}])
            for ps in (filters, matrices)]
    for step in range(3):
        set_grads(filters, step)
        for f, m in zip(filters, matrices):
            m.grad = f.grad.reshape(6, 18).clone()
        for opt in opts:
            opt.step()
    for f, m in zip(filters, matrices):
        assert f.shape == (6, 2, 3, 3)
        torch.testing.assert_close(f.detach().reshape(6, 18), m.detach(), rtol=0, atol=1e-6)
        assert get_manifold(manifold).residual(f.detach().reshape(6, 18)) < 1e-5
    assert not torch.equal(filters[0].detach(), clone_params([(6, 2, 3, 3)])[0])   # they moved


def test_a_channels_last_conv_weight_is_refused_not_silently_left_unchanged():
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    opt = ManifoldMuon([{"params": [conv.weight], "algorithm": "muon"}])
    conv(torch.randn(1, 4, 6, 6)).sum().backward()
    with pytest.raises(ValueError, match="must be contiguous to be read as a matrix"):
        opt.step()


def test_step_never_writes_gradients_and_closure_returns_loss():
    model = TinyGPT()
    opt = ManifoldMuon(resolve(model, "hetero"))
    x, y = markov_batches(steps=1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        return loss

    loss = closure()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    assert isinstance(opt.step(closure), torch.Tensor)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert loss.item() > 0


def optimizer_tensors(opt) -> list[torch.Tensor]:
    """Copies of every tensor in the optimizer's state (momenta, duals, Adam moments, steps)."""
    return [v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]


def test_amp_grad_scaler_unscales_before_the_step_and_skips_a_step_with_an_inf_gradient():
    """fp16 training's GradScaler drives ManifoldMuon as any optimizer: the scaled run takes the
    unscaled run's steps, and a step whose gradients overflowed is skipped whole (weights,
    momenta and carried duals untouched) while the scale backs off."""
    batches = markov_batches(steps=3)

    def train(scaler, overflow_at=None):
        torch.manual_seed(0)
        model = TinyGPT()
        opt = ManifoldMuon(resolve(model, "hetero", mode="improved", dual_steps=5))   # few: quick; duals still carried
        before = []
        for step, (x, y) in enumerate(batches):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())).backward()
            if step == overflow_at:
                model.transformer.h[0].attn.c_attn.weight.grad[0, 0] = float("inf")
            before.append(({k: v.clone() for k, v in model.state_dict().items()}, optimizer_tensors(opt)))
            scaler.step(opt)
            scaler.update()
        return model.state_dict(), opt, before

    _, _, plain = train(torch.amp.GradScaler("cpu", enabled=False))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    skipped, opt, scaled = train(scaler, overflow_at=2)
    for (plain_weights, _), (scaled_weights, _) in zip(plain, scaled):   # before steps 0, 1 and 2
        for k, v in plain_weights.items():
            torch.testing.assert_close(scaled_weights[k], v, atol=1e-5, rtol=0, msg=k)
    assert scaler.get_scale() == 2.0 ** 11
    weights, state = scaled[2]
    assert all(torch.equal(skipped[k], v) for k, v in weights.items())
    now = optimizer_tensors(opt)
    assert len(now) == len(state) > 0 and all(torch.equal(a, b) for a, b in zip(now, state))


def test_lr_schedulers_drive_every_group():
    model = TinyGPT()
    opt = ManifoldMuon(resolve(model, "hetero"))
    base = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    opt.step(), sched.step(), sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * 0.25 for b in base])
    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10).step()


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _train(model, opt, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_hetero_trains_on_manifold_deterministically_and_resumes_identically():
    # 80 steps: the loss halves by step 60 (9.1 -> 3.2 over the first and last 20 here); 200
    # steps took twice the time and showed nothing more
    batches = markov_batches(steps=80)

    def run(seed=0):
        torch.manual_seed(seed)
        model = TinyGPT()
        # 32 dual iterations: this test is about training behaviour, not solver quality
        return model, ManifoldMuon(resolve(model, "hetero", mode="improved", dual_steps=32))

    model, opt = run()
    losses = _train(model, opt, batches[:60])
    snapshot = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, snapshot)
    losses += _train(model, opt, batches[60:])

    # loss goes down, weights stay on their manifolds
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    for group in opt.param_groups:
        man = get_manifold(group["manifold"])
        for p in group["params"]:
            assert man.residual(p.detach()) < 1e-4, (group["names"], man.name)

    # deterministic for a seed (the first 20 steps, to keep the suite fast)
    model2, opt2 = run()
    assert _train(model2, opt2, batches[:20]) == losses[:20]

    # continues identically after a state_dict round trip (weights_only load)
    snapshot.seek(0)
    ckpt = torch.load(snapshot, weights_only=True)
    model3, opt3 = run(seed=1)  # different init: everything must come from the checkpoint
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    assert _train(model3, opt3, batches[60:]) == losses[60:]


def test_bad_groups_name_the_valid_choices():
    p = clone_params([(4, 4), (4,)])
    with pytest.raises(ValueError, match="muon, adamw"):
        ManifoldMuon([{"params": p[:1], "algorithm": "sgd"}])
    with pytest.raises(ValueError, match="valid choices: none, stiefel"):
        ManifoldMuon([{"params": p[:1], "manifold": "sphere"}])
    # a 1D weight is most likely FSDP1's flattened view: the message names the way out
    # (and says how a model's biases and norms get their own group)
    with pytest.raises(ValueError, match=r"needs matrices \(2D, or conv filters.*as resolve\(model, "
                                         r"preset_or_rules\) does.*FSDP2's fully_shard"):
        ManifoldMuon([{"params": p[1:], "algorithm": "muon"}])
    with pytest.raises(TypeError, match="unknown ManifoldMuon option"):
        ManifoldMuon(p[:1], learning_rate=0.1)
    with pytest.raises(ValueError, match="msign_steps must be an integer >= 1"):
        ManifoldMuon(p[:1], msign_steps=0)
    with pytest.raises(ValueError, match="mode='fast' takes no dual steps, got dual_steps=8"):
        ManifoldMuon(p[:1], manifold="stiefel", mode="fast", dual_steps=8)


@pytest.mark.parametrize("mode,dtype", [("improved", torch.bfloat16), ("fast", torch.bfloat16), ("paper", torch.bfloat16),
                                        ("improved", "float32")])
def test_plain_muon_takes_bf16_unless_told_and_the_groups_msign_steps(mode, dtype):
    from manifold_muon import msign
    for steps in (None, 3):
        w = torch.nn.Parameter(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)))
        w.grad = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
        before = w.detach().clone()
        told = {"msign_dtype": dtype} if isinstance(dtype, str) else {}
        ManifoldMuon([w], mode=mode, msign_steps=steps, momentum=0.0, nesterov=False, lr=0.1, **told).step()
        expected = before - 0.1 * msign(w.grad, "polar_express", steps, dtype=getattr(torch, dtype) if told else dtype)
        torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)


def test_lr_and_weight_decay_default_per_algorithm_unless_given():
    p = clone_params([(4, 4), (4,)])
    opt = ManifoldMuon([{"params": p[:1]}, {"params": p[1:], "algorithm": "adamw"}])
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.02, 0.0), (1e-3, 0.01)]
    opt = ManifoldMuon([{"params": p[:1]}, {"params": p[1:], "algorithm": "adamw", "lr": 0.3}], lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.3]


@pytest.fixture
def restores_matmul_precision():
    """Give the test a free hand with the global float32 matmul settings, then put them back."""
    legacy = torch.get_float32_matmul_precision()
    per_backend = {name: getattr(torch.backends, name).matmul.fp32_precision for name in ("cuda", "mkldnn")}
    yield
    torch.set_float32_matmul_precision(legacy)
    for name, value in per_backend.items():
        getattr(torch.backends, name).matmul.fp32_precision = value


@pytest.mark.parametrize("caller", ["legacy high", "legacy medium", "per-backend", "default"])
def test_float32_matmul_precision_pins_ieee_consistently_and_restores_the_callers_settings(
        caller, restores_matmul_precision):
    if caller.startswith("legacy"):
        torch.set_float32_matmul_precision(caller.split()[1])
    elif caller == "per-backend":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [b.fp32_precision for b in backends]
    seen = {}
    with pytest.raises(KeyError):  # restored on an exception too
        with float32_matmul_precision():
            seen["per-backend"] = [b.fp32_precision for b in backends]
            # cuBLAS reads this before every float32 matmul; torch raises if the legacy and
            # per-backend settings disagree, so the pin must keep them consistent.
            seen["cublas tf32"] = torch.backends.cuda.matmul.allow_tf32
            seen["legacy"] = torch.get_float32_matmul_precision()
            raise KeyError
    assert seen == {"per-backend": ["ieee", "ieee"], "cublas tf32": False, "legacy": "highest"}
    assert [b.fp32_precision for b in backends] == before
    if caller.startswith("legacy"):
        assert torch.get_float32_matmul_precision() == caller.split()[1]
        assert torch.backends.cuda.matmul.allow_tf32  # readable: consistent again


@pytest.mark.parametrize("manifold", ["stiefel", "dgram"])
def test_constraints_hold_to_float32_when_the_caller_lowers_float32_matmuls(manifold, restores_matmul_precision):
    # "medium" lets oneDNN run float32 matmuls in bf16 on CPUs with bf16 units (TF32 on GPUs
    # is the same hazard at "high"); the optimizer must not inherit that for its constraints.
    a, b = torch.randn(256, 256, dtype=torch.float64), torch.randn(256, 256, dtype=torch.float64)
    torch.set_float32_matmul_precision("medium")
    lowered = ((a.float() @ b.float()).double() - a @ b).norm() / (a @ b).norm()
    if lowered < 1e-5:
        pytest.skip(f"this CPU keeps float32 matmuls at float32 under 'medium' (error {lowered:.1e})")
    params = clone_params([(64, 16), (16, 64)])
    opt = ManifoldMuon([{"params": params, "manifold": manifold, "mode": "fast"}], lr=0.05)
    opt.collect_stats = True
    for step in range(10):
        set_grads(params, step)
        opt.step()
    for name, stats in opt.stats.items():
        assert stats["residual"] < 1e-6, (name, stats)        # was 8e-5 with the caller's bf16 matmuls
        assert stats["violation_end"] < 1e-5, (name, stats)   # was 1e-3
    assert torch.get_float32_matmul_precision() == "medium"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


def test_library_functions_follow_an_enclosing_choice_and_default_to_ieee(monkeypatch, restores_matmul_precision):
    import manifold_muon.optim.manifolds as manifolds
    seen, original = [], manifolds.msign_near_orthogonal
    monkeypatch.setattr(manifolds, "msign_near_orthogonal",
                        lambda x, **kw: seen.append(torch.backends.cuda.matmul.fp32_precision) or original(x, **kw))
    stiefel, w = get_manifold("stiefel"), torch.randn(12, 4)
    torch.set_float32_matmul_precision("high")      # the caller's global choice does not reach the library ...
    stiefel.retract(w)
    with float32_matmul_precision("high"):          # ... an explicit block does
        stiefel.retract(w)
    assert seen == ["ieee", "tf32"]
    assert torch.get_float32_matmul_precision() == "high"
    with float32_matmul_precision("high"):          # TF32 on a GPU sets how far the retraction refines
        assert matmul_eps(torch.float32, torch.device("cuda")) == 2.0**-10
        assert matmul_eps(torch.float32, torch.device("cpu")) == torch.finfo(torch.float32).eps
    torch.set_float32_matmul_precision("highest")
    assert matmul_eps(torch.float32, torch.device("cuda")) == torch.finfo(torch.float32).eps
    with pytest.raises(ValueError, match="unknown matmul precision .tf32.; valid choices: highest, high, medium"):
        ManifoldMuon(clone_params([(4, 4)]), matmul_precision="tf32")


def test_a_groups_lowered_matmul_precision_loosens_the_residual_to_its_level(restores_matmul_precision):
    torch.set_float32_matmul_precision("medium")
    a, b = torch.randn(256, 256, dtype=torch.float64), torch.randn(256, 256, dtype=torch.float64)
    if ((a.float() @ b.float()).double() - a @ b).norm() / (a @ b).norm() < 1e-5:
        pytest.skip("this CPU keeps float32 matmuls at float32 under 'medium'")
    torch.set_float32_matmul_precision("highest")
    residual = {}
    for level in ("highest", "medium"):
        params = clone_params([(64, 16)])
        opt = ManifoldMuon([{"params": params, "manifold": "stiefel", "mode": "fast", "matmul_precision": level}],
                           lr=0.05)
        opt.collect_stats = True
        for step in range(10):
            set_grads(params, step)
            opt.step()
        residual[level] = max(s["residual"] for s in opt.stats.values())
    assert residual["highest"] < 1e-6 < residual["medium"] < 1e-3, residual   # bf16-level, still on the manifold
    assert torch.get_float32_matmul_precision() == "highest"


def test_a_checkpoint_saved_before_a_group_key_existed_loads_with_its_default():
    params = clone_params([(8, 4)])
    opt = ManifoldMuon([{"params": params, "manifold": "stiefel"}])
    set_grads(params, 0)
    opt.step()
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["matmul_precision"], group["msign_steps"]
    fresh = ManifoldMuon([{"params": params, "manifold": "stiefel"}], project_init=False)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["matmul_precision"] == "highest" and fresh.param_groups[0]["msign_steps"] is None
    set_grads(params, 1)
    fresh.step()
