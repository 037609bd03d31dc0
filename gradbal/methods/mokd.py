"""MoKD: knowledge distillation as multi-objective optimisation (the exact direction).

Hayder, Cheraghian, Petersson, Harandi, "MoKD: Multi-Task Optimization for Knowledge
Distillation", arXiv 2505.08170 (v1); successor DTO-KD (ICLR 2026). No official code exists;
the spec gradbal follows, and which parts are our choices, is in docs/MOKD.md.
"""

from __future__ import annotations

import torch

from .._solver_kernels import MOKD_WEIGHTS
from ..solvers import min_norm_simplex
from ._base import Method
from ._registry import register_method

__all__ = ["MAGNITUDES", "MoKD"]

#: How the length of the balanced direction is set (see :class:`MoKD`).
MAGNITUDES = ("mean_loss", "faithful")


@register_method("mokd")
class MoKD(Method):
    r"""Exact MoKD direction from the Gram matrix and the loss values.

    1. Log-loss scaling: ``h_k = grad log L_k = g_k / L_k``, so
       ``H = diag(1/L) G diag(1/L)``; losses are clamped at ``loss_floor`` first, so a loss
       that underflowed to exactly 0 still gives a finite step.
    2. Trade-off weights on the simplex: ``pi = argmin_{pi >= 0, sum pi = 1} pi^T H pi``
       (closed form for K = 2, DTO-KD Thm 3.1:
       ``pi_1 = (H22 - H12) / (H11 + H22 - 2 H12)`` clamped to [0, 1]; a device solver for K > 2).
    3. Direction ``d = sum_k pi_k h_k = sum_k (pi_k / L_k) g_k``: raw-gradient weights
       ``w_k = pi_k / L_k``.
    4. Magnitude (gradbal's choice, see below), then optional clipping: ``||d||^2 = w^T G w``
       is known from G, so ``w <- w * min(1, max_norm / ||d||)`` costs no pass over memory.

    On CUDA (K <= 32, ``iterations`` not given) steps 1-4 run as one Triton launch,
    :func:`gradbal.kernels.mokd_weights`; elsewhere as torch ops.

    In the interior case every objective improves at the same rate:
    ``<d, h_1> = <d, h_2> = ||d||^2`` (no conflict, no dominance).

    **Magnitude.** ``d`` is measured in units of 1/loss, so its length grows as the losses
    fall and a learning rate tuned for the summed loss stops fitting. ``magnitude="mean_loss"``
    (default) multiplies ``d`` by ``mean_k L_k``: when the losses are equal this is exactly the
    convex combination ``sum_k pi_k g_k``, the same units as a mean-of-losses recipe such as
    classic KD's 0.5 CE + 0.5 KL, so a user keeps their learning rate.
    ``magnitude="faithful"`` keeps the paper's ``d`` unchanged. The default was chosen by
    measurement on the quickstart (README, "Choosing MoKD's magnitude").

    Args:
        log_scale: divide each gradient by its loss (step 1). With it on, a negative loss is
            an error; turn it off to balance the raw gradients (then MoKD equals MGDA).
        loss_floor: losses are clamped to at least this value before dividing (default 1e-6,
            below any loss a float32 cross-entropy reports before underflowing to 0).
        magnitude: ``"mean_loss"`` or ``"faithful"``.
        max_norm: clip ``||d||`` (after the magnitude rule) to this value; ``None`` = off.
        iterations: interior-point steps of the simplex solver for K > 8 (default
            ``gradbal.solvers.MIN_NORM_STEPS``).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> losses = torch.tensor([2.0, 1.0])
        >>> gradbal.aggregate(g, method="mokd", losses=losses, magnitude="faithful")
        tensor([0.5000, 0.5000])
    """

    requires_losses = True

    def __init__(
        self,
        log_scale: bool = True,
        loss_floor: float = 1e-6,
        magnitude: str = "mean_loss",
        max_norm: float | None = None,
        iterations: int | None = None,
    ):
        if magnitude not in MAGNITUDES:
            raise ValueError(f"magnitude must be one of {MAGNITUDES}, got {magnitude!r}")
        if not loss_floor > 0:
            raise ValueError(f"loss_floor must be > 0, got {loss_floor}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 or None, got {max_norm}")
        self.log_scale = bool(log_scale)
        self.loss_floor = float(loss_floor)
        self.magnitude = magnitude
        self.max_norm = None if max_norm is None else float(max_norm)
        self.iterations = None if iterations is None else int(iterations)

    @property
    def requires_nonnegative_losses(self) -> bool:
        return self.log_scale

    def weights(self, gram, losses, generator=None):
        if losses is None:
            raise ValueError("method 'mokd' needs the loss values; pass losses=[...]")
        if self.iterations is None and gram.dim() == 2 and MOKD_WEIGHTS.usable(gram):
            # CUDA: the whole stage below in one launch (gradbal.kernels.mokd_weights).
            w = MOKD_WEIGHTS.run(
                gram, losses, self.log_scale, self.loss_floor,
                self.log_scale and self.magnitude == "mean_loss", self.max_norm,
            )  # fmt: skip
            if w is not None:
                return w
        if self.log_scale:
            clamped = losses.clamp_min(self.loss_floor)
            inv = clamped.reciprocal()
            h = gram * (inv.unsqueeze(-1) * inv)
        else:
            inv = torch.ones_like(losses)
            h = gram
        pi = min_norm_simplex(h, self.iterations)
        w = pi * inv
        if self.magnitude == "mean_loss" and self.log_scale:
            w = w * clamped.mean()
        if self.max_norm is not None:
            norm = torch.sqrt((w @ gram @ w).clamp_min(0))
            w = w * torch.clamp(self.max_norm / norm.clamp_min(1e-30), max=1.0)
        return w

    def __repr__(self) -> str:
        return (
            f"MoKD(log_scale={self.log_scale}, loss_floor={self.loss_floor}, "
            f"magnitude={self.magnitude!r}, max_norm={self.max_norm})"
        )
