"""Aligned-MTL: align the principal components of the gradient system."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..solvers_qp import rank_mask, sym_eig
from ._base import Method
from ._common import PrefVector
from ._registry import register_method

__all__ = ["SCALE_MODES", "AlignedMTL"]

#: Which eigenvalue sets the scale of the aligned system (official code's ``scale_mode``).
SCALE_MODES = ("min", "median", "rmse")


@register_method("aligned_mtl")
class AlignedMTL(Method):
    r"""Aligned-MTL (Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component
    Alignment for Multi-Task Learning", CVPR 2023, Alg. 1).

    With the eigendecomposition ``G = V diag(lambda) V^T`` restricted to its numerical rank R
    (eigenvalues above ``K * eps(float32) * lambda_max``, the official code's rule), the
    balance matrix is ``B = sqrt(s) V_R diag(lambda_R)^(-1/2) V_R^T``. The aligned gradients,
    the columns of ``J^T B``, have Gram matrix ``B G B = s V_R V_R^T`` (``= s I`` at full
    rank): they are orthogonal with equal singular values ``sqrt(s)``. The direction is
    ``d = J^T B p``, i.e. ``w = B p``. ``s`` is the smallest kept eigenvalue (``"min"``,
    default), their lower median (``"median"``, as ``torch.median``) or their mean
    (``"rmse"``), the official code's ``scale_mode`` options. A zero Gram matrix gives
    ``B = I``.

    The eigendecomposition runs on the device (:func:`gradbal.solvers_qp.sym_eig`: LAPACK
    on the CPU, fixed-sweep Jacobi elsewhere since ``torch.linalg.eigh`` syncs on CUDA).

    Defaults: ``scale_mode="min"`` (paper, official code, LibMTL, TorchJD);
    ``pref_vector`` = ones, i.e. the sum of the aligned gradients (official code and
    LibMTL ``B.sum(0)``); TorchJD's ``AlignedMTL()`` uses the mean, ``1/K`` each: pass
    ``pref_vector=[1/K] * K`` to match it.

    Example:
        >>> import torch, gradbal
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> gradbal.aggregate(J, method="aligned_mtl", pref_vector=[0.5, 0.5])
        tensor([0.2133, 0.9673, 0.9673])
    """

    def __init__(
        self,
        scale_mode: str = "min",
        pref_vector: Sequence[float] | Tensor | None = None,
    ):
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode
        self.pref = PrefVector(pref_vector, default="sum")

    def check_num_objectives(self, k: int) -> None:
        self.pref.check(k, self.name)

    def balance_matrix(self, gram: Tensor) -> Tensor:
        """``B`` (float64 [K, K]) with ``B G B = s I`` on the range of G."""
        k = gram.shape[-1]
        evals, evecs = sym_eig(gram)
        keep = rank_mask(evals)
        rank = keep.sum(-1, keepdim=True)
        safe = torch.where(keep, evals, torch.ones_like(evals))
        inv_sqrt = torch.where(keep, torch.rsqrt(safe), torch.zeros_like(evals))
        if self.scale_mode == "min":
            scale = torch.where(keep, evals, torch.full_like(evals, float("inf"))).amin(-1, keepdim=True)
        elif self.scale_mode == "median":
            # Kept eigenvalues are the largest `rank` of the ascending list; torch.median
            # (the official code) returns the lower middle one.
            idx = (k - rank + (rank - 1).clamp_min(0) // 2).clamp(0, k - 1)
            scale = evals.gather(-1, idx)
        else:
            scale = torch.where(keep, evals, 0.0).sum(-1, keepdim=True) / rank.clamp_min(1)
        scale = torch.where(rank > 0, scale, torch.ones_like(scale))
        b = torch.sqrt(scale).unsqueeze(-1) * (evecs * inv_sqrt.unsqueeze(-2)) @ evecs.transpose(-1, -2)
        eye = torch.eye(k, dtype=b.dtype, device=b.device)
        return torch.where((rank > 0).unsqueeze(-1), b, eye)

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        self.check_num_objectives(k)
        b = self.balance_matrix(gram)
        return (b @ self.pref.get(k, b)).to(gram.dtype)

    def __repr__(self) -> str:
        return f"AlignedMTL(scale_mode={self.scale_mode!r}, pref_vector={self.pref!r})"
