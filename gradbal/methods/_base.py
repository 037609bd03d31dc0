"""The contract every balancing method implements: Gram matrix (+ loss values) -> weights.

A method never sees the N-dimensional gradients. It receives the K x K Gram matrix
``G[i, j] = <g_i, g_j>`` (float64, on the gradients' device, already divided by a
GradScaler's scale^2) and the K loss values, and returns K weights ``w`` such that the
balanced update direction is ``d = sum_k w_k g_k``. Everything a Gram-based aggregator
needs (projections, norms, cosines, min-norm points) is a function of G, which is why one
pass over the gradients computes G, one more writes d, and only K x K work sits between.

Methods must not synchronise with the host: no ``.item()``, ``.cpu()``, ``.tolist()`` or
Python branching on tensor values inside :meth:`Method.weights`.
"""

from __future__ import annotations

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
