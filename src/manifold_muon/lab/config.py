"""Typed run configuration.  Presets are functions; ``--key=value`` overrides are typed by
the dataclass fields (model fields and training fields share one flat namespace), and a config
no run could use is refused when it is made (:class:`ConfigError`, naming every bad key)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from .model import ConfigError, ModelConfig
from ..optim.allocation import PRESET_ALIASES, PRESETS
from ..optim.dual import DIRECTION_MODES, DUAL_FORMS
from ..optim.options import MSIGN_DTYPES
from ..optim.precision import MATMUL_PRECISIONS

__all__ = ["TrainConfig", "ConfigError", "CONFIG_PRESETS", "make_config", "apply_overrides", "config_to_dict", "config_from_dict"]


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # what to train
    data_dir: str = "data/shakespeare"
    out_dir: str = ""                 # default: runs/<preset>/<allocation>-s<seed>
    preset: str = "gpt2-small"
    allocation: str = "hetero"
    mode: str = "improved"            # Manifold Muon direction solver: improved | fast | paper
    seed: int = 1337
    # batch: tokens per step = batch_size * grad_accum * world_size * block_size
    batch_size: int = 64
    grad_accum: int = 1
    # schedule (the paper's: AdamW 6e-4 -> 6e-5 cosine, warmup 1000; Muon proportional)
    max_iters: int = 50_000
    warmup_iters: int = 1_000
    lr_decay_iters: int = 50_000
    adamw_lr: float = 6e-4
    min_lr: float = 6e-5
    muon_lr: float = 0.02
    weight_decay: float = 0.1         # where the allocation decays (2D AdamW, unconstrained Muon)
    muon_weight_decay: float = -1.0   # the same for Muon's decayed groups alone; -1: weight_decay
    muon_momentum: float = 0.95
    dual_steps: int = -1              # improved solver's iteration cap; -1: its default (paper mode: always 20)
    dual_form: str = "matrix"         # improved solver's dual: matrix (m x n msign) | gram (n x n, float64)
    msign_steps: int = 0              # msign iterations; 0: the default (Polar Express: 10; fast mode's direction: 7)
    msign_dtype: str = ""             # bfloat16 | float32; "": the default (float32 for improved mode's dual, else bf16)
    matmul_precision: str = "highest" # optimizer's float32 matmuls: highest (IEEE) | high | medium (TF32 on GPUs)
    grad_clip: float = 1.0            # global norm over all parameters; 0 disables
    # evaluation, logging, checkpoints
    eval_interval: int = 1_000
    eval_iters: int = 200
    ckpt_interval: int = 0            # 0: at every evaluation
    diag_interval: int = 0            # spectra, mechanism and optimizer health; 0: at every evaluation
    tensorboard: bool = False
    quiet: bool = False
    # device and speed
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    compile: bool = False
    compile_optimizer: bool = False   # torch.compile the optimizer's direction (plain Muon, fast mode)
    # failure handling
    max_nonfinite: int = 3            # consecutive non-finite steps before the run stops (one or two can be
                                      # a spike the skip absorbs; three in a row is a diverged run)
    # fault injection for tests (documented, off by default)
    inject_nonfinite_at: tuple = ()   # iterations whose loss is replaced by NaN
    fail_at_iter: int = -1            # raise at this iteration, as a crash would

    def __post_init__(self):
        # Checked here, when the config is made, so that a typo fails before data is loaded or a
        # sweep has started any run, naming the key, the value and what is valid.
        ConfigError.check(_bad_settings(self))

    def dual_steps_for(self, mode: str) -> int | None:
        """The solver's iteration cap for ``mode``: ``dual_steps`` caps the improved solver only;
        paper mode stays the reference (20 steps) and fast mode takes none.  None: the mode's default."""
        return self.dual_steps if self.dual_steps >= 0 and mode == "improved" else None

    def decay_for(self, algorithm: str) -> float:
        """The decay of a group that decays: ``muon_weight_decay`` moves Muon's alone, so that a
        decay strength can be varied without moving AdamW's share (embeddings, head)."""
        return self.muon_weight_decay if algorithm == "muon" and self.muon_weight_decay >= 0 else self.weight_decay

    def numerics_options(self) -> dict:
        """The optimizer's numerics as param-group keys (None: the optimizer's default)."""
        return {"msign_steps": self.msign_steps or None, "msign_dtype": self.msign_dtype or None,
                "matmul_precision": self.matmul_precision, "dual_form": self.dual_form}

    def run_dir(self) -> str:
        return self.out_dir or f"runs/{self.preset}/{self.allocation}-s{self.seed}"

    def torch_device(self, local_rank: int = 0) -> torch.device:
        """``device`` as torch takes it; ``auto``: this rank's GPU where there is one, else the CPU."""
        if self.device == "auto":
            return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        gpus = torch.cuda.device_count()
        if device.type == "cuda" and (device.index or 0) >= gpus:   # else torch fails later, less clearly
            seen = (f"sees {gpus} CUDA GPU(s); use --device=auto, --device=cpu or an index below {gpus}" if gpus
                    else "sees no CUDA GPU; use --device=auto or --device=cpu")
            raise RuntimeError(f"device {self.device!r} was asked for, and torch {torch.__version__} {seen}")
        return device


