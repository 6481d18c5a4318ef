"""Data files shipped inside other installed packages, read through importlib.resources."""
from __future__ import annotations

import importlib.resources


def package_data(package: str, folder: str, *, install: str):
    """The ``folder`` inside installed ``package``, or a RuntimeError saying how to install it."""
    try:
        return importlib.resources.files(package) / folder
    except ModuleNotFoundError:
        raise RuntimeError(f"{package} is not installed; {install}") from None
