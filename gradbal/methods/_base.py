"""The contract every balancing method implements: Gram matrix (+ loss values) -> weights.

A method never sees the N-dimensional gradients. It receives the K x K Gram matrix
``G[i, j] = <g_i, g_j>`` (float64, on the gradients' device, already divided by a
GradScaler's scale^2) and the K loss values, and returns K weights ``w`` such that the
balanced update direction is ``d = sum_k w_k g_k``. Everything a Gram-based aggregator
needs (projections, norms, cosines, min-norm points) is a function of G, which is why one
pass over the gradients computes G, one more writes d, and only K x K work sits between.

Methods must not synchronise with the host: no ``.item()``, ``.cpu()``, ``.tolist()`` or
Python branching on tensor values inside :meth:`Method.weights`.

Optional hooks (each with a default that does nothing special):

* :attr:`Method.needs_gram`: False when :meth:`Method.weights` never reads the Gram matrix
  (fixed and random weightings, loss-based methods); :func:`gradbal.aggregate` then skips
  the Gram pass and calls ``weights(None, losses, generator)``.
* :meth:`Method.loss_objective`: loss-based methods; the scalar the optimizer's single
  backward differentiates (default ``sum_k w_k L_k`` with the weights detached).
* :meth:`Method.param_group`, :meth:`Method.build_parameters`, :meth:`Method.parameters`:
  trainable tensors of the method (UW's log-variances) that the *wrapped* optimizer trains,
  in a param group of their own.
* :meth:`Method.update_after_step`: an update from the losses re-evaluated after the
  parameter step (FAMO's published schedule), called by
  :meth:`gradbal.MultiObjectiveOptimizer.update_after_step`.
* :attr:`Method.elementwise` and :meth:`Method.combine`: methods whose direction is not a
  weighted sum of the gradients (GradDrop); they run their own pass over the ``[K, N]``
  rows instead of the weighted combine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Method"]


class Method:
    """Base class of gradbal's balancing methods.

    Subclasses set :attr:`name` (via :func:`gradbal.methods.register_method`) and implement
    :meth:`weights`. Stateful methods override :meth:`state_dict` /
    :meth:`load_state_dict`; random methods draw only from the ``generator`` they are given
    (the optimizer's own seeded generator), never from the global RNG.
    """

    #: Registry name, filled in by ``register_method``.
    name: ClassVar[str] = ""
    #: True when :meth:`weights` reads the loss values.
    requires_losses: ClassVar[bool] = False
    #: True when the method keeps state across steps (then K may not change between steps).
    stateful: ClassVar[bool] = False
    #: False for loss-based methods (FAMO, UW, DWA, amortised MoKD): their weights come from
    #: the loss values alone, ``weights`` is called with ``gram=None`` and the optimizer runs
    #: a single backward of ``sum_k w_k L_k`` (no per-objective gradients, no store).
    requires_task_gradients: ClassVar[bool] = True
    #: False when :meth:`weights` never reads the Gram matrix; :func:`gradbal.aggregate` then
    #: skips the Gram pass and passes ``gram=None`` (K is then ``losses.shape[-1]``: when
    #: the caller has no loss values, ``losses`` is a [K] tensor of NaN). The optimizer
    #: still forms G for its diagnostics and non-finite check.
    needs_gram: ClassVar[bool] = True
    #: True when the balanced direction is not ``sum_k w_k g_k`` but an elementwise function
    #: of the K gradients (GradDrop): the caller runs :meth:`combine` instead of the
    #: weighted combine pass. :meth:`weights` still runs (its result is reported in
    #: ``last_stats.weights``).
    elementwise: ClassVar[bool] = False
    #: True when :meth:`weights` draws from the generator (PCGrad's and GradVac's orders,
    #: RLW's weights, GradDrop's sign draws): its result then is not a function of (G, losses)
    #: alone, so it cannot be replayed from a CUDA graph (:func:`gradbal.graph_method`).
    draws_random: ClassVar[bool] = False

    @property
    def requires_nonnegative_losses(self) -> bool:
        """True when negative loss values are invalid input (log-loss scaling)."""
        return False

    def weights(
        self, gram: Tensor, losses: Tensor | None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Return the K weights of the balanced direction ``d = sum_k w_k g_k``.

        Args:
            gram: [K, K] float64 Gram matrix of the task gradients (``None`` for methods
                with ``requires_task_gradients = False``).
            losses: [K] float64 loss values (``None`` when the caller has none).
            generator: the caller's seeded CPU generator, for random methods.
        """
        raise NotImplementedError

    def combine(
        self,
        rows: Tensor,
        out: Tensor,
        accumulate: bool = False,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        coordinates: tuple[Tensor, int] | None = None,
    ) -> Tensor:
        """Elementwise methods: write the balanced direction of ``rows`` [K, N] into ``out`` [N].

        Called instead of the weighted combine pass when :attr:`elementwise` is True, once
        per (device, dtype) group of parameters. ``accumulate``: add to ``out`` instead of
        overwriting it. ``generator``: a generator *on rows' device*, seeded by the caller
        from its own seeded CPU generator (the only source of randomness allowed). ``out``
        never overlaps ``rows``. ``backend``: the caller's choice of ``"auto"``, ``"torch"``
        or ``"triton"`` (see :mod:`gradbal._ops`), for methods with a kernel of their own.
        ``coordinates``: ``None``, or ``(index, numel)`` when ``rows`` hold only the entries
        ``index`` [N] of a gradient of ``numel`` entries (a rank's ``fully_shard`` shards):
        random draws are then made for the whole gradient and read at ``index``, so that
        every rank's part equals the one process's result.
        Same rules as :meth:`weights`: no host synchronisation.
        """
        raise NotImplementedError(f"method {self.name!r} is not elementwise")

    def loss_objective(
        self, losses: Sequence[Tensor], loss_values: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Loss-based methods: the scalar the optimizer's one backward differentiates.

        Args:
            losses: the K differentiable scalar losses.
            loss_values: their detached values, [K] float64.
            generator: the optimizer's seeded generator.

        Returns ``(objective, weights)``: the default is ``sum_k w_k L_k`` with
        ``w = weights(None, loss_values, generator)`` detached (so the model's gradient is
        ``sum_k w_k grad L_k``); ``weights`` [K] float64 is what ``last_stats.weights``
        reports. A method with trainable parameters (UW) returns an objective that also
        depends on them, so the same backward gives their gradients.
        """
        w = self.weights(None, loss_values, generator)
        objective = sum(wk * loss for wk, loss in zip(w.to(losses[0].dtype).unbind(), losses))
        return objective, w

    def param_group(self) -> dict[str, Any] | None:
        """Options of the param group for this method's trainable tensors, or ``None``.

        A method that returns a dict (possibly empty: every option from the wrapped
        optimizer's defaults) owns tensors that the *wrapped* optimizer trains.
        ``MultiObjectiveOptimizer`` adds one param group for them when it is built (so LR
        schedulers built afterwards see it) and fills it on the first :meth:`backward`,
        when K and the device are known (:meth:`build_parameters`).
        """
        return None

    def build_parameters(self, num_objectives: int, device: torch.device, dtype: torch.dtype) -> None:
        """Create the trainable tensors for ``num_objectives`` objectives, if not yet there."""

    def parameters(self) -> list[Tensor]:
        """The method's trainable tensors (``nn.Parameter``; empty until built)."""
        return []

    @property
    def uses_losses_after_step(self) -> bool:
        """True when :meth:`update_after_step` is expected after each parameter step."""
        return False

    def update_after_step(self, losses_after: Tensor) -> None:
        """Update the method's state with the losses re-evaluated after the parameter step.

        ``losses_after``: [K] float64 on the device of the loss values, detached.
        """
        raise TypeError(f"method {self.name!r} takes no update after the step")

    def check_num_objectives(self, k: int) -> None:
        """Raise ``ValueError`` if this method cannot take ``k`` objectives (before any work)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"method {self.name!r} keeps no state but the checkpoint has {sorted(state)}; "
                "was it saved with another method?"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
