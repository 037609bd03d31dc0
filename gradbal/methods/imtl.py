"""IMTL-G: impartial multi-task learning, gradient part."""

from __future__ import annotations

import torch

from ..solvers_qp import rank_mask, sym_eig
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
    (:func:`gradbal.solvers_qp.sym_eig`; eigenvalues below ``K * eps(float32)`` of the largest
    dropped, ``torch.linalg.pinv``'s cut-off on a float32 matrix): rank decisions then
    depend on the angles only, so the direction is invariant to each objective's scale,
    as the paper intends. On ``G`` itself, a gradient ``sqrt(K eps) ~ 1e-3`` times smaller
    than the largest (gradient dominance in KD) would be cut off as noise. When
    ``1^T D^-1 C^+ 1`` vanishes (relative to its terms; e.g. two opposite gradients) the
    weights are 0, as in TorchJD (which tests ``|1^T G^+ n| < 1e-12``).

    The closed form needs no parameters; the paper's IMTL-L (loss scaling) is not part of it.

    Example:
        >>> import torch, gradbal
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> gradbal.aggregate(J, method="imtl_g")
        tensor([0.0767, 1.0000, 1.0000])
    """

    def weights(self, gram, losses, generator=None):
        g = gram.to(torch.float64)
        norms = torch.sqrt(g.diagonal().clamp_min(0))
        inv_n = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
        cos = g * inv_n.unsqueeze(-1) * inv_n.unsqueeze(-2)
        evals, evecs = sym_eig(cos)
        keep = rank_mask(evals)
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
        ones = torch.ones_like(norms)
        v = inv_n * (evecs @ (inv * (evecs.transpose(-1, -2) @ ones)))
        total = v.sum(-1, keepdim=True)
        ok = total.abs() > 1e-9 * v.abs().sum(-1, keepdim=True)
        w = torch.where(ok, v / torch.where(ok, total, torch.ones_like(total)), torch.zeros_like(v))
        return w.to(gram.dtype)
