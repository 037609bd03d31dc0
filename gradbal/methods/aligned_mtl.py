"""Aligned-MTL: align the principal components of the gradient system."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._solver_kernels import ALIGNED_MTL
from ..solvers_qp import _RTOL_2, _kept, _scalars, sym_eig
from ._base import Method
from ._common import PrefVector
from ._registry import register_method

__all__ = ["SCALE_MODES", "AlignedMTL"]

#: Which eigenvalue sets the scale of the aligned system (official code's ``scale_mode``).
SCALE_MODES = ("min", "median", "rmse")


@register_method("aligned_mtl")
class AlignedMTL(Method):
    r"""Aligned-MTL (Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component
    Alignment for Multi-Task Learning", CVPR 2023, Alg. 1).

    With the eigendecomposition ``G = V diag(lambda) V^T`` restricted to its numerical rank R
    (eigenvalues above ``K * eps(float32) * lambda_max``, the official code's rule), the
    balance matrix is ``B = sqrt(s) V_R diag(lambda_R)^(-1/2) V_R^T``. The aligned gradients,
    the columns of ``J^T B``, have Gram matrix ``B G B = s V_R V_R^T`` (``= s I`` at full
    rank): they are orthogonal with equal singular values ``sqrt(s)``. The direction is
    ``d = J^T B p``, i.e. ``w = B p``. ``s`` is the smallest kept eigenvalue (``"min"``,
    default), their lower median (``"median"``, as ``torch.median``) or their mean
    (``"rmse"``), the official code's ``scale_mode`` options. A zero Gram matrix gives
    ``B = I``.

    The eigendecomposition runs on the device (:func:`gradbal.solvers_qp.sym_eig`: LAPACK
    on the CPU). On CUDA, where ``torch.linalg.eigh`` syncs with the host, the whole stage is
    one Triton launch (:func:`gradbal.kernels.aligned_mtl_weights`: a fixed-sweep cyclic
    Jacobi method and the weights from its eigenpairs), or torch ops around the Jacobi method
    when Triton is unavailable or forced off with ``GRADBAL_BACKEND=torch``.

    Defaults: ``scale_mode="min"`` (paper, official code, LibMTL, TorchJD);
    ``pref_vector`` = ones, i.e. the sum of the aligned gradients (official code and
    LibMTL ``B.sum(0)``); TorchJD's ``AlignedMTL()`` uses the mean, ``1/K`` each: pass
    ``pref_vector=[1/K] * K`` to match it.

    Example:
        >>> import torch, gradbal
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> gradbal.aggregate(J, method="aligned_mtl", pref_vector=[0.5, 0.5])
        tensor([0.2133, 0.9673, 0.9673])
    """

    def __init__(
        self,
        scale_mode: str = "min",
        pref_vector: Sequence[float] | Tensor | None = None,
    ):
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode
        self.pref = PrefVector(pref_vector, default="sum")

    def check_num_objectives(self, k: int) -> None:
        self.pref.check(k, self.name)

    def balance_matrix(self, gram: Tensor) -> Tensor:
        """``B`` (float64 [K, K]) with ``B G B = s I`` on the range of G."""
        coef, evecs = self._spectrum(gram)
        return (evecs * coef.unsqueeze(-2)) @ evecs.mT

    def _spectrum(self, gram: Tensor) -> tuple[Tensor, Tensor]:
        """``B = V diag(coef) V^T``: ``coef = sqrt(s / lambda)`` on the kept eigenvalues, 0 on
        the others, 1 on all of them when none is kept (``B = I``)."""
        evals, evecs = sym_eig(gram)
        keep, top = _kept(evals)
        if self.scale_mode == "min":
            scale = torch.where(keep, evals, float("inf")).amin(-1, keepdim=True)
        elif self.scale_mode == "median":
            # Kept eigenvalues are the largest `rank` of the ascending list; torch.median
            # (the official code) returns the lower middle one, index K - 1 - rank // 2.
            rank = keep.sum(-1, keepdim=True)
            scale = evals.gather(-1, (evals.shape[-1] - 1) - rank // 2)
        else:
            scale = torch.where(keep, evals, 0.0).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True)
        # With nothing kept (top <= 0) scale is inf or NaN, never read: coef = 1 (bool -> 1.0).
        return torch.where(keep, (scale / evals).sqrt(), top <= 0), evecs

    def weights(self, gram, losses, generator=None):
        k = gram.shape[-1]
        self.check_num_objectives(k)
        if ALIGNED_MTL.usable(gram):  # CUDA: the whole stage in one launch
            w = ALIGNED_MTL.run(gram, self.pref.get(k, gram, torch.float64), self.scale_mode)
            if w is not None:
                return w if w.dtype == gram.dtype else w.to(gram.dtype)
        if k == 2:
            # Off the CPU sym_eig is one Triton launch (a torch Jacobi sweep of 64 ops, i.e.
            # kernel launches, without Triton) plus the general path's ops, against the closed
            # form's 20. On the CPU the general path is 16 ops plus LAPACK's eigh;
            # in a tight loop they time the same, but right after the passes over a [2, 1M]
            # store (as in a step) the closed form took 86 us against 121 (2-core VM, medians
            # of 200 interleaved calls).
            w = _aligned_mtl_2(gram, self.pref.get(2, gram, torch.float64), self.scale_mode)
        else:
            coef, evecs = self._spectrum(gram)
            w = evecs @ (coef * (self.pref.get(k, gram, torch.float64) @ evecs))  # B p, B never built
        return w if w.dtype == gram.dtype else w.to(gram.dtype)

    def __repr__(self) -> str:
        return f"AlignedMTL(scale_mode={self.scale_mode!r}, pref_vector={self.pref!r})"


@functools.lru_cache(maxsize=16)
def _deviator_2(device: torch.device) -> Tensor:
    """[2, 2, 2, 2] map of G to its symmetric traceless part ``S = (G + G^T) / 2 - tr(G) / 2 I``
    (``torch.tensordot(G, ., 2)``); entries 0, +-1/2: exact scalings, one rounding per entry."""
    m = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    m[0, 0, 0, 0] = m[1, 1, 1, 1] = 0.5
    m[0, 0, 1, 1] = m[1, 1, 0, 0] = -0.5
    m[0, 1, 0, 1] = m[0, 1, 1, 0] = m[1, 0, 0, 1] = m[1, 0, 1, 0] = 0.5
    return m.to(device)


def _aligned_mtl_2(gram: Tensor, p: Tensor, scale_mode: str) -> Tensor:
    r"""``w = B p`` for K = 2 in closed form, without an eigendecomposition: 20 small ops (24
    for ``"rmse"``) where the general path takes LAPACK's eigh and 16 ops on the CPU, the
    eigendecomposition kernel (or, without Triton, a Jacobi sweep and ~85 ops) elsewhere.

    With ``m = tr(G) / 2``, the traceless part ``S = G - m I`` and ``h = hypot(S_00, S_01)``,
    G has the eigenvalues ``lambda_+- = m +- h`` and the spectral projectors
    ``P_+- = (I +- S / h) / 2``, so any ``B = phi_+ P_+ + phi_- P_-`` is
    ``mu I + kappa S`` with ``mu = (phi_+ + phi_-) / 2``, ``kappa = (phi_+ - phi_-) / (2 h)``.
    Cases, by :func:`~gradbal.solvers_qp.rank_mask` on ``(lambda_-, lambda_+)``:

    * rank 2 (``lambda_- > 2 eps(float32) lambda_+``): ``B = sqrt(s) G^(-1/2)``, and with
      ``r = sqrt(lambda_+ lambda_-)``, ``t = sqrt(lambda_+) + sqrt(lambda_-)`` (so ``t^2 =
      2 m + 2 r``) ``G^(-1/2) = ((m + r) I - S) / (r t)``. ``"min"`` and ``"median"`` (the lower
      median of two) take ``s = lambda_-``: ``kappa = -1 / (lambda_+ + r)``,
      ``mu = (lambda_+ + r) / (2 lambda_+)``; ``"rmse"`` takes ``s = m``:
      ``kappa = -sqrt(m) / (r t)``, ``mu = -kappa (m + r)``. Written so, nothing divides by
      ``h`` (0 for ``G = m I``, where B = I).
    * rank 1: ``s = lambda_+`` in every mode, ``B = P_+``: ``mu = 1/2``, ``kappa = 1 / (2 h)``
      (``2 h >= lambda_+``).
    * rank 0 (``lambda_+ <= 0``; a zero Gram matrix): ``B = I``.

    In scaled terms (``l_+- = tr G +- 2 h = 2 lambda_+-``, ``r_2 = sqrt(l_+ l_-) = 2 r``),
    ``kappa = -2 / den`` so one ``addcdiv`` forms ``w``.
    Non-finite entries are read as 0 and G is symmetrised, as by
    :func:`~gradbal.solvers_qp.sym_eig`. The rank decisions are made on these eigenvalues, not
    LAPACK's: they can differ only for an eigenvalue ratio within rounding of the cut-off.
    """
    g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    s = torch.tensordot(g, _deviator_2(g.device), 2)
    tr = torch.trace(g)
    # h = hypot(S_00, S_01), once per row of S: [h, h]; every scalar below is such a pair
    h = torch.linalg.vector_norm(s, dim=-1)
    lp = torch.add(tr, h, alpha=2)  # 2 lambda_+
    lm = torch.sub(tr, h, alpha=2)  # 2 lambda_-
    full = lm > lp * _RTOL_2
    r2 = torch.sqrt(lp * lm)  # 2 r; NaN where lm < 0, read only where full
    if scale_mode == "rmse":
        tr2 = tr + r2  # 2 (m + r) = t^2
        rt = r2 * tr2.sqrt()  # 2 r t
        den = torch.addcmul(_scalars(g.device)[0], rt, tr.rsqrt(), value=math.sqrt(2))  # 2 r t / sqrt(m)
        mu = torch.where(full, tr2 / den, 0.5)  # = -kappa (m + r)
    else:
        den = lp + r2  # 2 (lambda_+ + r)
        mu = torch.where(full, torch.addcdiv(_scalars(g.device)[0], den, lp, value=0.5), 0.5)
    # rank 1: -2 / den = 1 / (2 h)
    den = torch.where(full, den, h * -4.0)
    w = torch.addcdiv(p * mu, s @ p, den, value=-2.0)
    return torch.where(lp > 0, w, p)
