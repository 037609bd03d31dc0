"""RLW: random loss weighting."""

from __future__ import annotations

import torch

from ._base import Method
from ._common import num_objectives, to_device
from ._registry import register_method

__all__ = ["DISTRIBUTIONS", "RLW"]

DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli")


@register_method("rlw")
class RLW(Method):
    r"""Random loss weighting (Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022, Alg. 2).

    Every step draws fresh weights: ``w = softmax(x)`` with ``x ~ N(0, I)`` (``"normal"``),
    ``U(0, 1)`` (``"uniform"``) or ``Dirichlet(1)`` (``"dirichlet"``; the softmax is applied
    to the sample as in LibMTL); ``"bernoulli"`` draws 0/1 weights, uniformly among the
    non-empty subsets (what LibMTL's resampling until one is non-zero gives, without a data
    dependent loop); ``"constrained_bernoulli"`` picks one objective. Draws come from the
    optimizer's seeded generator.

    The weights ignore the gradients, so RLW is a loss-based method: the optimizer runs one
    backward of ``sum_k w_k L_k`` (no per-objective gradients). ``gradbal.aggregate`` also
    accepts it.

    Defaults: ``distribution="normal"`` (paper's main variant, LibMTL's default ``dist``,
    TorchJD's ``Random``).

    Example:
        >>> import torch, gradbal
        >>> w = gradbal.get_method("rlw").weights(None, torch.ones(3), torch.Generator().manual_seed(0))
        >>> round(float(w.sum()), 6)
        1.0
    """

    draws_random = True
    requires_task_gradients = False
    needs_gram = False

    def __init__(self, distribution: str = "normal"):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = distribution

    def weights(self, gram, losses, generator=None):
        k = num_objectives(gram, losses, self.name)
        like = gram if gram is not None else losses
        f64 = torch.float64
        if self.distribution == "normal":
            w = torch.softmax(torch.randn(k, generator=generator, dtype=f64), 0)
        elif self.distribution == "uniform":
            w = torch.softmax(torch.rand(k, generator=generator, dtype=f64), 0)
        elif self.distribution == "dirichlet":
            e = -torch.log1p(-torch.rand(k, generator=generator, dtype=f64))  # Exp(1) = Gamma(1)
            w = torch.softmax(e / e.sum(), 0)
        elif self.distribution == "bernoulli":
            code = torch.randint(1, 2**k, (1,), generator=generator)
            w = ((code & (2 ** torch.arange(k))) != 0).to(f64)
        else:
            idx = torch.randint(0, k, (1,), generator=generator)
            w = torch.nn.functional.one_hot(idx[0], k).to(f64)
        return to_device(w, like.device).to(like.dtype if like.is_floating_point() else f64)

    def __repr__(self) -> str:
        return f"RLW(distribution={self.distribution!r})"
