"""GradVac: gradient vaccine, PCGrad towards adaptive target similarities."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .._solver_kernels import GRADVAC
from ..solvers_qp import _eye
from ._base import Method
from ._common import partner_orders, to_device
from ._registry import register_method

__all__ = ["GradVac"]

EMA_UPDATES = ("always", "on_conflict")


# Constants (no ops per call), never modified in place; the identity is the solvers' _eye.
@functools.lru_cache(maxsize=32)
def _offdiag(k: int, device: torch.device) -> Tensor:
    return ~torch.eye(k, dtype=torch.bool, device=device)


@functools.lru_cache(maxsize=32)
def _arange(k: int, device: torch.device) -> Tensor:
    return torch.arange(k, device=device)


@functools.lru_cache(maxsize=32)
def _nan(device: torch.device) -> Tensor:
    return torch.tensor(float("nan"), dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=32)
def _eps_offdiag(eps: float, device: torch.device) -> Tensor:
    """``[[nan, eps], [eps, nan]]``."""
    return torch.tensor([[float("nan"), eps], [eps, float("nan")]], dtype=torch.float64, device=device)


@register_method("gradvac")
class GradVac(Method):
    r"""Gradient vaccine (Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021, Alg. 1),
    on the whole model (one block of parameters).

    For each objective i, over the others j in a random order, with
    ``phi_ij = <g_i', g_j> / (||g_i'|| ||g_j|| + eps)`` and target ``phi_hat_ij``:
    if ``phi_ij < phi_hat_ij``,
    ``g_i' <- g_i' + ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) /
    (||g_j|| sqrt(1 - phi_hat^2) + eps) g_j``; then the target follows the EMA
    ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij``. ``d = sum_i g_i'``. Targets start
    at 0, so the first step is PCGrad's.

    As in :class:`~gradbal.methods.pcgrad.PCGrad`, each ``g_i'`` is a row of coefficients
    over the original gradients and every inner product comes from G, all i advance in
    parallel (K - 1 rounds, no host sync); the orders come from the optimizer's generator.
    K = 2 has a single round, done for both pairs at once as K x K arrays (32 small ops where
    the rounds take 54; the same bits). The orders are drawn at every K, K = 2 included (where
    they are forced), so the generator advances alike at every K. On CUDA (K <= 32) the rounds
    run as one Triton launch (:func:`gradbal.kernels.gradvac_weights`; equal to rounding).

    State (in the optimizer's ``state_dict``): the K x K targets ``phi_hat`` (left unchanged
    by a step whose Gram matrix is not finite).

    Defaults: ``beta = 0.5`` (LibMTL ``GradVac_beta``, TorchJD 0.18), ``eps = 1e-8``
    (LibMTL, TorchJD; absolute, as there). ``ema_update="always"`` updates the target after
    every pair (paper Alg. 1, TorchJD); LibMTL updates it only when the pair conflicted
    (``"on_conflict"``).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> gradbal.aggregate(g, method="gradvac")  # first step: PCGrad
        tensor([0.5000, 1.5000])
    """

    draws_random = True
    stateful = True

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, ema_update: str = "always"):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if ema_update not in EMA_UPDATES:
            raise ValueError(f"ema_update must be one of {EMA_UPDATES}, got {ema_update!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.ema_update = ema_update
        self._target: Tensor | None = None

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
        device = g.device
        target = self._target
        if target is None or target.shape != (k, k):
            target = torch.zeros(k, k, dtype=torch.float64, device=device)
        elif target.device != device:
            target = target.to(device)
        # The orders' draw is made at K = 2 too, where the order is forced: the generator (in
        # the optimizer's checkpoint, and the caller's to share) advances as at every K.
        keys = torch.rand(k, k, generator=generator, dtype=torch.float64)
        if GRADVAC.usable(g):
            # CUDA, 2 <= K <= 32: the rounds below in one launch (gradbal.kernels.gradvac_weights).
            order = to_device(partner_orders(keys).contiguous(), device)
            t64 = target if target.dtype == torch.float64 else target.to(torch.float64)
            out = GRADVAC.run(g, t64, order, self.beta, self.eps, self.ema_update == "on_conflict")
            if out is not None:
                w, self._target = out
                return w if gram.dtype == torch.float64 else w.to(gram.dtype)
        norms = torch.sqrt(g.diagonal().clamp_min(0))
        # Any non-finite entry of G makes every cosine NaN: no pair conflicts (w = 1) and no
        # target moves (a skipped step must not poison the state).
        finite = torch.isfinite(g).all()
        if k == 2:
            w, target = self._pair(g, target, norms, finite)
        else:
            order = to_device(partner_orders(keys), device)
            w, target = self._rounds(g, target, norms, finite, order)
        self._target = target
        return w if gram.dtype == torch.float64 else w.to(gram.dtype)

    def _update(self, phi_hat: Tensor, phi: Tensor, conflict: Tensor) -> Tensor:
        """The EMA ``(1 - beta) phi_hat + beta phi`` (only where the pair conflicted for
        ``"on_conflict"``)."""
        new_hat = (1 - self.beta) * phi_hat + self.beta * phi
        if self.ema_update == "on_conflict":
            new_hat = torch.where(conflict, new_hat, phi_hat)
        return new_hat

    def _pair(self, g: Tensor, target: Tensor, norms: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
        """K = 2 in closed form: the one round, for both pairs at once, entry (i, j) of each
        K x K array being pair (i, j) (no gathers, no scatter into the targets).

        ``phi = G / (||g_i|| ||g_j|| + eps)``, ``w_j = 1 + step_ij`` (i the other) with
        ``step_ij = ||g_i|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) /
        (||g_j|| sqrt(1 - phi_hat^2) + eps)`` if ``phi_ij < phi_hat_ij``, else 0; the same
        operations on the same values as the rounds (in round 0, ``C G = G``): the same bits.
        """
        ncol = norms.unsqueeze(1)
        # eps off the diagonal, NaN on it (no pair (i, i): it never conflicts, its EMA is not
        # finite, so it is never written) and everywhere when G is not finite.
        eps = torch.where(finite, _eps_offdiag(self.eps, g.device), _nan(g.device))
        phi = g / (ncol * norms + eps)
        conflict = phi < target
        both = torch.stack((phi, target))  # one sqrt(1 - x^2) for both
        sqrt_phi, sqrt_hat = torch.sqrt((1 - both * both).clamp_min(0))
        step = ncol * (target * sqrt_phi - phi * sqrt_hat) / (norms * sqrt_hat + self.eps)
        # Column j: 1 on the diagonal plus the step of the other row.
        w = torch.where(conflict, step, _eye(2, g.device)).sum(0)
        new_hat = self._update(target, phi, conflict)
        return w, torch.where(torch.isfinite(new_hat), new_hat, target)

    def _rounds(
        self, g: Tensor, target: Tensor, norms: Tensor, finite: Tensor, order: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The K - 1 rounds: round t pairs each i with ``j = order[i, t]``."""
        k = g.shape[-1]
        device = g.device
        coef = _eye(k, device)
        # Everything that depends on (i, j) only, for all rounds at once, as [K - 1, K, 1]
        # (round, i): each pair (i, j) comes once, so its target is read before any write.
        idx = order.T.unsqueeze(-1)
        pick = idx == _arange(k, device)  # [K - 1, K, K]: one-hot rows of j
        pick_f = pick.to(torch.float64)
        # Entries selected by multiplying with the one-hot rows and summing: two cheap ops
        # where advanced indexing (norms[order]) costs one slow one (~10x a small op on a CPU).
        norm_j = torch.where(finite, (pick_f * norms).sum(-1, keepdim=True), _nan(device))
        phi_hat = (target * pick_f).sum(-1, keepdim=True)
        sqrt_hat = torch.sqrt((1 - phi_hat * phi_hat).clamp_min(0))
        den = norm_j * sqrt_hat + self.eps
        # Round 0 has C = I: C G = G and ||g_i'|| = ||g_i|| (the same bits for a finite G).
        cg, norm_i = g, norms.unsqueeze(1)
        phis, conflicts = [], []
        for t, (j, sel_f, nj, hat, s_hat, d) in enumerate(
            zip(idx.unbind(0), pick_f.unbind(0), norm_j.unbind(0), phi_hat.unbind(0),
                sqrt_hat.unbind(0), den.unbind(0))
        ):
            if t:
                cg = coef @ g  # cg[i, m] = <g_i', g_m>
                norm_i = torch.sqrt((cg * coef).sum(1, keepdim=True).clamp_min(0))
            phi = cg.gather(1, j) / (norm_i * nj + self.eps)
            conflict = phi < hat
            sqrt_phi = torch.sqrt((1 - phi * phi).clamp_min(0))
            step = norm_i * (hat * sqrt_phi - phi * s_hat) / d
            coef = torch.addcmul(coef, torch.where(conflict, step, 0.0), sel_f)
            phis.append(phi)
            conflicts.append(conflict)
        conflict = torch.stack(conflicts) if self.ema_update == "on_conflict" else None
        new_hat = self._update(phi_hat, torch.stack(phis), conflict)
        # Into the targets: entry (i, j) gets its round's value (plus zeros from the others);
        # a non-finite one (skipped step) leaves the target as it was.
        new = torch.where(pick, new_hat, 0.0).sum(0)
        return coef.sum(0), torch.where(torch.isfinite(new) & _offdiag(k, device), new, target)

    def state_dict(self) -> dict[str, Any]:
        return {"target": None if self._target is None else self._target.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"target"}:
            raise ValueError(f"not a gradvac state: keys {sorted(state)}")
        t = state["target"]
        if t is not None and (t.ndim != 2 or t.shape[0] != t.shape[1]):
            raise ValueError(f"gradvac target must be a K x K tensor, got shape {tuple(t.shape)}")
        self._target = None if t is None else t.clone()

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, eps={self.eps}, ema_update={self.ema_update!r})"
