"""ConFIG: conflict-free inverse gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._solver_kernels import CONFIG
from ..solvers_qp import _KEPT_SUM_2, _unit_sum_2, unit_gram_pinv
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

    On CUDA (K >= 3) the whole stage is one Triton launch
    (:func:`gradbal.kernels.config_weights`: the Jacobi eigendecomposition of C and the weights
    from its eigenpairs); elsewhere torch ops (LAPACK's eigh on the CPU).

    Defaults: ``pref_vector`` = ones (official code and TorchJD).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> gradbal.aggregate(g, method="config")
        tensor([1.5000, 1.5000])
    """

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None):
        self.pref = PrefVector(pref_vector, default="sum")
        # w does not change when p is scaled (x_hat is), so p = c 1 (c != 0) is the default.
        host = self.pref.host
        self._uniform = host is None or bool((host == host[0]).all() and host[0] != 0)

    def check_num_objectives(self, k: int) -> None:
        self.pref.check(k, self.name)

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        self.check_num_objectives(k)
        w = CONFIG.run(gram, self.pref.get(k, gram, torch.float64)) if CONFIG.usable(gram) else None
        if w is None:
            g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
            w = _config_2(g) if k == 2 and self._uniform else _config(g, self.pref.get(k, g))
        return w if w.dtype == gram.dtype else w.to(gram.dtype)

    def __repr__(self) -> str:
        return f"ConFIG(pref_vector={self.pref!r})"


def _config(g: Tensor, p: Tensor) -> Tensor:
    """Any K and p: ``w = a sum(G a) / (a^T G a)``, ``a = D^-1 C^+ p``, through the
    eigendecomposition of C."""
    a, found = unit_gram_pinv(g, p)
    ga = g @ a
    sq = a @ ga
    return torch.where(found & (sq > 0), a * (ga.sum() / sq), 0.0)


def _config_2(g: Tensor) -> Tensor:
    """K = 2 and ``p = 1`` (or any ``c 1``) in closed form, without the eigendecomposition (11
    small ops instead of ~30 and LAPACK's ``eigh``; on a GPU, instead of the Jacobi eigendecomposition).

    With both gradients nonzero, 1 is the eigenvector ``[1, 1]`` of ``C = [[1, c], [c, 1]]``,
    so ``C^+ 1 = 1 / (1 + c)`` when rank_mask keeps ``1 + c``, else 0 (nearly opposite
    gradients: d = 0), as for IMTL-G (:func:`~gradbal.solvers_qp._unit_sum_2`). Then
    ``a ~ 1 / ||g_k||``, ``x ~ u_1 + u_2`` (the bisector) and ``G a = D 1``, so
    ``w = a sum(G a) / (a^T G a) = (||g_1|| + ||g_2||) / 2 * (1 / ||g_1||, 1 / ||g_2||)``:
    ``d = mean(||g_k||) (u_1 + u_2)``. With one zero gradient ``C^+ 1`` is the other's unit
    vector and ``w`` is 1 for it, 0 for the zero one: both are
    ``w = inv * sum(||g_k||) / #{g_k != 0}``. Two zero gradients give 0.
    """
    diag, inv, total_c = _unit_sum_2(g)
    mean_norm = (diag @ inv) / torch.count_nonzero(inv)  # G_kk / ||g_k|| = ||g_k||
    return torch.where(total_c > _KEPT_SUM_2, inv * mean_norm, 0.0)
