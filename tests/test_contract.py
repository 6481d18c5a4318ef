"""The torch.optim contract, as one generic battery run over configurations that cover every code
path (algorithm x manifold x mode, not their whole product), in the style of PyTorch's own
``test/test_optim.py``: a new manifold or mode added to ``CONFIGS`` gets every check."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from manifold_muon import ManifoldMuon, get_manifold, manifold_direction

# (algorithm, manifold, mode): each code path of the step at least once
CONFIGS = [
    ("muon", "none", "improved"),       # plain Muon
    ("muon", "stiefel", "improved"),    # L-BFGS dual solve, carried duals
    ("muon", "stiefel", "fast"),        # one msign and a repair
    ("muon", "dgram", "paper"),         # the reference's dual ascent
    ("muon", "dgram", "improved"),
    ("muon", "oblique", "fast"),
    ("muon", "spectral", "improved"),   # plain direction, SVD retraction
    ("adamw", "none", "improved"),      # torch's AdamW
    ("adamw", "stiefel", "improved"),   # AdamW then a retraction
]
IDS = [f"{a}-{m}-{mode}" for a, m, mode in CONFIGS]


class Net(nn.Module):
    """A tall, a wide and a square matrix, a bias: every orientation a step meets."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tall = nn.Parameter(torch.randn(12, 6, generator=g) / 3)
        self.wide = nn.Parameter(torch.randn(6, 12, generator=g) / 3)
        self.square = nn.Parameter(torch.randn(6, 6, generator=g) / 3)
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        return torch.tanh(torch.tanh(x @ self.tall + self.bias) @ self.wide @ self.tall) @ self.square


def groups(net, algorithm, manifold, mode, **extra):
    return [{"params": [net.tall, net.wide, net.square], "names": ["tall", "wide", "square"],
             "algorithm": algorithm, "manifold": manifold, "mode": mode, "lr": 0.02, **extra},
            {"params": [net.bias], "names": ["bias"], "algorithm": "adamw", "lr": 1e-2}]


def loss_at(net, step):
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(100 + step))
    return net(x).pow(2).mean()


def take_steps(net, opt, start, n):
    for step in range(start, start + n):
        opt.zero_grad()
        loss_at(net, step).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def fresh(config):
    torch.manual_seed(0)
    net = Net()
    return net, ManifoldMuon(groups(net, *config))


def assert_bitwise(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b)), [float((x - y).abs().max()) for x, y in zip(a, b)]


COPIERS = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o)),
           "torch.save": lambda o: torch.load(_saved(o), weights_only=False)}


@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_deepcopy_and_pickle_round_trips_step_bitwise_as_the_original(config, copier):
    net, opt = fresh(config)
    take_steps(net, opt, 0, 2)
    opt.nonfinite = "raise"
    twin_net, twin_opt = copy.deepcopy(net), COPIERS[copier](opt)
    assert twin_opt.nonfinite == "raise" and twin_opt.project_init and not twin_opt.collect_stats
    assert twin_opt.process_group is None   # a communicator is never pickled: the default group
    _rebind(twin_opt, opt, twin_net, net)
    assert_bitwise(take_steps(net, opt, 2, 2), take_steps(twin_net, twin_opt, 2, 2))