_AT_LEAST_ONE = ("batch_size", "grad_accum", "max_iters", "lr_decay_iters", "eval_interval", "eval_iters",
                 "max_nonfinite")
_AT_LEAST_ZERO = ("warmup_iters", "ckpt_interval", "diag_interval", "msign_steps")
_NON_NEGATIVE = ("adamw_lr", "min_lr", "muon_lr", "weight_decay", "grad_clip")   # 0 is meaningful for each
_CHOICES = {"allocation": PRESETS, "mode": DIRECTION_MODES, "dual_form": DUAL_FORMS,
            "msign_dtype": ("", *MSIGN_DTYPES), "matmul_precision": MATMUL_PRECISIONS}


def _bad_settings(cfg: TrainConfig):
    """(key, what is wrong) for each setting of ``cfg`` that no run could use."""
    for name in _AT_LEAST_ONE:
        if getattr(cfg, name) < 1:
            yield name, f"must be at least 1, got {getattr(cfg, name)}"
    for name in _AT_LEAST_ZERO:
        if getattr(cfg, name) < 0:
            yield name, f"must be at least 0, got {getattr(cfg, name)}"
    if cfg.dual_steps < -1:
        yield "dual_steps", f"must be at least 0, or -1 for the solver's default; got {cfg.dual_steps}"
    for name in _NON_NEGATIVE:
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):   # NaN fails both
            yield name, f"must be a finite number >= 0, got {getattr(cfg, name)}"
    decay = cfg.muon_weight_decay
    if not (decay == -1 or (math.isfinite(decay) and decay >= 0)):
        yield "muon_weight_decay", f"must be >= 0, or -1 for weight_decay's value; got {cfg.muon_weight_decay:g}"
    if not 0 <= cfg.muon_momentum < 1:
        yield "muon_momentum", f"must be in [0, 1), got {cfg.muon_momentum}"
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices and not (name == "allocation" and cfg.allocation in PRESET_ALIASES):
            yield name, f"{getattr(cfg, name)!r}; valid choices: {', '.join(c or repr(c) for c in choices)}"
    try:
        if cfg.device != "auto":
            torch.device(cfg.device)
    except RuntimeError:
        yield "device", f"{cfg.device!r} is no device torch knows; valid choices: auto, cpu, cuda, cuda:N (or another torch device)"


def gpt2_small() -> TrainConfig:
    """The paper's setup (its reference code's defaults): GPT-2 small, 64 x 1024 tokens, 50k iterations."""
    return TrainConfig(preset="gpt2-small")


