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
* Larger K uses a primal active-set method (Wolfe's) with a fixed number of iterations,
  each one KKT solve on the current support.
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

# A ridge relative to the largest diagonal entry (K > 2 only): makes the min-norm weights
# unique when the gradients are linearly dependent (equal rows get equal weights: exactly
# for K <= EXACT_MAX_K, to ~1e-4 relative above it) and changes the optimum far below 1e-5.
_RIDGE = 1e-12


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


def _kkt_solve_raw(gram: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Solve the equality-constrained min-norm problem on the face given by ``mask``.

    gram: [..., K, K]; mask: [..., K] bool. Returns the unclamped weights (zeros off the
    support) and whether the linear system was solved accurately (``solve_ex`` does not
    check for singularity, since that check would sync with the host; the residual does).
    """
    k = gram.shape[-1]
    m = mask.to(gram.dtype)
    mm = m.unsqueeze(-1) * m.unsqueeze(-2)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    batch = torch.broadcast_shapes(gram.shape[:-2], mask.shape[:-1])
    a = torch.zeros(*batch, k + 1, k + 1, dtype=gram.dtype, device=gram.device)
    a[..., :k, :k] = gram * mm + eye * (1 - m).unsqueeze(-1)  # off-support rows pin w_i = 0
    a[..., :k, k] = m
    a[..., k, :k] = m
    b = torch.zeros(*batch, k + 1, 1, dtype=gram.dtype, device=gram.device)
    b[..., k, 0] = 1
    x, _ = torch.linalg.solve_ex(a, b)
    residual = (a @ x - b).squeeze(-1).abs().amax(-1)
    x = x.squeeze(-1)
    solved = (residual <= 1e-9 * (1 + x.abs().amax(-1))) & torch.isfinite(x).all(-1)
    return x[..., :k] * m, solved


def _kkt_solve(gram: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Like :func:`_kkt_solve_raw`, returning simplex weights and ``valid`` = solved and >= 0."""
    w, solved = _kkt_solve_raw(gram, mask)
    valid = solved & (w >= -1e-12).all(-1)
    w = w.clamp_min(0)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-300), valid


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


def _min_norm_active_set(gram: Tensor, iterations: int) -> Tensor:
    """Primal active-set method (Wolfe 1976) with a fixed number of iterations.

    The support S starts at the best vertex. Each iteration solves the KKT system on S:
    if that solution is feasible it becomes the iterate and the most violated KKT condition
    ``(G w)_i < w^T G w`` outside S joins S; otherwise the iterate moves toward it until a
    weight hits zero (ratio test) and those leave S. Once optimal, an iteration changes
    nothing, so extra iterations are harmless; every decision is a ``torch.where``.
    """
    k = gram.shape[-1]
    diag = gram.diagonal(dim1=-2, dim2=-1)
    eye = torch.eye(k, dtype=torch.bool, device=gram.device)
    support = eye[diag.argmin(-1)]
    w = support.to(gram.dtype)
    tol = 1e-15 * diag.amax(-1).clamp_min(1e-300)  # below the ridge, above rounding
    for _ in range(iterations):
        v_raw, _ = _kkt_solve_raw(gram, support)
        feasible = (v_raw >= 0).all(-1, keepdim=True) & torch.isfinite(v_raw).all(-1, keepdim=True)
        v = v_raw.clamp_min(0)
        # Feasible: accept, then add the most violated index outside S.
        gw = (gram @ v.unsqueeze(-1)).squeeze(-1)
        obj = (gw * v).sum(-1, keepdim=True)
        slack = torch.where(support, torch.full_like(gw, float("inf")), gw - obj)
        worst = slack.argmin(-1)
        violated = (slack.gather(-1, worst.unsqueeze(-1)) < -tol.unsqueeze(-1))
        grown = support | (eye[worst] & violated)
        # Infeasible: step from w toward v_raw until the first weight reaches zero.
        shrinking = v_raw < w
        ratio = torch.where(
            shrinking & support, w / (w - v_raw).clamp_min(1e-300), torch.full_like(w, float("inf"))
        )
        alpha = ratio.amin(-1, keepdim=True).clamp(0, 1)
        w_step = (w + alpha * (v_raw - w)).clamp_min(0)
        w_step = torch.where(support, w_step, torch.zeros_like(w_step))
        shrunk = support & (w_step > 1e-15)
        w_step = w_step / w_step.sum(-1, keepdim=True).clamp_min(1e-300)
        w = torch.where(feasible, v, w_step)
        support = torch.where(feasible, grown, shrunk)
    return w


def min_norm_simplex(gram: Tensor, iterations: int | None = None) -> Tensor:
    """Weights of the min-norm point of the convex hull of the vectors whose Gram is ``gram``.

    Args:
        gram: [..., K, K] symmetric PSD matrix (any float dtype; solved in float64).
        iterations: active-set iterations used when K > ``EXACT_MAX_K`` (default 2K).

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
    if k > 2:  # the closed form needs no ridge: it handles g1 = g2 itself
        g = g + _RIDGE * torch.eye(k, dtype=g.dtype, device=g.device)
    if k == 1:
        w = torch.ones(g.shape[:-1], dtype=g.dtype, device=g.device)
    elif k == 2:
        w = min_norm_2(g)
    elif k <= EXACT_MAX_K:
        w = _min_norm_enumerate(g)
    else:
        w = _min_norm_active_set(g, 2 * k if iterations is None else iterations)
    return w.to(out_dtype)
