"""Checkpoints that say when they are damaged: a sha256 beside each, checked before loading.

``ckpt.pt`` is written through a synced temporary and a rename (a crash mid-write leaves the
previous one whole), and ``ckpt.pt.sha256`` records its digest.  The digest file is written
first with both the new and the current digest, then the checkpoint, then the digest file again
with the new one alone: a crash at any point leaves a checkpoint whose digest is listed.  A
checkpoint whose bytes match no listed digest (garbage written into it, a truncated copy) or
that is empty is refused with its name and what to do, before anything of it is used.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import warnings
from pathlib import Path

import torch

from .runio import replace_file

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "digest_path"]

_REMEDY = ("restore a good copy, or start the run anew (train --restart, which moves the old run folder aside)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or written, with the file named."""


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_failure(path: Path, error: BaseException, size: int) -> str:
    free = shutil.disk_usage(path.parent).free
    if getattr(error, "errno", None) == 28 or free < size:
        return (f"could not write {path}: the disk is full ({free:,} bytes free on its filesystem, {size:,} "
                f"needed); free space or point --out_dir elsewhere. The previous checkpoint is intact")
    return f"could not write {path} ({type(error).__name__}: {error}); the previous checkpoint is intact"


def save_checkpoint(obj, path) -> None:
    """``torch.save`` ``obj`` to ``path`` with its sha256 beside it (see the module docstring)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    sums = digest_path(path)
    current = sums.read_text().split()[:1] if sums.is_file() else []
    try:
        replace_file(sums, " ".join([digest, *current]).encode())
        replace_file(path, data)
        replace_file(sums, digest.encode())
    except OSError as e:
        raise CheckpointError(_write_failure(path, e, len(data))) from None


def load_checkpoint(path) -> dict:
    """The checkpoint at ``path``, loaded with ``weights_only=True`` on the CPU, after checking
    its digest; :class:`CheckpointError` naming the file if it is empty, corrupt or truncated."""
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (a write was cut short?); {_REMEDY}")
    sums = digest_path(path)
    if sums.is_file():
        if hashlib.sha256(data).hexdigest() not in sums.read_text().split():
            raise CheckpointError(f"checkpoint {path} does not match its sha256 ({sums.name}): it is corrupt or "
                                  f"truncated; {_REMEDY}")
    else:
        warnings.warn(f"checkpoint {path} has no {sums.name} (written before checkpoints carried one): it is "
                      "loaded unchecked", RuntimeWarning, stacklevel=2)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever torch says of a damaged file, name the file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}): it is "
                              f"truncated or corrupt; {_REMEDY}") from None
