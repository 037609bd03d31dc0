"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

import torch

from .._solver_kernels import CAGRAD
from ..solvers_qp import CAGRAD_ITERATIONS, cagrad_direction_2, cagrad_weights
from ._base import Method
from ._registry import register_method

__all__ = ["CAGrad"]

_RESCALE = (0, 1, 2)


@register_method("cagrad")
class CAGrad(Method):
    r"""Conflict-averse gradient descent (Liu, Liu, Jin, Stone, Liu, NeurIPS 2021, Alg. 1).

    The update maximises the worst local improvement in a ball around the mean gradient
    ``g_0``: ``max_d min_i <g_i, d>`` s.t. ``||d - g_0|| <= c ||g_0||``. Its dual is
    ``w* = argmin_{w in simplex} <g_w, g_0> + phi ||g_w||`` with ``g_w = sum_i w_i g_i`` and
    ``phi = c ||g_0||``, and then ``d = g_0 + (phi / ||g_w*||) g_w*``, divided by
    ``1 + c^2`` (``rescale=1``), ``1 + c`` (``rescale=2``) or 1 (``rescale=0``). The inner
    problem is solved on the device from G alone (:func:`gradbal.solvers_qp.cagrad_weights`:
    closed form for K = 2, exact face enumeration for K <= 8, interior point + exact solves
    on the faces it ranks above).

    With ``c = 0`` CAGrad is the mean gradient. When ``||g_w*||`` is at or below
    ``norm_eps * sqrt(trace(G))`` the gradients are (nearly) Pareto-stationary and the
    direction is 0 (TorchJD's rule, applied to the trace-normalised Gram matrix as TorchJD
    does).

    Defaults: ``c = 0.5`` (paper, official code, LibMTL ``calpha``; TorchJD requires c);
    ``rescale = 1`` (official code and LibMTL; TorchJD does not rescale: pass
    ``rescale=0`` for TorchJD's ``CAGrad(c)``); ``norm_eps = 1e-4`` (TorchJD).

    Args:
        c: radius of the ball, relative to ``||g_0||`` (>= 0).
        rescale: 0, 1 or 2 (see above).
        norm_eps: relative threshold on ``||g_w*||`` (see above).
        iterations: interior-point steps for K > 8.

    Example:
        >>> import torch, gradbal
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> gradbal.aggregate(J, method="cagrad", c=0.5, rescale=0)
        tensor([0.1835, 1.2041, 1.2041])
        >>> gradbal.aggregate(J, method="cagrad", c=0.0)
        tensor([1., 1., 1.])
    """

    def __init__(
        self, c: float = 0.5, rescale: int = 1, norm_eps: float = 1e-4,
        iterations: int = CAGRAD_ITERATIONS,
    ):
        if not c >= 0:
            raise ValueError(f"c must be >= 0, got {c}")
        if rescale not in _RESCALE:
            raise ValueError(f"rescale must be one of {_RESCALE}, got {rescale!r}")
        if not norm_eps >= 0:
            raise ValueError(f"norm_eps must be >= 0, got {norm_eps}")
        self.c = float(c)
        self.rescale = rescale
        self.norm_eps = float(norm_eps)
        self.iterations = int(iterations)

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        if self.c > 0 and self.iterations == CAGRAD_ITERATIONS and CAGRAD.usable(gram):
            # CUDA, 2 <= K <= 32: inner problem and direction in one launch
            # (gradbal.kernels.cagrad_direction).
            out = CAGRAD.run(gram, self.c, self.norm_eps, divisor)
            if out is not None:
                w = out[0]
                return w if w.dtype == gram.dtype else w.to(gram.dtype)
        if self.c == 0:
            w = torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
        elif k == 2:
            w = cagrad_direction_2(gram, self.c, self.norm_eps)  # the same, in fewer ops
        else:
            w_opt, r, phi = cagrad_weights(gram, self.c, self.iterations)
            # At or below the threshold the direction is 0 (r = 0 included, also with
            # norm_eps = 0); above it r > 0 and phi / r is finite (where() never lets the
            # unselected branch's inf/NaN through).
            w = torch.where(r <= self.norm_eps, 0.0, (phi / r) * w_opt + 1.0 / k)
        w = w / divisor
        return w if w.dtype == gram.dtype else w.to(gram.dtype)

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c}, rescale={self.rescale}, norm_eps={self.norm_eps})"
