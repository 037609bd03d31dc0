"""GradVac: gradient vaccine, PCGrad towards adaptive target similarities."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import Method
from ._common import to_device
from ._registry import register_method

__all__ = ["GradVac"]

EMA_UPDATES = ("always", "on_conflict")


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
        g = gram.to(torch.float64)
        device = g.device
        target = self._target
        if target is None or target.shape != (k, k):
            target = torch.zeros(k, k, dtype=torch.float64, device=device)
        else:
            target = target.to(device).clone()
        keys = torch.rand(k, k, generator=generator, dtype=torch.float64)
        keys.fill_diagonal_(2.0)
        order = to_device(keys.argsort(dim=1)[:, : k - 1].contiguous(), device)
        coef = torch.eye(k, dtype=torch.float64, device=device)
        norms = torch.sqrt(g.diagonal().clamp_min(0))
        # Round t pairs each i with j = order[i, t]. Selecting entries (i, j) by multiplying
        # with the one-hot rows of j and summing costs two cheap ops where advanced indexing
        # costs one slow one (~10x a small op on a CPU); built once for all rounds.
        pick = order.T.unsqueeze(-1) == torch.arange(k, device=device)  # [K - 1, K, K]
        pick_f = pick.to(torch.float64)
        norms_j = norms[order.T]  # [K - 1, K]
        for t in range(k - 1):
            sel, sel_f, norm_j = pick[t], pick_f[t], norms_j[t]
            cg = coef @ g  # cg[i, m] = <g_i', g_m>
            dots = (cg * sel_f).sum(1)
            norm_i = torch.sqrt((cg * coef).sum(1).clamp_min(0))
            phi = dots / (norm_i * norm_j + self.eps)
            phi_hat = (target * sel_f).sum(1)
            conflict = phi < phi_hat
            sqrt_phi = torch.sqrt((1 - phi * phi).clamp_min(0))
            sqrt_hat = torch.sqrt((1 - phi_hat * phi_hat).clamp_min(0))
            step = norm_i * (phi_hat * sqrt_phi - phi * sqrt_hat) / (norm_j * sqrt_hat + self.eps)
            step = torch.where(conflict, step, 0.0)
            coef = torch.addcmul(coef, step.unsqueeze(1), sel_f)
            new_hat = (1 - self.beta) * phi_hat + self.beta * phi
            if self.ema_update == "on_conflict":
                new_hat = torch.where(conflict, new_hat, phi_hat)
            # A non-finite Gram matrix (a skipped step) must not poison the targets.
            keep = sel & torch.isfinite(new_hat).unsqueeze(1)
            target = torch.where(keep, new_hat.unsqueeze(1), target)
        self._target = target
        return coef.sum(0).to(gram.dtype)

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
