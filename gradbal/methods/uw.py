"""Uncertainty weighting (homoscedastic task uncertainty)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._base import Method
from ._registry import register_method

__all__ = ["UW"]


@register_method("uw")
class UW(Method):
    r"""Uncertainty weighting (Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty
    to Weigh Losses for Scene Geometry and Semantics", CVPR 2018), in LibMTL's form.

    The objective is ``J = sum_k L_k / (2 exp(s_k)) + s_k / 2`` with learned log-variances
    ``s``; the model's gradient is ``sum_k w_k grad L_k`` with ``w_k = exp(-s_k) / 2``.
    Loss-based: one backward per step.

    **The log-variances are real parameters trained by the wrapped optimizer**, as in
    LibMTL, where ``s`` is a parameter of the model's optimizer:
    ``MultiObjectiveOptimizer`` adds a param group for them when it is built (so an LR
    scheduler built afterwards schedules them with the model) and puts ``s`` (an
    ``nn.Parameter`` of K entries, created on the losses' device on the first
    ``backward``) into it. Each ``backward`` differentiates ``J`` once, which gives the
    model's gradient and ``dJ/ds_k = (1 - L_k exp(-s_k)) / 2``; ``step`` then updates both.
    At a fixed loss ``s`` settles at ``log L``, i.e. ``w = 1 / (2 L)``.

    The group takes every option (lr, weight decay, betas, ...) from the wrapped optimizer's
    defaults unless ``lr`` / ``weight_decay`` are given here. ``s`` is saved in the method's
    state (in the optimizer's ``state_dict``) and its optimizer state (e.g. Adam moments) in
    the wrapped optimizer's. A skipped step (non-finite gradients) leaves ``s`` unchanged.
    Outside an optimizer (``gradbal.aggregate``, ``weights``) ``s`` is not trained: the
    weights are those of the current ``s``.

    Defaults: ``s = -0.5`` initially (LibMTL); ``lr``, ``weight_decay``: the wrapped
    optimizer's (LibMTL: the model's optimizer).

    Example:
        >>> import torch, gradbal
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = gradbal.MultiObjectiveOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), "uw")
        >>> out = model(torch.ones(4, 3))
        >>> opt.backward([out[:, 0].pow(2).mean(), out[:, 1].pow(2).mean()])
        >>> opt.step()
        >>> opt.method.log_variances.shape, len(opt.param_groups)
        (torch.Size([2]), 2)
    """

    requires_task_gradients = False
    needs_gram = False
    requires_losses = True
    stateful = True

    def __init__(self, init: float = -0.5, lr: float | None = None, weight_decay: float | None = None):
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0 or None, got {lr}")
        if weight_decay is not None and not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0 or None, got {weight_decay}")
        self.init = float(init)
        self.lr = None if lr is None else float(lr)
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self._s: nn.Parameter | None = None

    # -------------------------------------------------------------- parameters
    def param_group(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.lr is not None:
            options["lr"] = self.lr
        if self.weight_decay is not None:
            options["weight_decay"] = self.weight_decay
        return options

    def build_parameters(self, num_objectives: int, device: torch.device, dtype: torch.dtype) -> None:
        if self._s is not None:
            if self._s.shape[-1] != num_objectives:
                raise ValueError(
                    f"method 'uw' has log-variances for {self._s.shape[-1]} objectives but "
                    f"{num_objectives} losses were given"
                )
            return
        dtype = torch.promote_types(dtype, torch.float32)
        self._s = nn.Parameter(torch.full((num_objectives,), self.init, dtype=dtype, device=device))

    def parameters(self) -> list[Tensor]:
        return [] if self._s is None else [self._s]

    @property
    def log_variances(self) -> Tensor | None:
        """The parameter ``s`` (``None`` before the first ``backward``)."""
        return self._s

    # -------------------------------------------------------------- weights
    def _current(self, losses: Tensor) -> Tensor:
        if self._s is None:
            return torch.full_like(losses, self.init)
        return self._s.detach().to(device=losses.device, dtype=torch.float64)

    def weights(self, gram, losses, generator=None):
        if losses is None:
            raise ValueError(f"method {self.name!r} needs the loss values; pass losses=[...]")
        losses = losses.to(torch.float64)
        return torch.exp(-self._current(losses)) / 2

    def loss_objective(
        self, losses: Sequence[Tensor], loss_values: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        if self._s is None:
            raise RuntimeError("uw: build_parameters must run before loss_objective")
        s = self._s
        # LibMTL: (losses / (2 * s.exp()) + s / 2).sum()
        objective = sum(loss / (2 * s[k].exp()) + s[k] / 2 for k, loss in enumerate(losses))
        return objective, torch.exp(-s.detach().to(torch.float64)) / 2

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {} if self._s is None else {"log_variances": self._s.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._s = None
            return
        if set(state) != {"log_variances"}:
            raise ValueError(f"not a uw state: keys {sorted(state)}")
        value = torch.as_tensor(state["log_variances"]).detach()
        if value.ndim != 1 or not value.is_floating_point():
            raise ValueError(f"uw log_variances must be a 1-D float tensor, got {tuple(value.shape)}")
        if self._s is not None and self._s.shape == value.shape:
            # Keep the parameter object: the wrapped optimizer's state is keyed by it.
            with torch.no_grad():
                self._s.copy_(value)
        else:
            self._s = nn.Parameter(value.clone())

    def __repr__(self) -> str:
        return f"UW(init={self.init}, lr={self.lr}, weight_decay={self.weight_decay})"