def _saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _rebind(copied_opt, opt, copied_net, net):
    """Point a copied optimizer at the copied model's parameters: a copy of an optimizer alone
    holds copies of the parameters, which no model uses."""
    mapping = dict(zip(map(id, net.parameters()), copied_net.parameters()))
    copies = [p for g in copied_opt.param_groups for p in g["params"]]
    originals = [p for g in opt.param_groups for p in g["params"]]
    state = {mapping[id(o)]: copied_opt.state[c] for c, o in zip(copies, originals) if c in copied_opt.state}
    for group, original_group in zip(copied_opt.param_groups, opt.param_groups):
        group["params"] = [mapping[id(p)] for p in original_group["params"]]
    copied_opt.state.clear()
    copied_opt.state.update(state)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_fresh_optimizer_loading_a_state_dict_resumes_bit_for_bit(config):
    net, opt = fresh(config)
    take_steps(net, opt, 0, 3)
    saved_model, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    straight = take_steps(net, opt, 3, 3)
    resumed_net = Net()
    resumed_net.load_state_dict(saved_model)
    resumed = ManifoldMuon(groups(resumed_net, *config))   # the default project_init, as trainers do
    resumed.load_state_dict(saved_opt)
    assert_bitwise(straight, take_steps(resumed_net, resumed, 3, 3))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_refused_group_leaves_the_optimizer_as_it_was(config):
    net, opt = fresh(config)
    extra = nn.Parameter(torch.randn(5))
    before = [dict(g) for g in opt.param_groups]
    for bad, error in (({"params": [extra], "algorithm": "muon"}, ValueError),
                       ({"params": [extra], "algorithm": "adamw", "mode": "turbo"}, ValueError),
                       ({"params": [extra], "algorithm": "adamw", "momentun": 0.9}, TypeError)):
        with pytest.raises(error):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == len(before)
    take_steps(net, opt, 0, 1)   # the optimizer still steps


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_unknown_and_unsupported_keys_are_refused_naming_the_valid_ones(config):
    net, _ = fresh(config)
    with pytest.raises(TypeError, match=r"unknown ManifoldMuon option 'momentun' \(did you mean 'momentum'\?\); valid"):
        ManifoldMuon(groups(net, *config, momentun=0.9))
    for key in ("maximize", "foreach", "fused", "capturable", "differentiable"):
        with pytest.raises(TypeError, match=f"unknown ManifoldMuon option '{key}'"):
            ManifoldMuon(groups(net, *config, **{key: True}))
        with pytest.raises(TypeError, match=f"unknown ManifoldMuon option '{key}'"):
            ManifoldMuon(net.parameters(), **{key: True})


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_complex_and_integer_parameters_are_refused(config):
    algorithm, manifold, mode = config
    for p, dtype in ((nn.Parameter(torch.randn(4, 4, dtype=torch.complex64)), "complex64"),
                     (torch.zeros(4, 4, dtype=torch.int64), "int64")):
        with pytest.raises(TypeError, match=dtype):
            ManifoldMuon([{"params": [p], "algorithm": algorithm, "manifold": manifold, "mode": mode}])


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_zero_size_weights_step(config, shape):
    algorithm, manifold, mode = config
    empty = nn.Parameter(torch.zeros(shape))
    opt = ManifoldMuon([{"params": [empty], "algorithm": algorithm, "manifold": manifold, "mode": mode}])
    empty.grad = torch.zeros(shape)
    opt.step()
    assert empty.shape == shape


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_nonfinite_gradient_changes_nothing_and_names_the_parameter(config):
    net, opt = fresh(config)
    take_steps(net, opt, 0, 1)
    params, state = [p.detach().clone() for p in net.parameters()], copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_at(net, 5).backward()
    net.wide.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"skipped this step whole: non-finite gradient in 1 parameter\(s\): wide"):
        opt.step()
    assert_bitwise(params, [p.detach() for p in net.parameters()])
    assert str(opt.state_dict()) == str(state)
    strict = ManifoldMuon(groups(net, *config), nonfinite="raise")
    net.wide.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="wide"):
        strict.step()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_bad_hyperparameters_are_refused_naming_the_key(config):
    net, _ = fresh(config)
    for bad, match in (({"betas": (1.0, 0.0)}, r"betas\[0\] must be in \[0, 1\)"),
                       ({"betas": (0.9, -0.1)}, r"betas\[1\]"), ({"eps": -1.0}, "eps must be"),
                       ({"lr": torch.tensor([0.1, 0.2])}, "lr must be a number or a one-element tensor"),
                       ({"momentum": 1.0}, "momentum must be in"), ({"weight_decay": float("nan")}, "weight_decay"),
                       ({"dual_steps": -1}, "dual_steps"), ({"nesterov": "yes"}, "nesterov")):
        with pytest.raises((ValueError, TypeError), match=match):
            ManifoldMuon(groups(net, *config, **bad))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_one_element_tensor_lr_steps_as_the_number_does(config):
    net, opt = fresh(config)
    twin = copy.deepcopy(net)
    twin_opt = ManifoldMuon(groups(twin, *config))
    for group in twin_opt.param_groups:
        group["lr"] = torch.tensor(group["lr"])
    # torch's AdamW takes another arithmetic path for a tensor lr: equal to rounding, not bitwise
    for a, b in zip(take_steps(net, opt, 0, 2), take_steps(twin, twin_opt, 0, 2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_adamw_steps_saved_as_numbers_load_and_step():
    net, opt = fresh(("adamw", "none", "improved"))
    take_steps(net, opt, 0, 2)
    state = opt.state_dict()
    for s in state["state"].values():
        s["step"] = float(s["step"])   # as older checkpoints and other tools save them
    resumed = ManifoldMuon(groups(net, "adamw", "none", "improved"))
    resumed.load_state_dict(state)
    take_steps(net, resumed, 2, 1)
    assert all(torch.is_tensor(s["step"]) and s["step"] == 3 for s in resumed.state.values())


def test_momentum_cycling_schedulers_drive_adamw_betas_and_leave_muon_momentum_as_documented():
    net, opt = fresh(("muon", "stiefel", "fast"))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10, base_momentum=0.8, max_momentum=0.9)
    seen = set()
    for step in range(5):
        take_steps(net, opt, step, 1)
        sched.step()
        seen.add(opt.param_groups[1]["betas"][0])
        assert opt.param_groups[0]["momentum"] == 0.95
    assert len(seen) > 1


# ---- continuity: a tiny change of the input moves the step by a tiny amount -----------------------

def _direction_change(manifold, mode, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = get_manifold(manifold).init(torch.randn(*shape, generator=g, dtype=torch.float64)).float()
    u, _, v = torch.linalg.svd(torch.randn(*shape, generator=g, dtype=torch.float64), full_matrices=False)
    spectrum = torch.logspace(0, -3, min(shape), dtype=torch.float64)   # condition number 1e3
    grad = (u * spectrum) @ v
    grad = grad.float()
    base = manifold_direction(w, grad, manifold, mode=mode)
    moved = []
    for dw, dg in ((1e-7, 0.0), (0.0, 1e-7)):
        noise = torch.randn(shape, generator=g)
        w2 = w + dw * w.norm() * noise / noise.norm()
        g2 = grad + dg * grad.norm() * noise / noise.norm()
        moved.append(float((manifold_direction(w2, g2, manifold, mode=mode) - base).norm() / base.norm()))
    return max(moved)


#: improved mode stops each matrix at a scale-free tolerance, so its answer moves with the input
#: by up to that tolerance's effect; every other path is a fixed computation.
CONTINUITY = {"fast": 1e-4, "improved": 2e-3}


@pytest.mark.parametrize("mode", ["improved", "fast"])
@pytest.mark.parametrize("manifold,shape", [("stiefel", (24, 8)), ("dgram", (24, 8)), ("dgram", (8, 24)),
                                            ("dgram", (12, 12)), ("oblique", (24, 8)), ("stiefel", (12, 12))])
def test_the_direction_is_continuous_in_its_input(mode, manifold, shape):
    square_dgram = manifold == "dgram" and shape[0] == shape[1]   # degenerate: a deterministic repaired start
    limit = 1e-4 if square_dgram else CONTINUITY[mode]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert max(_direction_change(manifold, mode, shape, seed) for seed in (0, 1)) <= limit


def test_a_momentum_with_zero_rows_gives_a_continuous_direction():
    g = torch.Generator().manual_seed(3)
    w = get_manifold("dgram").init(torch.randn(32, 8, generator=g, dtype=torch.float64)).float()
    grad = torch.randn(32, 8, generator=g)
    grad[::2] = 0   # rows a sparse embedding's momentum never touched
    base = manifold_direction(w, grad, "dgram")
    moved = manifold_direction(w * (1 + 1e-7), grad, "dgram")
    assert float((moved - base).norm() / base.norm()) <= CONTINUITY["improved"]
