"""Shared helpers: test matrices, an independent dual-bound certificate, tiny models."""
import contextlib
import io
import json
import math
import runpy
import socket
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from manifold_muon.optim.manifolds import get_manifold
from manifold_muon.lab.prepare import sha256_file

VOCAB = 96   # the vocabulary of data_dir's token stream


def free_port() -> int:
    """A TCP port free now on localhost, so parallel or repeated multi-process runs cannot collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_condition(m, n, cond, *, batch=(), dtype=torch.float64, seed=0):
    """A matrix (or stack) with log-spaced singular values from 1 down to 1/cond, and its polar factor."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=gen, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=gen, dtype=dtype))
    s = torch.logspace(0, -math.log10(cond), k, dtype=dtype)
    return (u * s) @ v.mT, u @ v.mT


def point_on(manifold, m, n, *, seed=0, colnorm_range=(0.3, 3.0), batch=()):
    """A float64 point on ``manifold``; DGram column norms uniform in ``colnorm_range``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*batch, m, n, generator=gen, dtype=torch.float64)
    if manifold == "dgram":
        k = min(m, n)
        norms = torch.empty(*batch, k, dtype=torch.float64).uniform_(*colnorm_range, generator=gen)
        q = get_manifold("stiefel").init(w)
        return q * norms.unsqueeze(-2) if m >= n else q * norms.unsqueeze(-1)
    return get_manifold(manifold).init(w)


def momentum_like(m, n, *, seed=0, rank=8, noise=0.3, scale=1.0):
    """A gradient-like matrix: a low-rank signal plus noise (a skewed spectrum, as real momenta)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    g = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen, dtype=torch.float64)
    return scale * (g + noise * torch.randn(m, n, generator=gen, dtype=torch.float64))


def dual_bound(w, g, manifold, iters=200):
    """``min_S ||G + W S||_*`` over symmetric S = P(S), by L-BFGS on a smoothed nuclear norm in
    float64 with continuation.  Any S gives a valid upper bound on <G, A> for feasible A
    (weak duality), so this is a certificate whatever the optimiser's accuracy."""
    man = get_manifold(manifold)
    w, g = w.double(), g.double()
    if w.shape[-2] < w.shape[-1]:
        w, g = w.mT, g.mT
    t = torch.zeros(w.shape[-1], w.shape[-1], dtype=torch.float64, requires_grad=True)
    for mu in (1e-1, 1e-2, 1e-3, 1e-4):
        opt = torch.optim.LBFGS([t], lr=1, max_iter=iters, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50)

        def closure():
            opt.zero_grad()
            s = torch.linalg.svdvals(g + w @ man.project(t + t.mT))
            value = (s.pow(2) + mu * mu).sqrt().sum()
            value.backward()
            return value

        opt.step(closure)
    with torch.no_grad():
        return torch.linalg.svdvals(g + w @ man.project(t + t.mT)).sum().item()


# ---- tiny models with the three naming conventions ---------------------------------------------
class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.d = d

    def forward(self, x):
        q, k, v = self.c_attn(x).split(self.d, dim=-1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y)


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.c_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return self.c_proj(nn.functional.gelu(self.c_fc(x)))


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(d), _Attn(d), nn.LayerNorm(d), _MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """nanoGPT parameter names, tied embedding and head."""

    def __init__(self, vocab=32, d=16, layers=2, ctx=16):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(ctx, d),
            h=nn.ModuleList([_Block(d) for _ in range(layers)]), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class TinyLlama(nn.Module):
    """Llama parameter names: q/k/v/o_proj and gate/up/down_proj, RMSNorm."""

    def __init__(self, vocab=32, d=16, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, nn.Linear(d, d, bias=False))
            layer.mlp = nn.Module()
            layer.mlp.gate_proj, layer.mlp.up_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, 3 * d, bias=False)
            layer.mlp.down_proj = nn.Linear(3 * d, d, bias=False)
            layer.input_layernorm, layer.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)
            self.layers.append(layer)
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def markov_batches(vocab=32, ctx=16, batch=8, steps=200, seed=0):
    """Sequences from a fixed random sparse Markov chain: learnable, so loss must fall."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=gen) * 3
    probs = torch.softmax(logits, dim=-1)
    out = []
    for _ in range(steps):
        x = torch.randint(vocab, (batch, 1), generator=gen)
        for _ in range(ctx):
            x = torch.cat([x, torch.multinomial(probs[x[:, -1]], 1, generator=gen)], dim=1)
        out.append((x[:, :-1], x[:, 1:]))
    return out


@pytest.fixture
def tiny_gpt():
    torch.manual_seed(0)
    return TinyGPT()


@pytest.fixture
def bf16_units(monkeypatch):
    """Pretend the CPU has bf16 units (True) or not (False), whatever this machine has."""
    from manifold_muon.optim import precision

    def choose(native: bool):
        monkeypatch.setattr(precision, "native_bf16_matmul", lambda device_type: native)
    return choose


def matmul_dtypes(fn):
    """The dtypes of every matrix product ``fn()`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    products = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
                torch.ops.aten.baddbmm.default}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products:
                self.dtypes.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with Record() as record:
        out = fn()
    return out, record.dtypes


def refusal(script, *args):
    """Run ``script`` in this process with arguments it must refuse: the message it exits with
    (a refusal comes before any work, so a subprocess's 3-5 s of imports buys nothing here)."""
    with pytest.raises(SystemExit) as exited, mock.patch.object(sys, "argv", [str(script), *map(str, args)]), \
            contextlib.redirect_stderr(io.StringIO()) as stderr:
        runpy.run_path(str(script), run_name="__main__")
    assert exited.value.code not in (0, None)
    return f"{stderr.getvalue()}{exited.value.code}"


@pytest.fixture
def data_dir(tmp_path):
    """A nanoGPT-format folder of a learnable token stream (a noisy cycle)."""
    rng = np.random.default_rng(0)
    stream = (np.arange(20000) * 7 + rng.integers(0, 3, 20000)) % VOCAB
    folder = tmp_path / "data"
    folder.mkdir()
    stream[:18000].astype(np.uint16).tofile(folder / "train.bin")
    stream[18000:].astype(np.uint16).tofile(folder / "val.bin")
    sums = {name: sha256_file(folder / name) for name in ("train.bin", "val.bin")}
    (folder / "meta.json").write_text(json.dumps({"sha256": sums}))
    return folder
