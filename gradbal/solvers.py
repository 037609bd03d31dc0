"""Small K x K solvers that run on the Gram matrix's device with no host synchronisation.

Every solver here takes a (batch of) symmetric positive semi-definite Gram matrices
``G[..., K, K]`` and returns weights, using only fixed-shape tensor operations: no
``.item()``, no Python branch on a tensor value, no CPU solver. That keeps a training step
free of device-to-host syncs (the peers call quadprog/cvxpy/scipy on the CPU every step).

The central problem is the min-norm point of the convex hull of K vectors (MGDA, MoKD):

    w* = argmin_{w >= 0, sum(w) = 1}  w^T G w

* K = 2 has a closed form (Sener & Koltun 2018, Alg. 1; DTO-KD Theorem 3.1).
* K <= ``EXACT_MAX_K`` is solved exactly by enumerating supports: the minimiser lies in the
  relative interior of some face S of the simplex, where it solves the KKT system
  ``[[G_SS, 1], [1^T, 0]] [w_S; -lam] = [0; 1]``. All 2^K - 1 systems are solved in one
  batched ``linalg.solve_ex``; the feasible solution of smallest objective is the optimum.
* Larger K uses a fixed number of accelerated projected-gradient (FISTA) steps followed by
  the same KKT polish on the support it found.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "EXACT_MAX_K",
    "min_norm_2",
    "min_norm_simplex",
    "project_simplex",
]

#: Largest K solved by support enumeration (2^K - 1 small linear systems, batched).
EXACT_MAX_K = 8

# A ridge relative to the largest diagonal entry: makes the min-norm weights unique when the
# gradients are linearly dependent (equal rows give equal weights) at a cost far below 1e-5.
_RIDGE = 1e-10


def _normalise(gram: Tensor) -> Tensor:
    """G / max(diag(G)): the minimiser is scale invariant; a zero matrix stays zero."""
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return gram / scale


def min_norm_2(gram: Tensor) -> Tensor:
    """Closed-form min-norm weights for K = 2.

    ``pi_1 = (G22 - G12) / (G11 + G22 - 2 G12)`` clamped to [0, 1], ``pi_2 = 1 - pi_1``.
    When the denominator ``||g1 - g2||^2`` vanishes (g1 = g2) both weights are 1/2.
    """
    g11 = gram[..., 0, 0]
    g22 = gram[..., 1, 1]
    g12 = gram[..., 0, 1]
    den = g11 + g22 - 2 * g12
    # Relative test: den is a difference of large numbers when g1 ~ g2.
    tiny = 1e-12 * (g11 + g22)
    ok = den > tiny
    pi1 = torch.where(ok, (g22 - g12) / torch.where(ok, den, torch.ones_like(den)), 0.5)
    pi1 = pi1.clamp(0.0, 1.0)
    pi1 = torch.where(torch.isfinite(pi1), pi1, torch.full_like(pi1, 0.5))
    return torch.stack([pi1, 1 - pi1], dim=-1)


@functools.lru_cache(maxsize=32)
def _support_masks(k: int, device: torch.device) -> Tensor:
    """All non-empty subsets of range(k) as a bool tensor [2^k - 1, k]."""
    codes = torch.arange(1, 2**k, device=device)
    bits = 2 ** torch.arange(k, device=device)
    return (codes.unsqueeze(-1) & bits) != 0


def _objective(gram: Tensor, w: Tensor) -> Tensor:
    return torch.einsum("...i,...ij,...j->...", w, gram, w)


def _kkt_solve(gram: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Solve the equality-constrained min-norm problem on the face given by ``mask``.

    gram: [..., K, K]; mask: [..., K] bool. Returns (w [..., K] with zeros off the support,
    valid [...] bool: the system was solved accurately and w >= 0).
    """
    k = gram.shape[-1]
    m = mask.to(gram.dtype)
    mm = m.unsqueeze(-1) * m.unsqueeze(-2)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    top = gram * mm + eye * (1 - m).unsqueeze(-1)  # off-support rows pin w_i = 0
    a = torch.zeros(*mm.shape[:-2], k + 1, k + 1, dtype=gram.dtype, device=gram.device)
    a[..., :k, :k] = top
    a[..., :k, k] = m
    a[..., k, :k] = m
    b = torch.zeros(*mm.shape[:-2], k + 1, dtype=gram.dtype, device=gram.device)
    b[..., k] = 1
    # solve_ex does not check for singularity (that check would sync); the residual does.
    x, _ = torch.linalg.solve_ex(a, b.unsqueeze(-1))
    x = x.squeeze(-1)
    residual = (a @ x.unsqueeze(-1)).squeeze(-1) - b
    res_ok = residual.abs().amax(-1) <= 1e-9 * (1 + x.abs().amax(-1))
    w = x[..., :k] * m
    valid = res_ok & torch.isfinite(x).all(-1) & (w >= -1e-12).all(-1)
    w = w.clamp_min(0)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
    return w, valid


