"""Fixed weightings: the baselines every balancing method is compared with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import Method
from ._common import num_objectives, remember, to_device
from ._registry import register_method

__all__ = ["Mean", "Sum", "Weighted"]


def _like(gram: Tensor | None, losses: Tensor | None, name: str) -> Tensor:
    """The tensor that gives K and the device: the Gram matrix, else the loss values."""
    num_objectives(gram, losses, name)  # raises when both are None
    return gram if gram is not None else losses


@register_method("sum")
class Sum(Method):
    """``d = sum_k g_k``: the gradient of the summed loss (what ``sum(losses).backward()`` gives).

    Example:
        >>> import torch, gradbal
        >>> gradbal.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), method="sum")
        tensor([1., 2.])
    """

    needs_gram = False

    def weights(self, gram, losses, generator=None):
        like = _like(gram, losses, self.name)
        return torch.ones(like.shape[-1], dtype=torch.float64, device=like.device)


@register_method("mean")
class Mean(Method):
    """``d = (1/K) sum_k g_k``: the gradient of the mean loss.

    Example:
        >>> import torch, gradbal
        >>> gradbal.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), method="mean")
        tensor([0.5000, 1.0000])
    """

    needs_gram = False

    def weights(self, gram, losses, generator=None):
        like = _like(gram, losses, self.name)
        k = like.shape[-1]
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=like.device)


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

    needs_gram = False

    def __init__(self, weights: Sequence[float] | Tensor):
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        if w.ndim != 1 or w.numel() < 1:
            raise ValueError(f"weights must be a 1-D sequence of numbers, got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError(f"weights must be finite, got {w.tolist()}")
        self._weights = w
        self._cache: dict[torch.device, Tensor] = {}

    def check_num_objectives(self, k: int) -> None:
        if k != self._weights.numel():
            raise ValueError(
                f"method 'weighted' has {self._weights.numel()} weights but {k} losses were "
                "given; pass one weight per loss"
            )

    def weights(self, gram, losses, generator=None):
        like = _like(gram, losses, self.name)
        self.check_num_objectives(like.shape[-1])
        cached = self._cache.get(like.device)
        if cached is None:  # one host-to-device copy per device
            cached = remember(self._cache, like.device, to_device(self._weights, like.device))
        return cached.clone()

    def __repr__(self) -> str:
        return f"Weighted(weights={self._weights.tolist()})"
