"""Nash-MTL: multi-task learning as a bargaining game."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..solvers_qp import FAIR_STEPS, fair_weights
from ._base import Method
from ._registry import register_method

__all__ = ["NashMTL"]


@register_method("nash_mtl")
class NashMTL(Method):
    r"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya,
    "Multi-Task Learning as a Bargaining Game", ICML 2022, Alg. 1).

    The Nash bargaining solution: ``d = sum_k alpha_k g_k`` with ``alpha > 0`` solving
    ``G alpha = 1 / alpha`` (each objective's improvement ``<g_k, d>`` equals
    ``1 / alpha_k``). The official code approaches it by a sequential convex approximation
    (CCP with cvxpy/ECOS, at most ``optim_niter = 20`` steps, stopped when
    ``||G alpha - 1/alpha|| < 1e-3``). Its fixed point is the unique minimiser of the strictly
    convex ``1/2 alpha^T G alpha - sum_k log alpha_k``; gradbal solves that problem on the
    device by damped Newton steps (each a convex quadratic model, solved exactly) with a
    batched line search, a fixed ``iterations`` count and no host sync
    (:func:`gradbal.solvers_qp.fair_weights` with alpha = 1). It converges to ~1e-15
    where the official solver may stop early: from a fresh start TorchJD 0.18's ``NashMTL``
    agrees with gradbal to ~1e-8 (its tolerance), but warm-started from the previous call (its default) its
    CCP can stop far from ``G alpha = 1/alpha`` (75% off on a second random matrix in
    gradbal's tests).

    Then, as in the official code, ``alpha`` is scaled so that ``||d|| <= max_norm``
    (``||d||^2 = alpha^T G alpha``; at the exact solution ``||d|| = sqrt(K)``).
    ``update_weights_every = n`` recomputes ``alpha`` every n-th call and reuses the last one
    in between (the clipping still uses the current G). Degenerate inputs: see
    :func:`~gradbal.solvers_qp.fair_weights` (a zero or cancelling gradient gets a large but
    finite weight that multiplies a zero combination).

    State (in the optimizer's ``state_dict``): the step counter and the last ``alpha``.

    Defaults (official code, LibMTL, TorchJD): ``max_norm = 1.0``,
    ``update_weights_every = 1``; ``max_norm = 0`` turns clipping off.

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> gradbal.aggregate(g, method="nash_mtl", max_norm=0.0)
        tensor([1., 1.])
    """

    stateful = True

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, iterations: int = FAIR_STEPS):
        if not max_norm >= 0:
            raise ValueError(f"max_norm must be >= 0 (0 = no clipping), got {max_norm}")
        if int(update_weights_every) < 1:
            raise ValueError(f"update_weights_every must be >= 1, got {update_weights_every}")
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.iterations = int(iterations)
        self._step = 0
        self._alpha: Tensor | None = None

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
        alpha = self._alpha
        if alpha is not None and alpha.shape[-1] != k:
            alpha = None
        elif alpha is not None and alpha.device != g.device:
            alpha = alpha.to(g.device)
        if alpha is None or self._step % self.update_weights_every == 0:
            fresh = fair_weights(g, 1.0, self.iterations)
            quad = fresh @ g @ fresh
            if alpha is not None:
                # Keep the last good alpha when this Gram matrix (or the solution) is not
                # finite. alpha^T G alpha tells (one op where the entrywise checks take
                # five): an infinite or NaN entry of G or alpha makes it infinite or NaN, as
                # alpha >= 0 (a zero weight times an infinite entry is NaN).
                ok = torch.isfinite(quad)
                fresh = torch.where(ok, fresh, alpha)
            alpha = fresh
        else:
            quad = alpha @ g @ alpha
        self._alpha = alpha
        self._step += 1
        if self.max_norm > 0:
            # min(1, max_norm / ||d||), ||d||^2 = alpha^T G alpha (||d|| = 0: max_norm / 0 =
            # inf, clamped to 1); for max_norm = 1 as 1 / sqrt(max(||d||^2, 1)): the same
            # bits, two ops fewer.
            if self.max_norm == 1.0:
                alpha = alpha * quad.clamp_min(1.0).sqrt().reciprocal()
            else:
                alpha = alpha * torch.clamp(self.max_norm / quad.clamp_min(0).sqrt(), max=1.0)
        return alpha if gram.dtype == torch.float64 else alpha.to(gram.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "alpha": None if self._alpha is None else self._alpha.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"step", "alpha"}:
            raise ValueError(f"not a nash_mtl state: keys {sorted(state)}")
        self._step = int(state["step"])
        self._alpha = None if state["alpha"] is None else state["alpha"].clone()

    def __repr__(self) -> str:
        return f"NashMTL(max_norm={self.max_norm}, update_weights_every={self.update_weights_every})"