def _min_norm_enumerate(gram: Tensor) -> Tensor:
    k = gram.shape[-1]
    masks = _support_masks(k, gram.device)  # [S, K]
    g = gram.unsqueeze(-3)  # [..., 1, K, K]
    w, valid = _kkt_solve(g, masks)  # [..., S, K], [..., S]
    obj = _objective(g, w)
    obj = torch.where(valid, obj, torch.full_like(obj, float("inf")))
    best = obj.argmin(dim=-1, keepdim=True)  # singletons are always valid
    return w.gather(-2, best.unsqueeze(-1).expand(*best.shape, k)).squeeze(-2)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v[..., K]`` onto the probability simplex.

    Sort-based algorithm of Duchi et al. (ICML 2008); branch free.
    """
    k = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    rho = (u - css / idx > 0).sum(-1, keepdim=True).clamp_min(1)  # >= 1 always
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)


def _min_norm_fista(gram: Tensor, iterations: int) -> Tensor:
    k = gram.shape[-1]
    # Step 1/L with L an upper bound of lambda_max: min(trace, Gershgorin row bound).
    lips = torch.minimum(
        gram.diagonal(dim1=-2, dim2=-1).sum(-1), gram.abs().sum(-1).amax(-1)
    ).clamp_min(1e-30)
    step = (1.0 / lips).unsqueeze(-1)
    w = torch.full(gram.shape[:-1], 1.0 / k, dtype=gram.dtype, device=gram.device)
    y = w
    t = 1.0
    for _ in range(iterations):
        grad = (gram @ y.unsqueeze(-1)).squeeze(-1)
        w_next = project_simplex(y - step * grad)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = w_next + ((t - 1) / t_next) * (w_next - w)
        w, t = w_next, t_next
    # Polish: the exact minimiser on the face FISTA found, kept only where it is better.
    support = w > 1e-9
    w_kkt, valid = _kkt_solve(gram, support)
    better = valid & (_objective(gram, w_kkt) <= _objective(gram, w))
    return torch.where(better.unsqueeze(-1), w_kkt, w)


def min_norm_simplex(gram: Tensor, iterations: int = 256) -> Tensor:
    """Weights of the min-norm point of the convex hull of the vectors whose Gram is ``gram``.

    Args:
        gram: [..., K, K] symmetric PSD matrix (any float dtype; solved in float64).
        iterations: FISTA steps used when K > ``EXACT_MAX_K``.

    Returns:
        w [..., K] on the simplex minimising ``w^T G w``, finite for any finite input
        (rank-deficient, zero rows and zero matrices included). Exact (to rounding) for
        K <= ``EXACT_MAX_K``.
    """
    if gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be square in its last two dims, got {tuple(gram.shape)}")
    k = gram.shape[-1]
    out_dtype = gram.dtype
    g = _normalise(gram.to(torch.float64))
    g = (g + g.transpose(-1, -2)) / 2
    g = g + _RIDGE * torch.eye(k, dtype=g.dtype, device=g.device)
    if k == 1:
        w = torch.ones(g.shape[:-1], dtype=g.dtype, device=g.device)
    elif k == 2:
        w = min_norm_2(g)
    elif k <= EXACT_MAX_K:
        w = _min_norm_enumerate(g)
    else:
        w = _min_norm_fista(g, iterations)
    return w.to(out_dtype)
