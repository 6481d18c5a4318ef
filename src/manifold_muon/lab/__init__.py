"""The lab: models, offline data, the training loop, sweeps, diagnostics, reports, bench and CLI.

It reproduces the paper's study on top of the optimizer library (:mod:`manifold_muon`) and
needs the ``lab`` extra: ``pip install "manifold-muon[lab]"``.  The library never imports it.
"""
from __future__ import annotations

import importlib.util

_LAB_DEPENDENCIES = ("numpy", "tiktoken", "tqdm", "matplotlib", "scipy")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


_missing = [name for name in _LAB_DEPENDENCIES if not _installed(name)]
if _missing:
    raise ImportError(f"manifold_muon.lab needs {', '.join(_missing)}: install the lab extra, "
                      f"pip install \"manifold-muon[lab]\" (the optimizer library itself needs torch alone)")

from . import presets  # noqa: E402,F401 -- registers the lab's experiment manifolds and presets
