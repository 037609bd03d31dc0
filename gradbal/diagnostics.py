"""Per-step diagnostics of gradient conflict and dominance, read off the Gram matrix.

* Conflict (GrC): ``cos_ij = G_ij / sqrt(G_ii G_jj) < 0``.
* Dominance (GrD): ``||g_i|| / ||g_j||`` far from 1 (MoKD measured 1e-3 in real KD runs).

All fields are tensors on the gradients' device: producing them costs no host sync.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StepStats", "cosines_from_gram", "norms_from_gram"]


def norms_from_gram(gram: Tensor) -> Tensor:
    """``||g_k|| = sqrt(G_kk)``."""
    return gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()


def cosines_from_gram(gram: Tensor) -> Tensor:
    """Pairwise cosines ``G_ij / (||g_i|| ||g_j||)``; 0 where a gradient is zero."""
    norms = norms_from_gram(gram)
    den = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    return torch.where(den > 0, gram / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


@dataclass
class StepStats:
    """What :meth:`gradbal.MultiObjectiveOptimizer.backward` measured this step.

    Attributes:
        weights: [K] weights applied to the task gradients (``d = sum_k w_k g_k``).
        gram: [K, K] Gram matrix of the (unscaled) task gradients, float64 (``None`` for
            loss-based methods, which never form per-objective gradients).
        norms: [K] gradient norms (``None`` for loss-based methods).
        cosines: [K, K] pairwise cosines, conflict where negative (``None`` likewise).
        losses: [K] loss values, float64.
        nonfinite: [K] bool, True where objective k's gradient had a NaN or Inf.
        skipped_steps: steps skipped so far because of non-finite gradients.

    ``norms`` and ``cosines`` are computed from ``gram`` when first read: a training step
    that never looks at them does not pay their ~15 small tensor ops (each a kernel launch
    on a GPU, a few microseconds on a CPU).
    """

    weights: Tensor
    gram: Tensor | None
    losses: Tensor
    nonfinite: Tensor
    skipped_steps: int = 0

    @classmethod
    def from_gram(cls, weights, gram, losses, nonfinite, skipped_steps=0) -> StepStats:
        return cls(weights=weights, gram=gram, losses=losses, nonfinite=nonfinite, skipped_steps=skipped_steps)

    @functools.cached_property
    def norms(self) -> Tensor | None:
        return None if self.gram is None else norms_from_gram(self.gram)

    @functools.cached_property
    def cosines(self) -> Tensor | None:
        return None if self.gram is None else cosines_from_gram(self.gram)

    def dominance(self) -> Tensor:
        """[K, K] norm ratios ``||g_i|| / ||g_j||`` (inf where ``g_j = 0``)."""
        return self.norms.unsqueeze(-1) / self.norms.unsqueeze(-2)
