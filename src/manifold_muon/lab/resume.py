"""Resuming a run folder only as the run it holds: the settings that change the optimization
must match, a finished run is not trained again, and starting anew keeps the old folder."""
from __future__ import annotations

import json
from pathlib import Path

from .config import TrainConfig

__all__ = ["RunMismatch", "check_resumable", "finished_summary", "move_aside"]


class RunMismatch(ValueError):
    """A run folder holds a run with other settings than the ones asked for."""


#: Settings that do not change what is optimized: a resume may change them.  Raising
#: ``max_iters`` extends a run.
_NOT_OPTIMIZATION = {"max_iters", "out_dir", "preset", "eval_interval", "eval_iters", "ckpt_interval", "diag_interval",
                     "tensorboard", "quiet", "device", "compile", "max_nonfinite", "inject_nonfinite_at", "fail_at_iter"}


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def check_resumable(saved: dict | None, asked: dict, path) -> None:
    """Refuse to resume the checkpoint at ``path`` under settings that change the optimization
    (allocation, mode, rates, schedule, seed, model, data), naming each differing key."""
    if saved is None:
        return
    old, new = _flatten(saved), _flatten(asked)
    differing = sorted(k for k in old.keys() | new.keys()
                       if k.split(".")[-1] not in _NOT_OPTIMIZATION and old.get(k) != new.get(k))
    if differing:
        listed = ", ".join(f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} asked" for k in differing)
        raise RunMismatch(f"{Path(path).parent} holds a run with other settings ({listed}); resuming it would "
                          "train it under settings it was not started with. Use another --out_dir, or start "
                          "it anew with --restart (the old run folder is moved aside)")


def finished_summary(cfg: TrainConfig) -> dict | None:
    """The run folder's summary if its run already reached ``max_iters`` (asking for more
    iterations extends it instead)."""
    path = Path(cfg.run_dir()) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    done = summary.get("status") == "completed" and summary.get("iters", 0) >= cfg.max_iters
    return summary if done else None


def move_aside(run_dir: Path) -> Path | None:
    """Start anew: the old run folder keeps its files under a new name (nothing is deleted)."""
    if not run_dir.exists():
        return None
    n = 1
    while run_dir.with_name(f"{run_dir.name}.old{n}").exists():
        n += 1
    target = run_dir.with_name(f"{run_dir.name}.old{n}")
    run_dir.rename(target)
    return target
