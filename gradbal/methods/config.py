"""ConFIG: conflict-free inverse gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..solvers_qp import rank_mask, sym_eig
from ._base import Method
from ._common import PrefVector
from ._registry import register_method

__all__ = ["ConFIG"]


@register_method("config")
class ConFIG(Method):
    r"""ConFIG (Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025, Eq. 2), as TorchJD's ``ConFIG`` aggregator.

    With unit gradients ``u_k = g_k / ||g_k||`` (0 for a zero gradient) the target direction
    ``x = pinv(U) p`` solves ``<u_k, x> = p_k`` in the least-squares, min-norm sense, so it
    has the same angle to every gradient when ``p = 1``. The update is
    ``d = (sum_k <g_k, x_hat>) x_hat`` with ``x_hat = x / ||x||``. In Gram terms
    ``x = sum_k a_k g_k`` with ``a = D^-1 (D^-1 G D^-1)^+ p``, ``D = diag(||g_k||)``, and
    ``w = a * sum(G a) / (a^T G a)``; ``x = 0`` gives ``d = 0``.

    The pseudo-inverse drops eigenvalues of the unit Gram matrix below
    ``K * eps(float32) * lambda_max`` (:func:`gradbal.solvers_qp.rank_mask`). TorchJD takes
    ``pinv`` of the materialised [K, N] unit matrix, whose default cut-off is
    ``max(K, N) * eps`` on singular values: for large N it also drops moderately small
    components, so results can differ on nearly dependent gradients.

    Defaults: ``pref_vector`` = ones (official code and TorchJD).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> gradbal.aggregate(g, method="config")
        tensor([1.5000, 1.5000])
    """

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None):
        self.pref = PrefVector(pref_vector, default="sum")

    def check_num_objectives(self, k: int) -> None:
        self.pref.check(k, self.name)

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        self.check_num_objectives(k)
        g = gram.to(torch.float64)
        norms = torch.sqrt(g.diagonal().clamp_min(0))
        inv_n = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
        unit = g * inv_n.unsqueeze(-1) * inv_n.unsqueeze(-2)
        evals, evecs = sym_eig(unit)
        keep = rank_mask(evals)
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
        p = self.pref.get(k, g)
        a = inv_n * (evecs @ (inv * (evecs.transpose(-1, -2) @ p)))
        ga = g @ a
        sq = (a * ga).sum()
        ok = sq > 0
        w = torch.where(ok, a * ga.sum() / torch.where(ok, sq, torch.ones_like(sq)), torch.zeros_like(a))
        return w.to(gram.dtype)

    def __repr__(self) -> str:
        return f"ConFIG(pref_vector={self.pref!r})"
