"""PCGrad, computed in coefficient space from the Gram matrix."""

from __future__ import annotations

import torch

from ._base import Method
from ._registry import register_method

__all__ = ["PCGrad"]


@register_method("pcgrad")
class PCGrad(Method):
    r"""Projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020, Algorithm 1).

    For each objective i, in a random order over the others j:
    ``if <g_i', g_j> < 0: g_i' <- g_i' - <g_i', g_j> / ||g_j||^2 g_j``, then ``d = sum_i g_i'``.

    Every ``g_i'`` stays in the span of the original gradients, so it is tracked as a row of
    coefficients ``C[i]`` with ``g_i' = sum_k C[i, k] g_k``; the inner products it needs are
    ``<g_i', g_j> = (C G)[i, j]``. The whole surgery is K x K work on the Gram matrix, all
    objectives advance in parallel (K - 1 vectorised rounds), and ``w = sum_i C[i]``.
    The orders are drawn from the ``generator`` the optimizer passes (seeded, checkpointed).

    Args:
        reduction: ``"sum"`` (the paper) or ``"mean"`` (Pytorch-PCGrad's default).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> gradbal.aggregate(g, method="pcgrad")
        tensor([0.5000, 1.5000])
    """

    def __init__(self, reduction: str = "sum"):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        # Random order of the others for each i: sort random keys, self forced last.
        keys = torch.rand(k, k, generator=generator, dtype=torch.float64)
        keys.fill_diagonal_(2.0)
        order = keys.argsort(dim=1)[:, : k - 1].to(gram.device, non_blocking=True)
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        coef = eye
        sq_norms = gram.diagonal()
        # 1 / ||g_j||^2, and 0 for a zero gradient (nothing to project on).
        inv = torch.where(sq_norms > 0, 1 / torch.where(sq_norms > 0, sq_norms, 1.0), 0.0)
        for t in range(k - 1):
            j = order[:, t : t + 1]  # [K, 1]: the j each i projects on at this round
            dots = (coef @ gram).gather(1, j)  # <g_i', g_{j_i}>
            step = dots.clamp_max(0) * inv.index_select(0, j.squeeze(1)).unsqueeze(1)
            # Row i of the update is step_i e_{j_i}: gathers only, no index validation that
            # would read the indices on the host (F.one_hot does on CUDA).
            coef = coef - step * eye.index_select(0, j.squeeze(1))
        w = coef.sum(0)
        return w / k if self.reduction == "mean" else w

    def __repr__(self) -> str:
        return f"PCGrad(reduction={self.reduction!r})"
