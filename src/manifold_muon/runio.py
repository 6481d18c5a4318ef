"""Run-directory IO: atomic checkpoints, line-flushed JSONL logs, the environment record, and
packed logs.

Packing (``manifold-muon pack``) xz-compresses a finished run's bulky logs in place
(``PACKED_LOGS``: ``spectral.bin`` -> ``spectral.bin.xz`` ...), for committing results and for
keeping a repository inside a size limit (the GPU machine takes at most 64 MiB of working tree).
Every reader here takes a log packed or not, and a run resumed in a packed directory unpacks it
first, so training appends to plain files as ever.
"""
from __future__ import annotations

import json
import lzma
import os
import platform
import socket
import subprocess
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_save", "JsonlLog", "read_jsonl", "read_log_bytes", "environment", "write_json", "PACKED_LOGS",
           "pack_run", "unpack_run", "replace_file"]

# The logs that grow with the run's length: together 85% of a committed run's bytes.  The
# spectral summary (diagnostics.summarize_spectra) is float32 records whose Stiefel columns sit
# at exactly 1: xz halves it.
PACKED_LOGS = ("spectral.bin", "spectral_summary.bin", "metrics.jsonl", "diagnostics.jsonl")
PACKED_SUFFIX = ".xz"


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
    replace_file(Path(path), json.dumps(obj, indent=1).encode())


def read_log_bytes(path) -> bytes | None:
    """A log's bytes, from ``path`` or, packed, from ``path.xz``; None if neither exists."""
    path = Path(path)
    if path.is_file():
        return path.read_bytes()
    packed = path.with_name(path.name + PACKED_SUFFIX)
    return lzma.decompress(packed.read_bytes()) if packed.is_file() else None


def read_jsonl(path) -> list[dict]:
    data = read_log_bytes(path)
    if data is None:
        return []
    rows = []
    for line in data.decode().splitlines():
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


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pack_run(run_dir) -> tuple[int, int]:
    """xz-compress the run's ``PACKED_LOGS`` in place; returns (bytes before, bytes after).
    Each packed file is written and synced before its original is removed, so a crash leaves
    one of the two whole (readers prefer the plain file)."""
    before = after = 0
    for name in PACKED_LOGS:
        plain = Path(run_dir) / name
        if plain.is_file():
            packed = lzma.compress(plain.read_bytes(), preset=6)
            replace_file(plain.with_name(name + PACKED_SUFFIX), packed)
            before, after = before + plain.stat().st_size, after + len(packed)
            plain.unlink()
    return before, after


def unpack_run(run_dir) -> None:
    """Undo :func:`pack_run` (a packed run about to be trained again); a no-op on plain runs."""
    for name in PACKED_LOGS:
        plain, packed = Path(run_dir) / name, Path(run_dir) / (name + PACKED_SUFFIX)
        if packed.is_file():
            if not plain.is_file():
                replace_file(plain, lzma.decompress(packed.read_bytes()))
            packed.unlink()


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
