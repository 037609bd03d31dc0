"""PCGrad, computed in coefficient space from the Gram matrix."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._solver_kernels import PCGRAD
from ._base import Method
from ._common import partner_orders, to_device
from ._registry import register_method

__all__ = ["PCGrad"]


@functools.lru_cache(maxsize=32)
def _consts(k: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``I`` and ``arange(k)`` (constants: no ops per call). Never modified in place."""
    return torch.eye(k, dtype=dtype, device=device), torch.arange(k, device=device)


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
    On CUDA (3 <= K <= 32, float64 G) the rounds run as one Triton launch
    (:func:`gradbal.kernels.pcgrad_weights`, the same orders; equal to rounding).

    For K = 2 each gradient has one other to project on, so in closed form
    ``w_1 = 1 - min(0, G_21) / G_11``, ``w_2 = 1 - min(0, G_12) / G_22`` (a zero gradient,
    or one whose squared norm is below the dtype's smallest normal number, is not projected
    on: its quotient counts as 0).

    Args:
        reduction: ``"sum"`` (the paper) or ``"mean"`` (Pytorch-PCGrad's default).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> gradbal.aggregate(g, method="pcgrad")
        tensor([0.5000, 1.5000])
    """

    draws_random = True

    def __init__(self, reduction: str = "sum"):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        # Random order of the others for each i: random keys, sorted with self forced last.
        # Drawn at K = 2 too, where the order is forced: the generator (in the optimizer's
        # checkpoint, and the caller's to share) advances by the same draw at every K.
        keys = torch.rand(k, k, generator=generator, dtype=torch.float64)
        if k == 2:
            w = self._pair(gram, self._inv_sq_norms(gram))
        else:
            order = partner_orders(keys)
            w = None
            if gram.dtype == torch.float64 and PCGRAD.usable(gram):
                # CUDA, 3 <= K <= 32: the rounds in one launch (gradbal.kernels.pcgrad_weights).
                w = PCGRAD.run(gram, to_device(order.contiguous(), gram.device))
            if w is None:
                w = self._rounds(gram, self._inv_sq_norms(gram), order)
        return w / k if self.reduction == "mean" else w

    @staticmethod
    def _inv_sq_norms(gram: Tensor) -> Tensor:
        """``1 / ||g_j||^2``, and 0 for a zero gradient (nothing to project on); the 1 / 0 = inf
        that where() discards is never multiplied. A subnormal ||g_j||^2 counts as zero: its
        reciprocal overflows to inf (G = [[1e-320, -1e-160], [-1e-160, 1]] gave w = inf)."""
        sq_norms = gram.diagonal()
        return torch.where(sq_norms >= torch.finfo(sq_norms.dtype).tiny, sq_norms.reciprocal(), 0.0)

    @staticmethod
    def _pair(gram: Tensor, inv: Tensor) -> Tensor:
        """K = 2: ``w_j = 1 - inv_j min(0, G_ij)``, i the other. Column j of ``min(G, 0)``
        sums ``min(G_ij, 0)`` and ``min(G_jj, 0) = 0``: the same bits as the rounds (where
        ``w_j = C_jj + C_ij = 1 - min(0, G_ij) inv_j``)."""
        return 1 - inv * gram.clamp_max(0).sum(0)

    @staticmethod
    def _rounds(gram: Tensor, inv: Tensor, order: Tensor) -> Tensor:
        """The K - 1 rounds: round t projects each g_i' on g_j, ``j = order[i, t]``."""
        k = gram.shape[-1]
        eye, arange = _consts(k, gram.dtype, gram.device)
        idx = to_device(order.T.unsqueeze(-1), gram.device)  # [K - 1, K, 1]: round, i -> j
        # Row i of round t's update is -min(0, <g_i', g_j>) / ||g_j||^2 e_j: the scaled
        # one-hot rows, built once for all rounds by a comparison (no index validation that
        # would read the indices on the host, as F.one_hot does on CUDA).
        scaled = torch.where(idx == arange, inv, 0.0).unbind(0)
        cols = idx.unbind(0)
        coef = eye
        for t in range(k - 1):
            # C = I in round 0: C G = G (the same bits for a finite G).
            cg = gram if t == 0 else coef @ gram
            dots = cg.gather(1, cols[t])  # <g_i', g_{j_i}>
            coef = coef - dots.clamp_max(0) * scaled[t]
        return coef.sum(0)

    def __repr__(self) -> str:
        return f"PCGrad(reduction={self.reduction!r})"
