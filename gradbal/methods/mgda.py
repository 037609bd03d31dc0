"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from ..solvers import min_norm_simplex
from ._base import Method
from ._registry import register_method

__all__ = ["MGDA"]


@register_method("mgda")
class MGDA(Method):
    """Multiple-gradient descent (Desideri 2012; Sener & Koltun, NeurIPS 2018).

    ``w = argmin_{w >= 0, sum w = 1} w^T G w`` and ``d = sum_k w_k g_k``, the min-norm point of
    the convex hull of the gradients. If ``d != 0`` it is a descent direction for every
    objective: ``<d, g_k> >= ||d||^2`` for all k (the KKT conditions), with equality wherever
    ``w_k > 0``. Solved on the device (closed form for K = 2, exact support enumeration up to
    K = 8, interior point + exact active-set rounds above; on CUDA for 3 <= K <= 32 one Triton
    launch, :func:`gradbal.kernels.min_norm`; see :mod:`gradbal.solvers`).

    Args:
        iterations: interior-point steps for K > 8 (default
            ``gradbal.solvers.MIN_NORM_STEPS``; giving it keeps the torch solver on CUDA).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> gradbal.aggregate(g, method="mgda")
        tensor([0.5000, 0.5000])
    """

    def __init__(self, iterations: int | None = None):
        self.iterations = None if iterations is None else int(iterations)

    def weights(self, gram, losses, generator=None):
        return min_norm_simplex(gram, self.iterations)

    def __repr__(self) -> str:
        return f"MGDA(iterations={self.iterations})"
