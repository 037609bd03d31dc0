"""DWA: dynamic weight average."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import Method
from ._registry import register_method

__all__ = ["DWA"]


@register_method("dwa")
class DWA(Method):
    r"""Dynamic weight average (Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, Eq. 7).

    ``w_k(e) = K softmax_k(r(e - 1) / T)`` with ``r_k(e - 1) = L_k(e - 1) / L_k(e - 2)``,
    the ratio of objective k's average loss over the two previous epochs; ``w = 1`` for
    the first two epochs. Loss-based: one backward per step.

    The method averages the losses it is given; an epoch ends when you call
    :meth:`end_epoch` (as LibMTL's trainer does at each epoch's end), or every ``period``
    calls when ``period`` is set (``period=1`` compares consecutive steps). Until two
    epochs have ended the weights stay 1 (the sum of the losses). A previous average of 0
    gives a ratio of 1.

    State (in the optimizer's ``state_dict``): the running sum and count, the last two
    epoch averages.

    Defaults: ``temperature = 2.0`` (paper, LibMTL ``T``).

    Example:
        >>> import torch, gradbal
        >>> dwa = gradbal.get_method("dwa", period=1)
        >>> for losses in ([1.0, 1.0], [0.5, 1.0]):
        ...     _ = dwa.weights(None, torch.tensor(losses, dtype=torch.float64))
        >>> dwa.weights(None, torch.tensor([0.4, 0.9], dtype=torch.float64))
        tensor([0.8756, 1.1244], dtype=torch.float64)
    """

    requires_task_gradients = False
    needs_gram = False
    requires_losses = True
    stateful = True

    def __init__(self, temperature: float = 2.0, period: int | None = None):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if period is not None and int(period) < 1:
            raise ValueError(f"period must be >= 1 or None, got {period}")
        self.temperature = float(temperature)
        self.period = None if period is None else int(period)
        self._sum: Tensor | None = None
        self._finite: Tensor | None = None  # number of finite values summed, per objective
        self._count = 0
        self._history: list[Tensor] = []  # last two epoch averages, oldest first

    def weights(self, gram, losses, generator=None):
        if losses is None:
            raise ValueError(f"method {self.name!r} needs the loss values; pass losses=[...]")
        losses = losses.to(torch.float64)
        k = losses.shape[-1]
        if len(self._history) == 2:
            prev2, prev1 = (h.to(losses.device) for h in self._history)
            ratio = torch.where(prev2 > 0, prev1 / torch.where(prev2 > 0, prev2, 1.0), 1.0)
            w = k * torch.softmax(ratio / self.temperature, -1)
        else:
            w = torch.ones(k, dtype=torch.float64, device=losses.device)
        if self._sum is None or self._sum.shape[-1] != k:
            self._sum = torch.zeros(k, dtype=torch.float64, device=losses.device)
            self._finite = torch.zeros(k, dtype=torch.float64, device=losses.device)
            self._count = 0
        # Non-finite losses (a skipped step) do not enter the averages.
        finite = torch.isfinite(losses)
        self._sum = self._sum.to(losses.device) + torch.where(finite, losses, 0.0)
        self._finite = self._finite.to(losses.device) + finite.to(torch.float64)
        self._count += 1
        if self.period is not None and self._count >= self.period:
            self.end_epoch()
        return w

    def end_epoch(self) -> None:
        """Close the current epoch: its average loss becomes ``L(e - 1)``."""
        if self._sum is None or self._count == 0:
            return
        self._history = (self._history + [self._sum / self._finite.clamp_min(1)])[-2:]
        self._sum = torch.zeros_like(self._sum)
        self._finite = torch.zeros_like(self._sum)
        self._count = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "sum": None if self._sum is None else self._sum.clone(),
            "finite": None if self._finite is None else self._finite.clone(),
            "count": self._count,
            "history": [h.clone() for h in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"sum", "finite", "count", "history"}:
            raise ValueError(f"not a dwa state: keys {sorted(state)}")
        self._sum = None if state["sum"] is None else state["sum"].clone()
        self._finite = None if state["finite"] is None else state["finite"].clone()
        self._count = int(state["count"])
        self._history = [h.clone() for h in state["history"]][-2:]

    def __repr__(self) -> str:
        return f"DWA(temperature={self.temperature}, period={self.period})"
