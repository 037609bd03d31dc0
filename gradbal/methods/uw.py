"""Uncertainty weighting (homoscedastic task uncertainty)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import Method
from ._registry import register_method
from .famo import _Adam

__all__ = ["UW"]


@register_method("uw")
class UW(Method):
    r"""Uncertainty weighting (Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty
    to Weigh Losses for Scene Geometry and Semantics", CVPR 2018), in LibMTL's form.

    The objective is ``sum_k L_k / (2 exp(s_k)) + s_k / 2`` with learned log-variances
    ``s``; the model's gradient is ``sum_k w_k grad L_k`` with ``w_k = exp(-s_k) / 2``
    (the weights returned). Loss-based: one backward per step.

    The log-variances need their own gradient step, ``dJ/ds_k = (1 - L_k exp(-s_k)) / 2``.
    In LibMTL ``s`` is a parameter of the model's optimizer. Here the method updates it
    itself, so the wrapped optimizer stays untouched: each call returns the weights of the
    current ``s`` and then applies one Adam step (``lr``, betas (0.9, 0.999), eps 1e-8) with
    that gradient at the current losses (the same simultaneous update a joint optimizer
    makes). At a fixed loss ``s`` settles at ``log L``, i.e. ``w = 1 / (2 L)``. A step
    whose losses are not finite leaves ``s`` unchanged.

    State (in the optimizer's ``state_dict``): ``s`` and its Adam moments.

    Defaults: ``s = -0.5`` initially (LibMTL); ``lr = 1e-3`` (our choice; LibMTL uses the
    model's learning rate, 1e-4 with Adam in its configs: pass ``lr`` to match yours).

    Example:
        >>> import torch, gradbal
        >>> uw = gradbal.get_method("uw")
        >>> uw.weights(None, torch.tensor([1.0, 2.0], dtype=torch.float64))
        tensor([0.8244, 0.8244], dtype=torch.float64)
    """

    requires_task_gradients = False
    requires_losses = True
    stateful = True

    def __init__(self, lr: float = 1e-3, init: float = -0.5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.init = float(init)
        self._adam = _Adam(self.lr, (float(betas[0]), float(betas[1])), float(eps), 0.0)
        self._state: dict[str, Tensor] | None = None

    def weights(self, gram, losses, generator=None):
        if losses is None:
            raise ValueError(f"method {self.name!r} needs the loss values; pass losses=[...]")
        losses = losses.to(torch.float64)
        k = losses.shape[-1]
        state = self._state
        if state is None or state["s"].shape[-1] != k:
            zeros = torch.zeros(k, dtype=torch.float64, device=losses.device)
            state = {"s": zeros + self.init, "m": zeros.clone(), "v": zeros.clone(),
                     "t": torch.zeros((), dtype=torch.float64, device=losses.device)}
        else:
            state = {name: t.to(losses.device) for name, t in state.items()}
        s = state["s"]
        w = torch.exp(-s) / 2
        grad = (1 - losses * torch.exp(-s)) / 2
        state["s"] = self._adam.step(s, grad, state, torch.isfinite(grad).all())
        self._state = state
        return w

    @property
    def log_variances(self) -> Tensor | None:
        return None if self._state is None else self._state["s"]

    def state_dict(self) -> dict[str, Any]:
        return {} if self._state is None else {n: t.clone() for n, t in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._state = None
            return
        if set(state) != {"s", "m", "v", "t"}:
            raise ValueError(f"not a uw state: keys {sorted(state)}")
        self._state = {n: torch.as_tensor(t, dtype=torch.float64).clone() for n, t in state.items()}

    def __repr__(self) -> str:
        return f"UW(lr={self.lr}, init={self.init})"
