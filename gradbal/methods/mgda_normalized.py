"""MGDA with gradient normalisation (Sener & Koltun's l2, loss and loss+ normalisers)."""

from __future__ import annotations

import torch

from .._solver_kernels import MGDA_NORMALIZED
from ..solvers import min_norm_simplex
from ._base import Method
from ._registry import register_method

__all__ = ["MGDAL2", "NORMALIZATIONS", "MGDALoss", "MGDALossPlus", "MGDANormalized"]

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
APPLY_TO = ("normalized", "raw")


@register_method("mgda_gn")
class MGDANormalized(Method):
    r"""MGDA on normalised gradients (Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018, Sec. 3 and official code
    ``gradient_normalizers``).

    Each gradient is divided by ``n_k``: ``||g_k||`` (``"l2"``), ``L_k`` (``"loss"``),
    ``L_k ||g_k||`` (``"loss+"``) or 1 (``"none"``, plain MGDA); then
    ``pi = argmin_{pi in simplex} pi^T H pi`` with ``H = diag(1/n) G diag(1/n)``
    (:func:`gradbal.solvers.min_norm_simplex`). ``apply_to="normalized"`` returns the
    min-norm point of the normalised gradients, ``w = pi / n`` (LibMTL, which combines the
    normalised gradients); ``apply_to="raw"`` returns ``w = pi`` (the official code, which
    weights the raw losses by pi).

    On CUDA (with ``iterations`` not given and a normaliser other than ``"none"``) the whole
    stage is one Triton launch, :func:`gradbal.kernels.mgda_normalized_weights` (the min-norm
    solver of :func:`gradbal.kernels.min_norm` between the normaliser and the rescaling).

    A zero gradient has a zero normalised gradient (its weight is 0, and the min-norm point
    is then 0: that objective is stationary). Losses are clamped at ``loss_floor`` before
    dividing (a loss of exactly 0 still gives a finite step), and negative losses are
    refused, as for MoKD's log-loss scaling.

    Registered as ``"mgda_gn"`` (default ``normalization="l2"``) and as ``"mgda_l2"``,
    ``"mgda_loss"``, ``"mgda_loss+"``. Defaults: ``apply_to="normalized"`` (LibMTL
    ``mgda_gn``; LibMTL's own default normaliser is ``"none"``, which is ``"mgda"``).

    Example:
        >>> import torch, gradbal
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> gradbal.aggregate(g, method="mgda_l2")
        tensor([0.5000, 0.5000])
    """

    default_normalization = "l2"

    def __init__(
        self,
        normalization: str | None = None,
        apply_to: str = "normalized",
        loss_floor: float = 1e-6,
        iterations: int | None = None,
    ):
        normalization = self.default_normalization if normalization is None else normalization
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}")
        if not loss_floor > 0:
            raise ValueError(f"loss_floor must be > 0, got {loss_floor}")
        self.normalization = normalization
        self.apply_to = apply_to
        self.loss_floor = float(loss_floor)
        self.iterations = None if iterations is None else int(iterations)

    @property
    def requires_nonnegative_losses(self) -> bool:
        return self.normalization in ("loss", "loss+")

    @property
    def requires_losses(self) -> bool:  # type: ignore[override]
        return self.normalization in ("loss", "loss+")

    def weights(self, gram, losses, generator=None):
        if self.requires_losses and losses is None:
            raise ValueError(f"method {self.name!r} needs the loss values; pass losses=[...]")
        if self.normalization != "none" and self.iterations is None and MGDA_NORMALIZED.usable(gram):
            w = MGDA_NORMALIZED.run(gram, losses, self.normalization, self.apply_to, self.loss_floor)
            if w is not None:  # CUDA: the whole stage below in one launch
                return w if w.dtype == gram.dtype else w.to(gram.dtype)
        g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
        norms = torch.sqrt(g.diagonal().clamp_min(0))
        if self.normalization in ("loss", "loss+"):
            scale = losses.to(torch.float64).clamp_min(self.loss_floor)
            if self.normalization == "loss+":
                scale = scale * norms
        elif self.normalization == "l2":
            scale = norms
        else:
            scale = torch.ones_like(norms)
        # 1/0 = inf is never selected (where() does not propagate the other branch).
        inv = torch.where(scale > 0, scale.reciprocal(), 0.0)
        h = g * torch.outer(inv, inv)
        pi = min_norm_simplex(h, self.iterations)
        w = pi * inv if self.apply_to == "normalized" else pi
        return w if w.dtype == gram.dtype else w.to(gram.dtype)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(normalization={self.normalization!r}, "
            f"apply_to={self.apply_to!r})"
        )


@register_method("mgda_l2")
class MGDAL2(MGDANormalized):
    """:class:`MGDANormalized` with ``normalization="l2"``: gradients scaled to unit norm."""

    default_normalization = "l2"


@register_method("mgda_loss")
class MGDALoss(MGDANormalized):
    """:class:`MGDANormalized` with ``normalization="loss"``: gradients divided by the loss."""

    default_normalization = "loss"


@register_method("mgda_loss+")
class MGDALossPlus(MGDANormalized):
    """:class:`MGDANormalized` with ``normalization="loss+"``: by loss times gradient norm."""

    default_normalization = "loss+"
