"""FairGrad: alpha-fair resource allocation among the objectives."""

from __future__ import annotations

import torch

from ..solvers_qp import FAIR_STEPS, fair_weights
from ._base import Method
from ._registry import register_method

__all__ = ["FairGrad"]


@register_method("fairgrad")
class FairGrad(Method):
    r"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

    The update ``d = sum_k w_k g_k`` gives objective k the improvement ``<g_k, d> = (G w)_k``
    and maximises the alpha-fair utility of those improvements; its optimality condition is
    ``G w = w^(-1/alpha)`` with ``w > 0``. ``alpha = 1`` is proportional fairness (the Nash
    bargaining solution of :class:`~gradbal.methods.nash_mtl.NashMTL`, without clipping);
    ``alpha -> inf`` approaches max-min fairness. The official code and LibMTL solve the
    equation with ``scipy.optimize.least_squares`` on the CPU from ``w = 1/K``; gradbal
    minimises the equivalent strictly convex potential on the device with damped Newton
    steps (:func:`gradbal.solvers_qp.fair_weights`), ~1e-15 on well-conditioned G.

    ``alpha = 0`` is linear scalarisation with uniform weights ``1/K`` (as TorchJD 0.18).

    Defaults: ``alpha = 1.0`` (LibMTL ``FairGrad_alpha``; TorchJD requires alpha).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> gradbal.aggregate(g, method="fairgrad", alpha=2.0)
        tensor([1.0000, 0.7937])
    """

    def __init__(self, alpha: float = 1.0, iterations: int = FAIR_STEPS):
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.iterations = int(iterations)

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        if self.alpha == 0:
            return torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
        return fair_weights(gram, self.alpha, self.iterations).to(gram.dtype)

    def __repr__(self) -> str:
        return f"FairGrad(alpha={self.alpha})"
