"""ConFIG: conflict-free inverse gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..solvers_qp import unit_gram_pinv
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
    components, so results can differ on nearly dependent gradients. When ``p`` is orthogonal
    to the kept eigenvectors (nearly opposite gradients, whose common direction the cut
    drops) ``C^+ p`` is 0, so ``x = 0`` and ``d = 0``, as for exactly opposite gradients
    (:func:`gradbal.solvers_qp.unit_gram_pinv`).

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
        a, found = unit_gram_pinv(g, self.pref.get(k, g))
        ga = g @ a
        sq = (a * ga).sum()
        ok = found & (sq > 0)
        w = torch.where(ok, a * ga.sum() / torch.where(ok, sq, torch.ones_like(sq)), torch.zeros_like(a))
        return w.to(gram.dtype)

    def __repr__(self) -> str:
        return f"ConFIG(pref_vector={self.pref!r})"
