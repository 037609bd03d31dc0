"""FAMO and amortised MoKD: loss weights learned from the losses' own progress."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import Method
from ._common import to_device
from ._registry import register_method

__all__ = ["FAMO", "UPDATES", "MoKDAmortized"]

#: Where the "after" losses of FAMO's logit update come from (see :class:`FAMO`);
#: ``"manual"`` is an alias of ``"after_step"``.
UPDATES = ("next_batch", "after_step", "manual")


class _Adam:
    """``torch.optim.Adam`` (L2 weight decay, no amsgrad) on one vector, as tensor ops.

    The step count is a tensor so that a skipped update (non-finite losses) needs no host
    branch; a skipped update leaves every state tensor unchanged.
    """

    def __init__(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay

    def step(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], apply: Tensor) -> Tensor:
        b1, b2 = self.betas
        grad = grad + self.weight_decay * p
        t = state["t"] + 1
        m = b1 * state["m"] + (1 - b1) * grad
        v = b2 * state["v"] + (1 - b2) * grad * grad
        denom = torch.sqrt(v) / torch.sqrt(1 - b2**t) + self.eps
        new_p = p - (self.lr / (1 - b1**t)) * m / denom
        state["t"] = torch.where(apply, t, state["t"])
        state["m"] = torch.where(apply, m, state["m"])
        state["v"] = torch.where(apply, v, state["v"])
        return torch.where(apply, new_p, p)


@register_method("famo")
class FAMO(Method):
    r"""Fast adaptive multitask optimization (Liu, Liu, Jin, Stone, Liu, NeurIPS 2023).

    Loss-based: one backward per step. With logits ``xi`` (initially 0),
    ``z = softmax(xi)``, ``D_k = L_k - L_k^min + 1e-8`` and ``c = sum_k z_k / D_k``, the
    model minimises ``sum_k z_k log(D_k) / c``, whose gradient is ``sum_k w_k grad L_k``
    with ``w_k = z_k / (c D_k)``: those are the weights returned (a convex combination,
    ``sum_k w_k = 1``, that makes every objective's log-loss fall at a similar rate).

    After a parameter step, FAMO updates the logits with the improvement of each log-loss,
    ``delta_k = log D_k(before) - log D_k(after)``: ``xi`` takes an Adam step (lr
    ``lr``, L2 ``weight_decay``) along the gradient ``J_softmax(xi)^T delta``.
    The official code re-evaluates the losses on the same batch after the step (one more
    forward pass). ``update="next_batch"`` (default, the cheaper choice documented in
    ../docs/MOKD.md section 3) uses the next call's losses as "after": the update of
    step t happens at the start of call t + 1, before its weights are computed.
    ``update="after_step"`` is the published rule: after ``opt.step()``, re-evaluate the
    losses on the same batch and pass them to
    :meth:`gradbal.MultiObjectiveOptimizer.update_after_step` (or, outside an optimizer,
    to :meth:`update`)::

        opt = gradbal.MultiObjectiveOptimizer(torch.optim.Adam(model.parameters()),
                                              "famo", update="after_step")
        opt.zero_grad()
        opt.backward(compute_losses(model, batch))
        opt.step()
        with torch.no_grad():
            opt.update_after_step(compute_losses(model, batch))

    A step the optimizer skipped (non-finite gradients, or a GradScaler that found
    inf/NaN) makes ``update_after_step`` a no-op: the parameters did not move.

    ``L - L^min`` is clamped at 0 (a loss below its stated minimum would make the official
    ``log`` NaN); a step whose losses are not finite leaves the state unchanged.

    State (in the optimizer's ``state_dict``): logits, Adam moments and step, the previous
    losses.

    Defaults: ``lr = 0.025`` (official, LibMTL ``FAMO_w_lr``), ``weight_decay = 1e-3``
    (LibMTL ``FAMO_w_gamma``; the official class defaults to 1e-5 and its experiments use
    up to 1e-2), Adam betas (0.9, 0.999), eps 1e-8 (torch defaults, as official),
    ``min_losses = 0``.

    Example:
        >>> import torch, gradbal
        >>> famo = gradbal.get_method("famo")
        >>> famo.weights(None, torch.tensor([1.0, 2.0], dtype=torch.float64))
        tensor([0.6667, 0.3333], dtype=torch.float64)
    """

    requires_task_gradients = False
    needs_gram = False
    requires_losses = True
    stateful = True

    def __init__(
        self,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        update: str = "next_batch",
        min_losses: Sequence[float] | Tensor | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        update = "after_step" if update == "manual" else update
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.update_mode = update
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.min_losses = (
            None if min_losses is None else torch.as_tensor(min_losses, dtype=torch.float64).detach().cpu()
        )
        self._adam = _Adam(self.lr, self.betas, self.eps, self.weight_decay)
        self._state: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ helpers
    def _init_state(self, k: int, device: torch.device) -> dict[str, Tensor]:
        zeros = torch.zeros(k, dtype=torch.float64, device=device)
        return {
            "logits": zeros.clone(),
            "m": zeros.clone(),
            "v": zeros.clone(),
            "t": torch.zeros((), dtype=torch.float64, device=device),
            "prev_losses": torch.full((k,), float("nan"), dtype=torch.float64, device=device),
        }

    def _log_gap(self, losses: Tensor) -> Tensor:
        lmin = 0.0 if self.min_losses is None else to_device(self.min_losses, losses.device)
        return torch.log((losses - lmin).clamp_min(0) + 1e-8)

    def _state_for(self, losses: Tensor) -> dict[str, Tensor]:
        k = losses.shape[-1]
        state = self._state
        if state is None or state["logits"].shape[-1] != k:
            return self._init_state(k, losses.device)
        return {name: t.to(losses.device) for name, t in state.items()}

    def _apply_update(self, state: dict[str, Tensor], after: Tensor) -> None:
        before = state["prev_losses"]
        delta = self._log_gap(before) - self._log_gap(after)
        z = torch.softmax(state["logits"], -1)
        grad = z * (delta - (z * delta).sum(-1, keepdim=True))
        apply = torch.isfinite(delta).all()
        state["logits"] = self._adam.step(state["logits"], grad, state, apply)

    # ------------------------------------------------------------------ the method
    def weights(self, gram, losses, generator=None):
        if losses is None:
            raise ValueError(f"method {self.name!r} needs the loss values; pass losses=[...]")
        losses = losses.to(torch.float64)
        k = losses.shape[-1]
        if self.min_losses is not None and self.min_losses.numel() != k:
            raise ValueError(f"min_losses has {self.min_losses.numel()} entries but {k} losses were given")
        state = self._state_for(losses)
        if self.update_mode == "next_batch":
            self._apply_update(state, losses)  # no-op on the first call (prev is NaN)
        z = torch.softmax(state["logits"], -1)
        gap = torch.exp(self._log_gap(losses))
        c = (z / gap).sum(-1, keepdim=True)
        w = z / (c * gap)
        finite = torch.isfinite(losses).all()
        state["prev_losses"] = torch.where(finite, losses, state["prev_losses"])
        self._state = state
        return w

    @property
    def uses_losses_after_step(self) -> bool:
        return self.update_mode == "after_step"

    def update_after_step(self, losses_after: Tensor) -> None:
        self.update(losses_after)

    def update(self, losses_after: Tensor | Sequence[float]) -> None:
        """Update the logits with the losses re-evaluated after ``optimizer.step()``.

        For ``update="after_step"`` (the official schedule): call once per step, after the
        parameter update, with the same batch's losses. In a ``MultiObjectiveOptimizer``
        call ``opt.update_after_step(losses)``, which also skips the update of a skipped step.
        """
        if self.update_mode != "after_step":
            raise RuntimeError(
                f"{type(self).__name__}.update is for update='after_step'; with "
                f"update={self.update_mode!r} the next call's losses update the logits"
            )
        if self._state is None:
            raise RuntimeError("update() called before any weights() call")
        state = self._state
        if isinstance(losses_after, Tensor):
            after = losses_after.detach().to(device=state["logits"].device, dtype=torch.float64)
        else:
            after = torch.as_tensor(losses_after, dtype=torch.float64, device=state["logits"].device)
        if after.shape != state["logits"].shape:
            raise ValueError(
                f"update expects {state['logits'].shape[-1]} losses, got shape {tuple(after.shape)}"
            )
        self._apply_update(state, after)
        state["prev_losses"] = torch.full_like(after, float("nan"))

    @property
    def logits(self) -> Tensor | None:
        """Current logits ``xi`` (``softmax(xi)`` are the trade-off weights z)."""
        return None if self._state is None else self._state["logits"]

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:
            return {}
        return {name: t.clone() for name, t in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._state = None
            return
        expected = {"logits", "m", "v", "t", "prev_losses"}
        if set(state) != expected:
            raise ValueError(f"not a {self.name} state: keys {sorted(state)}")
        self._state = {name: torch.as_tensor(t, dtype=torch.float64).clone() for name, t in state.items()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lr={self.lr}, weight_decay={self.weight_decay}, "
            f"update={self.update_mode!r})"
        )


@register_method("mokd_amortized")
class MoKDAmortized(FAMO):
    r"""Amortised MoKD (DTO-KD's one-backward variant; ../docs/MOKD.md section 3).

    The trade-off weights ``pi = softmax(xi)`` are parameters, initialised uniform and
    learned by gradient steps instead of being solved for each step: FAMO's update rule
    (:class:`FAMO`, which DTO-KD is reported to draw on) with DTO-KD's settings, lr 0.025
    and weight decay 0.01. As in MoKD's exact direction, each objective is scaled by its
    (log-)loss: the weights on the raw losses are ``w_k = pi_k / (c L_k)`` with
    ``c = sum_j pi_j / L_j`` (they sum to 1; equal losses give ``w = pi``).
    The logit update uses the next batch's losses (``update="next_batch"``, the cheaper
    choice, our choice; ``update="after_step"`` plus
    :meth:`gradbal.MultiObjectiveOptimizer.update_after_step` gives the re-evaluated losses
    of the published rule, see :class:`FAMO`).

    DTO-KD also clips the model's gradient; with one backward there is no Gram matrix to
    clip from, so clip between ``backward`` and ``step`` with
    ``torch.nn.utils.clip_grad_norm_`` (the optimizer supports it).

    Example:
        >>> import torch, gradbal
        >>> m = gradbal.get_method("mokd_amortized")
        >>> m.weights(None, torch.tensor([0.5, 2.0], dtype=torch.float64))
        tensor([0.8000, 0.2000], dtype=torch.float64)
    """

    def __init__(
        self,
        lr: float = 0.025,
        weight_decay: float = 0.01,
        update: str = "next_batch",
        min_losses: Sequence[float] | Tensor | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        super().__init__(lr, weight_decay, update, min_losses, betas, eps)
