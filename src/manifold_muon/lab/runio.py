"""Run-directory IO: files replaced whole (write, sync, rename), line-flushed JSONL logs, the
environment record, and packed logs.

Packing (``manifold-muon pack``) xz-compresses a finished run's bulky logs in place
(``PACKED_LOGS``: ``spectral.bin`` -> ``spectral.bin.xz`` ...), for committing results and for
keeping a repository inside a size limit (the GPU machine takes at most 64 MiB of working tree).
Every reader here takes a log packed or not, and a run resumed in a packed directory unpacks it
first, so training appends to plain files as ever.

JSONL logs keep floats at float32 precision (``at_float32_precision``), as TensorBoard does: the
losses, norms and diagnostics logged are float32 values, so nothing of them is lost, and written
as 17-digit doubles they were half of a packed run's bytes.
"""
from __future__ import annotations

import contextlib
import json
import lzma
import math
import os
import platform
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import torch

__all__ = ["at_float32_precision", "JsonlLog", "read_jsonl", "read_log_bytes", "environment", "write_json", "PACKED_LOGS",
           "pack_run", "unpack_run", "replace_file"]

# The logs that grow with the run's length: together 85% of a committed run's bytes.  The
# spectral summary (diagnostics.summarize_spectra) is float32 records whose Stiefel columns sit
# at exactly 1: xz halves it.
PACKED_LOGS = ("spectral.bin", "spectral_summary.bin", "metrics.jsonl", "diagnostics.jsonl")
PACKED_SUFFIX = ".xz"
_FLOAT32 = np.finfo(np.float32)


def at_float32_precision(value):
    """``value`` (a number, or dicts and lists of them) with each float replaced by the shortest
    decimal that reads back as the same float32.  A float32 value (a loss, a norm) keeps its
    value exactly; a double (a learning rate, a step time) moves by at most 6e-8 of itself.
    Floats float32 cannot hold (zero, non-finite, out of its normal range) are kept as they are."""
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value) or not float(_FLOAT32.tiny) <= abs(value) <= float(_FLOAT32.max):
            return value
        return float(str(np.float32(value)))
    if isinstance(value, dict):
        return {key: at_float32_precision(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [at_float32_precision(item) for item in value]
    return value


def _jsonl_at_float32_precision(data: bytes) -> bytes:
    """A JSONL log's bytes with its floats at float32 precision (logs from before that rule)."""
    lines = []
    for line in data.decode().splitlines():
        try:
            lines.append(json.dumps(at_float32_precision(json.loads(line))))
        except json.JSONDecodeError:  # a torn last line: left as it was
            lines.append(line)
    return "".join(line + "\n" for line in lines).encode()


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
            self._file.write(json.dumps(at_float32_precision(row)) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file and a rename."""
    with _replaced_whole(path) as f:
        f.write(data)


@contextlib.contextmanager
def _replaced_whole(path: Path):
    """A file to write that replaces ``path`` when the block ends: written to a temporary in
    ``path``'s folder (so the rename stays on one filesystem), synced, then renamed over it.
    The temporary is named for this writer alone: two processes replacing the same file (sweeps
    run side by side into one folder) each rename their own.  Removed if anything fails.  (Not
    ``mkstemp``: its files are private to their owner, and results are shared.)"""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pack_run(run_dir) -> tuple[int, int]:
    """xz-compress the run's ``PACKED_LOGS`` in place; returns (bytes before, bytes after).
    Each packed file is written and synced before its original is removed, so a crash leaves
    one of the two whole (readers prefer the plain file).  JSONL logs written before logs kept
    floats at float32 precision are brought to it, packed ones too (packed again)."""
    before = after = 0
    for name in PACKED_LOGS:
        plain, packed = Path(run_dir) / name, Path(run_dir) / (name + PACKED_SUFFIX)
        jsonl = name.endswith(".jsonl")
        if plain.is_file():
            data = plain.read_bytes()
            compressed = lzma.compress(_jsonl_at_float32_precision(data) if jsonl else data, preset=6)
            replace_file(packed, compressed)
            before, after = before + len(data), after + len(compressed)
            plain.unlink()
        elif jsonl and packed.is_file():
            old = packed.read_bytes()
            data = lzma.decompress(old)
            rounded = _jsonl_at_float32_precision(data)
            if rounded != data:
                compressed = lzma.compress(rounded, preset=6)
                replace_file(packed, compressed)
                before, after = before + len(old), after + len(compressed)
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
    from .. import __version__
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "manifold_muon": __version__, "git_sha": _git_sha(), "host": socket.gethostname(),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "world_size": world_size, "cuda": torch.version.cuda}
