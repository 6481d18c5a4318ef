"""Run-directory IO: atomic checkpoints, line-flushed JSONL logs, the environment record."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_save", "JsonlLog", "read_jsonl", "environment", "write_json"]


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file, fsync, then rename: a crash mid-write leaves the
    previous checkpoint intact (rename is atomic on POSIX filesystems)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from a crash
            break
    return rows


class JsonlLog:
    """Append-only JSON lines, flushed per line so a crash loses at most the line in flight."""

    def __init__(self, path, *, keep_below_iter: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled and keep_below_iter is not None:  # resuming: drop what the checkpoint will redo
            kept = [r for r in read_jsonl(self.path) if r.get("iter", -1) < keep_below_iter]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a") if enabled else None

    def write(self, row: dict) -> None:
        if self._file:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, world_size: int) -> dict:
    from . import __version__
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "manifold_muon": __version__, "git_sha": _git_sha(), "host": socket.gethostname(),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "world_size": world_size, "cuda": torch.version.cuda}
