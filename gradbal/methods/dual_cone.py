"""UPGrad and DualProj: projections onto the dual cone of the task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..solvers_qp import DUAL_CONE_STEPS, project_dual_cone
from ._base import Method
from ._common import PrefVector, remember
from ._registry import register_method

__all__ = ["DualProj", "UPGrad"]


def _check(norm_eps: float, reg_eps: float) -> None:
    if not norm_eps >= 0:
        raise ValueError(f"norm_eps must be >= 0, got {norm_eps}")
    if not reg_eps >= 0:
        raise ValueError(f"reg_eps must be >= 0, got {reg_eps}")


def _as(w: Tensor, gram: Tensor) -> Tensor:
    return w if w.dtype == gram.dtype else w.to(gram.dtype)


class _DualConeMethod(Method):
    """What UPGrad and DualProj share: options, checks, and the projection of the rows of
    ``u`` (built from the preference vector p by :meth:`_targets`) onto the dual cone."""

    def __init__(
        self,
        pref_vector: Sequence[float] | Tensor | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 1e-4,
        iterations: int = DUAL_CONE_STEPS,
    ):
        _check(norm_eps, reg_eps)
        self.pref = PrefVector(pref_vector, default="mean")
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)
        self.iterations = int(iterations)
        # u per (K, device, dtype): the preference vector is fixed, so the targets are built
        # once rather than on every call (a few small ops of a ~50-op K = 2 projection).
        self._u: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def check_num_objectives(self, k: int) -> None:
        self.pref.check(k, self.name)

    def _targets(self, p: Tensor) -> Tensor:
        raise NotImplementedError

    def _project(self, gram: Tensor) -> Tensor:
        k = gram.shape[-1]
        self.check_num_objectives(k)
        key = (k, gram.device, gram.dtype)
        u = self._u.get(key)
        if u is None:
            u = remember(self._u, key, self._targets(self.pref.get(k, gram)).to(torch.float64))
        return project_dual_cone(gram, u, self.reg_eps, self.norm_eps, self.iterations)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pref_vector={self.pref!r}, norm_eps={self.norm_eps}, "
            f"reg_eps={self.reg_eps})"
        )


@register_method("upgrad")
class UPGrad(_DualConeMethod):
    r"""Unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for
    Multi-Objective Optimization", arXiv 2406.16232, 2024).

    Each gradient is projected onto the dual cone of all gradients,
    ``C = {x : <g_j, x> >= 0 for all j}``, and the projections are combined with the
    preference vector p (default ``1/K`` each): ``d = sum_i p_i pi_C(g_i)``. By the paper's
    Proposition 1, ``pi_C(J^T u) = J^T v`` with ``v = argmin_{v >= u} v^T G v``; so with
    ``u_i = p_i e_i``, ``w = sum_i v_i``. The K small QPs are solved together on the device
    (:func:`gradbal.solvers_qp.project_dual_cone`: exact for K <= 8, interior point + exact
    active-set polish above; on CUDA for 3 <= K <= 32 one Triton launch,
    :func:`gradbal.kernels.dual_cone`).

    Property: ``<g_j, d> >= 0`` for every j (no objective is made worse to first order),
    exactly when ``reg_eps = 0``; the default ridge lets ``<g_j, d>`` go below 0 by at most
    ``reg_eps * trace(G) * sum_i v_ij``.

    Defaults (TorchJD 0.18 ``UPGrad``; LibMTL's UPGrad copies them): ``pref_vector`` = mean,
    ``reg_eps = 1e-4`` added to ``G / trace(G)``. TorchJD also maps G to 0 when
    ``trace(G) < norm_eps = 1e-4``, which silently turns UPGrad into the mean once gradients
    are small; gradbal's default ``norm_eps = 0`` keeps the result scale invariant (pass
    ``norm_eps=1e-4`` to reproduce TorchJD exactly).

    Args:
        pref_vector: K weights combining the projections (default ``1/K`` each).
        norm_eps: see above (default 0).
        reg_eps: ridge on the trace-normalised Gram matrix (default 1e-4, TorchJD's).
        iterations: interior-point steps for K > 8 (default ``DUAL_CONE_STEPS`` = 9).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> d = gradbal.aggregate(g, method="upgrad", reg_eps=0.0)
        >>> d
        tensor([0.2500, 0.7500])
        >>> bool((g @ d >= 0).all())
        True
    """

    def _targets(self, p: Tensor) -> Tensor:
        return torch.diag(p)  # one projection per gradient, g_i scaled by p_i

    def weights(self, gram, losses, generator=None):
        return _as(self._project(gram).sum(0), gram)


@register_method("dualproj")
class DualProj(_DualConeMethod):
    r"""Projection of the mean gradient onto the dual cone of the gradients (the projection
    of Gradient Episodic Memory, Lopez-Paz & Ranzato, NeurIPS 2017, Eq. 11, as an
    aggregator in TorchJD).

    ``d = pi_C(sum_i p_i g_i)`` with ``C = {x : <g_j, x> >= 0 for all j}``, i.e. ``w = v``
    with ``v = argmin_{v >= p} v^T G v`` (see :class:`UPGrad` for the solver and the
    regularisation). Property: ``<g_j, d> >= 0`` for every j (exact with ``reg_eps = 0``).

    Defaults (TorchJD 0.18 ``DualProj``): ``pref_vector`` = mean, ``reg_eps = 1e-4``;
    ``norm_eps`` as in :class:`UPGrad` (gradbal default 0, TorchJD 1e-4).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> gradbal.aggregate(g, method="dualproj", reg_eps=0.0)
        tensor([0.0000, 0.5000])
    """

    def _targets(self, p: Tensor) -> Tensor:
        return p  # one projection: of the p-weighted sum of the gradients

    def weights(self, gram, losses, generator=None):
        return _as(self._project(gram), gram)
