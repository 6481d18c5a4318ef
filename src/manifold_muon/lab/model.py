"""GPT-2 (nanoGPT-style, the paper's parameter names) and a Llama-style variant.

GPT-2 names: ``transformer.{wte,wpe,h.i.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj},ln_f}``
and ``lm_head`` tied to ``wte``.  The Llama variant (``arch="llama"``: RMSNorm, SwiGLU,
rotary positions, no ``wpe``) uses ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``
so the same allocation presets resolve on both.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ModelConfig", "ConfigError", "GPT", "ARCHS"]

ARCHS = ("gpt2", "llama")


class ConfigError(ValueError):
    """Every unusable setting of a config (the model's or the run's), one message a line, each
    also in ``problems``."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems

    @classmethod
    def check(cls, bad: Iterable[tuple[str, str]]) -> None:
        """Raise naming every ``(key, what is wrong)`` of ``bad``; nothing if it is empty."""
        problems = [f"bad value for {name}: {problem}" for name, problem in bad]
        if problems:
            raise cls(problems)


@dataclass
class ModelConfig:
    arch: str = "gpt2"
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304   # GPT-2's 50257 padded to a multiple of 64, as nanoGPT
    dropout: float = 0.0
    bias: bool = False
    rope_theta: float = 10000.0

    def __post_init__(self):
        ConfigError.check(_bad_shape(self))


def _bad_shape(cfg: ModelConfig):
    """(key, what is wrong) for each setting of ``cfg`` no model could be built with."""
    if cfg.arch not in ARCHS:
        yield "arch", f"{cfg.arch!r}; valid choices: {', '.join(ARCHS)}"
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if getattr(cfg, name) < 1:
            yield name, f"must be at least 1, got {getattr(cfg, name)}"
    if cfg.n_head >= 1 and cfg.n_embd % cfg.n_head:
        yield "n_embd", f"{cfg.n_embd} must be divisible by n_head={cfg.n_head}"
    elif cfg.arch == "llama" and cfg.n_head >= 1 and (cfg.n_embd // cfg.n_head) % 2:
        yield "n_embd", f"rotary positions rotate channel pairs: the head size n_embd/n_head={cfg.n_embd // cfg.n_head} must be even"
    if not 0 <= cfg.dropout < 1:
        yield "dropout", f"must be in [0, 1), got {cfg.dropout}"
    if not cfg.rope_theta > 0:
        yield "rope_theta", f"must be > 0, got {cfg.rope_theta}"


def _rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs of channels of ``x`` (B, H, T, D) by position-dependent angles."""
    t, d = x.shape[-2], x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * freqs  # (T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """GPT-2 attention: one fused ``c_attn`` (d -> 3d) and ``c_proj``; SDPA (flash where available)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(c, dim=2))               # (B, H, T, D) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class LlamaAttention(nn.Module):
    """Separate q/k/v/o projections with rotary positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.n_embd
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.n_head, self.theta = cfg.n_head, cfg.rope_theta

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(_rotary(q, self.theta), _rotary(k, self.theta), v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = 64 * math.ceil(8 * cfg.n_embd / 3 / 64)  # Llama's 8/3 d, rounded to 64
        self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch == "gpt2":
            self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), CausalSelfAttention(cfg)
            self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), MLP(cfg)
        else:
            self.ln_1, self.self_attn = nn.RMSNorm(cfg.n_embd), LlamaAttention(cfg)
            self.ln_2, self.mlp = nn.RMSNorm(cfg.n_embd), SwiGLU(cfg)

    def forward(self, x):
        attn = self.attn if hasattr(self, "attn") else self.self_attn
        x = x + attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        layers = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), drop=nn.Dropout(cfg.dropout),
                      h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                      ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.arch == "gpt2" else nn.RMSNorm(cfg.n_embd))
        if cfg.arch == "gpt2":
            layers["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: std 0.02 / sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Unique parameters (the tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """``idx`` (B, T) token ids -> logits (B, T, V); with ``targets``, also the mean CE loss."""
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(t, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    def flops_per_token(self) -> float:
        """Training FLOPs per token, PaLM appendix B as in nanoGPT: 6N + 12 L H Q T."""
        c = self.config
        n = self.num_params()
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size
