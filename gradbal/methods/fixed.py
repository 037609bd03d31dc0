"""Fixed weightings: the baselines every balancing method is compared with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import Method
from ._registry import register_method

__all__ = ["Mean", "Sum", "Weighted"]


@register_method("sum")
class Sum(Method):
    """``d = sum_k g_k``: the gradient of the summed loss (what ``sum(losses).backward()`` gives).

    Example:
        >>> import torch, gradbal
        >>> gradbal.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), method="sum")
        tensor([1., 2.])
    """

    def weights(self, gram, losses, generator=None):
        return torch.ones(gram.shape[-1], dtype=gram.dtype, device=gram.device)


@register_method("mean")
class Mean(Method):
    """``d = (1/K) sum_k g_k``: the gradient of the mean loss.

    Example:
        >>> import torch, gradbal
        >>> gradbal.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), method="mean")
        tensor([0.5000, 1.0000])
    """

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        return torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)


@register_method("weighted")
class Weighted(Method):
    """``d = sum_k a_k g_k`` with fixed weights ``a`` (e.g. classic KD's 0.5 CE + 0.5 KL).

    Args:
        weights: one finite number per objective.

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> gradbal.aggregate(g, method="weighted", weights=[0.25, 0.5])
        tensor([0.2500, 1.0000])
    """

    def __init__(self, weights: Sequence[float] | Tensor):
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        if w.ndim != 1 or w.numel() < 1:
            raise ValueError(f"weights must be a 1-D sequence of numbers, got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError(f"weights must be finite, got {w.tolist()}")
        self._weights = w

    def check_num_objectives(self, k: int) -> None:
        if k != self._weights.numel():
            raise ValueError(
                f"method 'weighted' has {self._weights.numel()} weights but {k} losses were "
                "given; pass one weight per loss"
            )

    def weights(self, gram, losses, generator=None):
        self.check_num_objectives(gram.shape[-1])
        return self._weights.to(device=gram.device, dtype=gram.dtype)

    def __repr__(self) -> str:
        return f"Weighted(weights={self._weights.tolist()})"
