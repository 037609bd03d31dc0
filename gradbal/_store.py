"""The flat per-task gradient store.

One preallocated buffer per (device, dtype) group of parameters:

* ``rows[K, N]``: row k receives objective k's gradient. During objective k's backward every
  parameter's ``.grad`` is a view into ``rows[k]``, and autograd accumulates in place into an
  existing ``.grad``, so the gradients land in the store with no ``cat``, ``stack`` or clone.
* ``out[N]``: the balanced gradient. After :meth:`GradientStore.point_grads_at_out` every
  reached parameter's ``.grad`` is a view into ``out``; the wrapped optimizer reads it there.

``out`` is separate from the rows so that a call that fails half-way (a loss that reaches no
parameter, a sparse gradient) can put every ``.grad`` back exactly as it was: memory is
(K + 1) N elements per group instead of K N.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GradientStore", "ParamGroupStore"]


def flat_offsets(numels: Sequence[int]) -> tuple[list[int], int]:
    """Start of each parameter's segment in a flat buffer, and the buffer's length."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += n
    return offsets, total


class ParamGroupStore:
    """Rows and output buffer for parameters sharing one device and dtype."""

    def __init__(self, params: Sequence[torch.nn.Parameter], indices: Sequence[int]):
        self.params = list(params)
        self.indices = list(indices)  # positions in the store's overall parameter list
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.numels = [p.numel() for p in self.params]
        self.offsets, self.numel = flat_offsets(self.numels)
        total = self.numel
        self.out = torch.zeros(total, device=self.device, dtype=self.dtype)
        self.out_views = self._views(self.out)
        self.rows = torch.empty(0, total, device=self.device, dtype=self.dtype)
        self.row_views: list[list[Tensor]] = []

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [
            flat[o : o + n].view(p.shape)
            for p, o, n in zip(self.params, self.offsets, self.numels)
        ]

    def allocate(self, k: int) -> None:
        """Make room for ``k`` rows (reallocates only when K grows or shrinks)."""
        if self.rows.shape[0] != k:
            self.rows = torch.empty(k, self.numel, device=self.device, dtype=self.dtype)
            self.row_views = [self._views(self.rows[i]) for i in range(k)]

    def segment(self, position: int) -> slice:
        o = self.offsets[position]
        return slice(o, o + self.numels[position])

    def owns_out_view(self, position: int, grad: Tensor) -> bool:
        view = self.out_views[position]
        return grad.data_ptr() == view.data_ptr() and grad.shape == view.shape


class GradientStore:
    """Per-(device, dtype) :class:`ParamGroupStore` s for an ordered list of parameters."""

    #: The per-(device, dtype) store (the sharded store swaps in its own).
    group_class: type[ParamGroupStore] = ParamGroupStore

    @staticmethod
    def local(t: Tensor) -> Tensor:
        """The data of a parameter or gradient this rank holds (all of it here; a DTensor's
        local shard in the sharded store)."""
        return t

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.key = tuple(id(p) for p in self.params)
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            t = self.local(p)
            by_kind.setdefault((t.device, t.dtype), []).append(i)
        self.groups = [
            self.group_class([self.params[i] for i in idx], idx) for idx in by_kind.values()
        ]
        # (group, position in group) for every parameter index.
        self.location: list[tuple[ParamGroupStore, int]] = [None] * len(self.params)  # type: ignore[list-item]
        for g in self.groups:
            for pos, i in enumerate(g.indices):
                self.location[i] = (g, pos)

    def allocate(self, k: int) -> None:
        for g in self.groups:
            g.allocate(k)

    def zero_rows(self) -> None:
        for g in self.groups:
            g.rows.zero_()

    def snapshot_grads(self) -> list[Tensor | None]:
        return [p.grad for p in self.params]

    def restore_grads(self, snapshot: Sequence[Tensor | None]) -> None:
        for p, g in zip(self.params, snapshot):
            p.grad = g

    def point_grads_at_row(self, k: int) -> None:
        for g in self.groups:
            for p, v in zip(g.params, g.row_views[k]):
                p.grad = v

    def prepare_out(self, snapshot: Sequence[Tensor | None]) -> bool:
        """Load gradients that existed before this backward into ``out``, so the balanced
        gradient is added to them (``Tensor.backward`` semantics). Returns True if any did;
        parameters without one get a zero segment. Only runs when accumulating."""
        if all(s is None for s in snapshot):
            return False
        for i, prev in enumerate(snapshot):
            g, pos = self.location[i]
            seg = g.out[g.segment(pos)]
            if prev is None:
                seg.zero_()
            elif not g.owns_out_view(pos, prev):
                seg.copy_(self.local(prev).reshape(-1))
        return True

    def point_grads_at_out(
        self, reached: Sequence[bool], snapshot: Sequence[Tensor | None]
    ) -> None:
        """Reached parameters read the balanced gradient from ``out``; the others keep the
        ``.grad`` they had (``None`` after ``zero_grad``)."""
        for i, p in enumerate(self.params):
            if reached[i] or snapshot[i] is not None:
                g, pos = self.location[i]
                p.grad = g.out_views[pos]
            else:
                p.grad = None

    def row_segment(self, index: int, k: int) -> Tensor:
        g, pos = self.location[index]
        return g.rows[k, g.segment(pos)]
