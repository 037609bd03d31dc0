"""IMTL-G: impartial multi-task learning, gradient part."""

from __future__ import annotations

import torch

from .._solver_kernels import IMTL_G
from ..solvers_qp import _KEPT_SUM_2, _ones, _unit_sum_2, unit_gram_pinv
from ._base import Method
from ._registry import register_method

__all__ = ["IMTLG"]


@register_method("imtl_g")
class IMTLG(Method):
    r"""IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task
    Learning", ICLR 2021), in the form of TorchJD's ``IMTLG``
    (Quinton & Rey, arXiv 2406.16232), which also accepts linearly dependent gradients.

    The direction ``d = sum_k w_k g_k`` with ``sum_k w_k = 1`` has equal projections onto the
    unit gradients: ``<d, g_k / ||g_k||>`` is the same for every k. In Gram terms, with
    ``D = diag(||g_k||)`` and the cosine matrix ``C = D^-1 G D^-1``: ``C (D w) = c 1``, so
    ``w = D^-1 C^+ 1 / (1^T D^-1 C^+ 1)`` (zero gradients get weight 0).

    TorchJD computes ``G^+ n`` (``n_k = ||g_k||``), the same weights whenever G has full
    numerical rank. gradbal takes the pseudo-inverse of the cosine matrix instead
    (:func:`gradbal.solvers_qp.unit_gram_pinv`; eigenvalues below ``K * eps(float32)`` of the largest
    dropped, ``torch.linalg.pinv``'s cut-off on a float32 matrix): rank decisions then
    depend on the angles only, so the direction is invariant to each objective's scale,
    as the paper intends. On ``G`` itself, a gradient ``sqrt(K eps) ~ 1e-3`` times smaller
    than the largest (gradient dominance in KD) would be cut off as noise. When
    ``1^T D^-1 C^+ 1`` vanishes (relative to its terms; e.g. two opposite gradients) the
    weights are 0, as in TorchJD (which tests ``|1^T G^+ n| < 1e-12``); so they are when 1
    is orthogonal to the kept eigenvectors (nearly opposite gradients, whose common
    direction the rank cut drops), where C^+ 1 holds nothing but rounding noise. K = 2 has
    a closed form: ``w = (||g_2||, ||g_1||) / (||g_1|| + ||g_2||)``, or 0.

    On CUDA (K >= 3) the whole stage is one Triton launch
    (:func:`gradbal.kernels.imtl_g_weights`: the Jacobi eigendecomposition of C and the weights
    from its eigenpairs); elsewhere torch ops (LAPACK's eigh on the CPU).

    The closed form needs no parameters; the paper's IMTL-L (loss scaling) is not part of it.

    Example:
        >>> import torch, gradbal
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> gradbal.aggregate(J, method="imtl_g")
        tensor([0.0767, 1.0000, 1.0000])
    """

    def weights(self, gram, losses, generator=None):
        w = IMTL_G.run(gram) if IMTL_G.usable(gram) else None
        if w is None:
            g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
            w = _imtl_g_2(g) if g.shape[-1] == 2 else _imtl_g(g)
        return w if w.dtype == gram.dtype else w.to(gram.dtype)


def _imtl_g(g: torch.Tensor) -> torch.Tensor:
    """Any K: ``w = D^-1 C^+ 1 / (1^T D^-1 C^+ 1)`` through the eigendecomposition of C."""
    v, ok = unit_gram_pinv(g, _ones(g.shape[-1], g.device))
    total = v.sum()
    ok = ok & (total.abs() > 1e-9 * torch.linalg.vector_norm(v, 1))
    return torch.where(ok, v / total, 0.0)


def _imtl_g_2(g: torch.Tensor) -> torch.Tensor:
    """K = 2 in closed form, without the eigendecomposition (9 small ops instead of ~30 and
    LAPACK's ``eigh``; on a GPU, instead of the Jacobi eigendecomposition).

    With both gradients nonzero, ``C = [[1, c], [c, 1]]`` has the eigenvalues ``1 + c`` (vector
    ``[1, 1]``) and ``1 - c`` (vector ``[1, -1]``, orthogonal to 1), so ``C^+ 1 = 1 / (1 + c)``
    when :func:`~gradbal.solvers_qp.rank_mask` keeps ``1 + c``, else 0 (opposite gradients:
    weights 0); see :func:`~gradbal.solvers_qp._unit_sum_2`. ``D^-1 C^+ 1`` is then proportional to
    ``1 / ||g_k||``: ``w = (||g_2||, ||g_1||) / (||g_1|| + ||g_2||)``. One zero gradient gets
    weight 0 and the other 1; two zero gradients give 0: as the general path.
    """
    _, inv, total_c = _unit_sum_2(g)
    return torch.where(total_c > _KEPT_SUM_2, inv / inv.sum(), 0.0)
