"""GradDrop: gradient sign dropout."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _ops
from ._base import Method
from ._common import check_pref_vector, num_objectives, to_device
from ._registry import register_method

__all__ = ["GradDrop"]


@register_method("graddrop")
class GradDrop(Method):
    r"""Gradient sign dropout (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just
    Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020,
    Algorithm 1).

    Elementwise, at every coordinate j of the K gradients:

    * positive sign purity ``P_j = 1/2 (1 + sum_i g_ij / sum_i |g_ij|)`` (in [0, 1]);
    * one uniform draw ``U_j ~ U(0, 1)`` shared by all objectives;
    * mask ``M_ij = [P_j > U_j] [g_ij > 0] + [P_j <= U_j] [g_ij < 0]``: the positive
      gradients survive with probability P_j, the negative ones otherwise;
    * with leak ``l_i`` (default 0): ``M_ij <- l_i + (1 - l_i) M_ij``;
    * ``d_j = sum_i M_ij g_ij``.

    Where every gradient has the same sign (or is 0) nothing is dropped: ``P = 1`` keeps all
    positive values, ``P = 0`` all negative ones (the tie ``P = U``, of probability 0,
    counts for the negatives so that ``P = 0`` keeps them even for ``U = 0``). A coordinate
    where every gradient is 0 gives 0. ``P`` follows the paper exactly (LibMTL adds 1e-7 to
    the denominator, which pulls ``P`` towards 1/2 for tiny gradients and then drops
    gradients that all agree in sign).

    This is the parameter-gradient form (each parameter coordinate is a j): the paper also
    applies GradDrop to the gradients at a shared activation, summed over the batch after
    multiplying by the sign of the input; that needs the per-example activations and is
    not what the store holds.

    Not a weighted sum ``sum_k w_k g_k``: GradDrop runs its own pass over the ``[K, N]``
    rows (:meth:`combine`, through :func:`gradbal._ops.graddrop`: a fused Triton kernel on
    CUDA tensors, torch ops otherwise; both give the same bits), reading each row once; the
    noise ``U`` is drawn on the rows' device from a generator seeded by the optimizer's
    seeded generator (by ``generator`` in :func:`gradbal.aggregate`), with torch, before the
    pass. ``weights`` returns ones (what ``last_stats.weights`` reports: the direction before
    the dropout is the sum).

    Non-finite gradients: a coordinate where some ``g_ij`` is inf or NaN gets the plain sum
    ``sum_i g_ij`` (inf, -inf or NaN), never a finite value (so the optimizer's non-finite
    check and policy see the step as it is).

    Args:
        leak: ``l``, one value in [0, 1] per objective (or ``None``: 0 for all, the paper's
            default for multitask training; ``l_i = 1`` passes objective i through).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the pass (see
            :mod:`gradbal._ops`); a ``backend`` given to :meth:`combine` other than ``"auto"``
            takes precedence.

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 0.0]])
        >>> gradbal.aggregate(g, method="graddrop")  # no conflict: nothing dropped
        tensor([ 4.0000, -3.0000,  0.5000])
    """

    draws_random = True
    needs_gram = False
    elementwise = True

    def __init__(self, leak: Sequence[float] | Tensor | None = None, backend: str = "auto"):
        if backend not in _ops.BACKENDS:
            raise ValueError(f"backend must be one of {_ops.BACKENDS}, got {backend!r}")
        self.backend = backend
        self.leak = check_pref_vector(leak)
        self._num = None if self.leak is None else self.leak.numel()
        if self.leak is not None and not ((self.leak >= 0) & (self.leak <= 1)).all():
            raise ValueError(f"leak must be in [0, 1], got {self.leak.tolist()}")
        self._fast = self.leak is None or not bool(self.leak.any())  # no leak: two sums
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def check_num_objectives(self, k: int) -> None:
        if self._num is not None and self._num != k:
            raise ValueError(
                f"method 'graddrop' has {self._num} leak values but {k} objectives "
                "were given; pass one per objective"
            )

    def weights(self, gram, losses, generator=None):
        like = gram if gram is not None else losses
        k = num_objectives(gram, losses, self.name)
        self.check_num_objectives(k)
        return torch.ones(k, dtype=torch.float64, device=like.device)

    def _leak(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            leak = to_device(self.leak, device).to(dtype)
            self._cache[key] = (leak, 1 - leak)
        return self._cache[key]

    def combine(
        self, rows, out, accumulate=False, generator=None, backend=None, coordinates=None
    ):
        k, n = rows.shape
        self.check_num_objectives(k)
        work = torch.promote_types(rows.dtype, torch.float32)  # arithmetic and noise dtype
        # The noise for the whole row in one draw, so that it depends neither on the blocks of
        # the torch pass nor on the backend; it goes into ``out`` itself when ``out`` has the
        # right dtype and is overwritten (each column's noise is read before its result is
        # written, by either backend).
        if coordinates is not None:
            # A rank's shards of a larger gradient (fully_shard): the one process's stream over
            # all of it, read at this rank's coordinates. Costs a temporary of the whole size.
            index, numel = coordinates
            stream = torch.empty(numel, dtype=work, device=rows.device)
            noise = stream.uniform_(0.0, 1.0, generator=generator)[index]
        else:
            reuse_out = not accumulate and out.dtype == work
            noise = out if reuse_out else torch.empty(n, dtype=work, device=rows.device)
            noise.uniform_(0.0, 1.0, generator=generator)
        leak = None if self._fast else self._leak(rows.device, work)
        if backend is None or backend == "auto":
            backend = self.backend
        return _ops.graddrop(rows, noise, out, accumulate, leak, backend=backend)

    def __repr__(self) -> str:
        leak = None if self.leak is None else self.leak.tolist()
        extra = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"GradDrop(leak={leak}{extra})"