def tiny_cpu() -> TrainConfig:
    """A tiny GPT for the demo and the tests, sized for a 2-core CPU: 512 tokens per step,
    the full GPT-2 vocabulary (whose 50k-way softmax dominates the cost), and the improved
    dual solver capped at 16 iterations (its default of 128 costs far more than the model here)."""
    return TrainConfig(model=ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64), preset="tiny-cpu",
                       batch_size=8, max_iters=150, warmup_iters=15, lr_decay_iters=150, adamw_lr=3e-3,
                       min_lr=3e-4, eval_interval=25, eval_iters=4, dual_steps=16)


def gpt2_reduced() -> TrainConfig:
    """The paper's study on one GPU at a scale that fits minutes, not days: GPT-2 with 6 layers,
    d=384, context 512, 32 x 512 = 16,384 tokens per step, 1,180 steps = one epoch of the
    19.4M-token ``data/local-corpus`` (no multi-epoch overfitting).  The paper's learning rates,
    momentum, decay and clip; warmup and cosine rescaled to the run (2% warmup, as 1k of 50k).
    The improved solver is capped at 16 iterations, as in ``cpu-small``: at these shapes on the
    CPU 16 iterations cost 29-37x fast mode's optimizer time, and 128 would not fit a GPU call."""
    return TrainConfig(model=ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=512), preset="gpt2-reduced",
                       data_dir="data/local-corpus", batch_size=32, max_iters=1_180, warmup_iters=24,
                       lr_decay_iters=1_180, eval_interval=50, eval_iters=20, dual_steps=16)


def cpu_small() -> TrainConfig:
    """A CPU-sized version of the reproduction on ``data/local-corpus``: 4 layers, d=64, context
    64, 512 tokens per step, 600 steps (307k tokens, 1.6% of an epoch), the demo's learning
    rates; the improved solver capped at 16 iterations as in ``tiny-cpu``; evaluation on a fixed
    10k-token set per split.  About 3 minutes a run on one core of this 2-core machine."""
    return TrainConfig(model=ModelConfig(n_layer=4, n_head=4, n_embd=64, block_size=64), preset="cpu-small",
                       data_dir="data/local-corpus", batch_size=8, max_iters=600, warmup_iters=30,
                       lr_decay_iters=600, adamw_lr=3e-3, min_lr=3e-4, eval_interval=50, eval_iters=20, dual_steps=16)


CONFIG_PRESETS = {"gpt2-small": gpt2_small, "gpt2-reduced": gpt2_reduced, "cpu-small": cpu_small, "tiny-cpu": tiny_cpu}


_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}


def _coerce(value: str, annotation):
    hint = annotation if isinstance(annotation, type) else _FIELD_TYPES[annotation]
    if hint is bool:
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    try:
        if hint is tuple:
            return tuple(int(v) for v in value.split(",") if v)
        return hint(value)
    except ValueError:
        kind = {tuple: "comma-separated integers", int: "an integer", float: "a number"}.get(hint, hint.__name__)
        raise ValueError(f"expected {kind}, got {value!r}") from None


def apply_overrides(cfg: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """Return ``cfg`` with ``{"n_layer": "2", "max_iters": "100"}`` applied, typed per field."""
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "model"}
    model_fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    model_changes, train_changes = {}, {}
    for key, raw in overrides.items():
        target, fields = (train_changes, train_fields) if key in train_fields else (model_changes, model_fields)
        if key not in fields:
            valid = sorted(train_fields) + sorted(model_fields)
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        try:
            target[key] = _coerce(raw, fields[key].type)
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {e}") from None
    model = dataclasses.replace(cfg.model, **model_changes)
    return dataclasses.replace(cfg, model=model, **train_changes)


def make_config(preset: str, overrides: dict[str, str] | None = None) -> TrainConfig:
    if preset not in CONFIG_PRESETS:
        raise ValueError(f"unknown config preset {preset!r}; valid choices: {', '.join(CONFIG_PRESETS)}")
    return apply_overrides(CONFIG_PRESETS[preset](), overrides or {})


def config_to_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: dict) -> TrainConfig:
    d = dict(d)
    d["model"] = ModelConfig(**d["model"])
    d["inject_nonfinite_at"] = tuple(d.get("inject_nonfinite_at", ()))
    return TrainConfig(**d)
