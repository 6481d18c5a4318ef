"""A dispatch mode that records the matrix decompositions a computation runs, and their size:
what tells a matmul-only path from one with an eigh, SVD, QR or solve on it."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

DECOMPOSITIONS = ("linalg_eigh", "_linalg_eigh", "linalg_svd", "_linalg_svd", "svd", "linalg_qr", "linalg_solve",
                  "_linalg_solve_ex", "linalg_inv", "linalg_inv_ex", "linalg_cholesky", "linalg_cholesky_ex",
                  "linalg_eig", "linalg_lu_factor_ex", "linalg_svdvals", "_linalg_svdvals", "triangular_solve",
                  "linalg_solve_triangular")


class DecompositionRecorder(TorchDispatchMode):
    """``names``: each decomposition run on a matrix of at least ``min_size`` x ``min_size``."""

    def __init__(self, min_size: int = 1):
        super().__init__()
        self.min_size, self.names = min_size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in DECOMPOSITIONS and args and hasattr(args[0], "shape") and args[0].dim() >= 2:
            if min(args[0].shape[-2:]) >= self.min_size and name not in self.names:
                self.names.append(name)
        return func(*args, **(kwargs or {}))
