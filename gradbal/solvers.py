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
* Larger K uses a primal-dual interior-point method with a fixed number of Mehrotra steps
  to find the support, then a few primal-dual active-set rounds that solve the KKT system
  on it exactly and keep the answer only if it passes the exact KKT check.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "EXACT_MAX_K",
    "MIN_NORM_ROUNDS",
    "MIN_NORM_STEPS",
    "min_norm_2",
    "min_norm_simplex",
    "project_simplex",
]

#: Largest K solved by support enumeration (2^K - 1 small linear systems, batched).
EXACT_MAX_K = 8
#: Interior-point steps and active-set rounds for K > EXACT_MAX_K (see _min_norm_large).
MIN_NORM_STEPS = 12
MIN_NORM_ROUNDS = 4

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


def _max_step(s: Tensor, d: Tensor) -> Tensor:
    """Largest t in (0, 1] with ``s + t d >= 0`` (rowwise over the last dim), for s > 0.

    ``s`` holds the primal and dual variables side by side, so one call bounds both."""
    return (s / (-d).clamp_min(1e-300)).amin(-1, keepdim=True).clamp(max=1.0)


def _chol_solve_columns(chol: Tensor, rhs: Tensor) -> Tensor:
    """``(L L^T)^-1 rhs`` for rhs [..., K, R]: two triangular solves (``cholesky_solve`` may
    check an info flag on the host with MAGMA; ``solve_triangular`` never does)."""
    y = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.linalg.solve_triangular(chol.mT, y, upper=True)


def _min_norm_ipm(q: Tensor, a: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Mehrotra predictor-corrector for ``min 1/2 x^T q x`` s.t. ``a^T x = 1``, ``x >= 0``.

    With ``z`` the multipliers of ``x >= 0`` and ``nu`` that of the equality, each step
    solves the Newton system reduced to ``(q + diag(z / x)) dx = r + dnu a`` by one Cholesky
    factorisation shared by the predictor, the corrector and the equality's column
    (``dnu`` then follows from ``a^T dx = 1 - a^T x``). Primal and dual variables live in
    one [..., 2K] tensor so that the step-length rule runs once for both.

    Returns (x, support guess ``x > z``).
    """
    k = q.shape[-1]
    x = (1.0 / a.sum(-1, keepdim=True)).expand_as(a).clone()  # a^T x = 1
    z = torch.ones_like(x)
    nu = ((q @ x.unsqueeze(-1)).squeeze(-1) - z).mean(-1, keepdim=True)
    s = torch.cat([x, z], -1)
    inv_k = 1.0 / k
    for _ in range(iterations):
        x, z = s[..., :k], s[..., k:]
        xz = x * z
        zx = z / x
        rd = (q @ x.unsqueeze(-1)).squeeze(-1) - nu * a - z  # stationarity residual
        rp = 1.0 - (a * x).sum(-1, keepdim=True)  # equality residual
        chol, _ = torch.linalg.cholesky_ex(q + torch.diag_embed(zx))
        sol = _chol_solve_columns(chol, torch.stack([-rd - z, a], -1))
        p, col = sol[..., 0], sol[..., 1]
        a_col = (a * col).sum(-1, keepdim=True)
        dnu = (rp - (a * p).sum(-1, keepdim=True)) / a_col
        dx = p + dnu * col
        d = torch.cat([dx, -z - zx * dx], -1)
        s_aff = s + _max_step(s, d) * d
        mu = xz.sum(-1, keepdim=True) * inv_k
        mu_aff = (s_aff[..., :k] * s_aff[..., k:]).sum(-1, keepdim=True) * inv_k
        target = ((mu_aff / mu).clamp(0, 1) ** 3 * mu).clamp_min(1e-14)
        rc = xz + d[..., :k] * d[..., k:] - target
        p = _chol_solve_columns(chol, (-rd - rc / x).unsqueeze(-1)).squeeze(-1)
        dnu = (rp - (a * p).sum(-1, keepdim=True)) / a_col
        dx = p + dnu * col
        d = torch.cat([dx, -(rc + z * dx) / x], -1)
        t = 0.99 * _max_step(s, d)
        s_new = s + t * d
        nu_new = nu + t * dnu
        # A failed factorisation gives NaN: keep the previous point (no host branch).
        good = torch.isfinite(s_new.sum(-1, keepdim=True) + nu_new)
        s = torch.where(good, s_new, s).clamp_min(1e-300)
        nu = torch.where(good, nu_new, nu)
    x, z = s[..., :k], s[..., k:]
    return x, x > z


def _min_norm_large(gram: Tensor, iterations: int, rounds: int) -> Tensor:
    """K > ``EXACT_MAX_K``: interior point, then primal-dual active-set rounds.

    The interior point runs on the unit-diagonal matrix ``D G D`` (``w = D x``,
    ``D = diag(G)^(-1/2)``, so the constraint reads ``a^T x = 1`` with ``a = diag(D)``): it
    then starts well scaled whatever the spread of gradient norms. It only has to find the
    support approximately. Each active-set round (Hintermueller, Ito & Kunisch 2002) solves
    the KKT system on the current support exactly (:func:`_kkt_solve_raw`), keeps that
    solution when it passes the exact KKT check (``w_S >= 0`` and ``(G w)_i >= w^T G w``
    off S: then it is the minimiser), drops the support indices whose weight went negative
    and adds the outside ones whose condition fails. When no round passes the check, the
    interior point's iterate (feasible, near-optimal) is returned.
    """
    dsc = torch.rsqrt(gram.diagonal(dim1=-2, dim2=-1))  # diag >= the ridge > 0
    q = gram * dsc.unsqueeze(-1) * dsc.unsqueeze(-2)
    x, support = _min_norm_ipm(q, dsc, iterations)
    best = (x * dsc).clamp_min(0)
    best = best / best.sum(-1, keepdim=True)
    best_obj = _objective(gram, best)
    tol = 1e-12  # gram has unit largest diagonal (see _normalise)
    for _ in range(rounds):
        v_raw, solved = _kkt_solve_raw(gram, support)
        gv = (gram @ v_raw.unsqueeze(-1)).squeeze(-1)
        obj = (gv * v_raw).sum(-1, keepdim=True)
        optimal = solved.unsqueeze(-1) & (v_raw >= -tol).all(-1, keepdim=True)
        optimal = optimal & ((gv >= obj - tol) | support).all(-1, keepdim=True)
        v = v_raw.clamp_min(0)
        v = v / v.sum(-1, keepdim=True).clamp_min(1e-300)
        take = optimal & (obj <= best_obj.unsqueeze(-1) * (1 + 1e-9) + 1e-15)
        best = torch.where(take, v, best)
        best_obj = torch.where(take.squeeze(-1), obj.squeeze(-1), best_obj)
        new = torch.where(solved.unsqueeze(-1), support & (v_raw > 0), support)
        new = new | (~support & (gv < obj - tol))
        support = torch.where(new.any(-1, keepdim=True), new, support)
    return best


def min_norm_simplex(gram: Tensor, iterations: int | None = None) -> Tensor:
    """Weights of the min-norm point of the convex hull of the vectors whose Gram is ``gram``.

    Args:
        gram: [..., K, K] symmetric PSD matrix (any float dtype; solved in float64).
        iterations: interior-point steps used when K > ``EXACT_MAX_K`` (default
            ``MIN_NORM_STEPS``), each followed by ``MIN_NORM_ROUNDS`` exact active-set rounds.

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
        steps = MIN_NORM_STEPS if iterations is None else iterations
        w = _min_norm_large(g, steps, MIN_NORM_ROUNDS)
    return w.to(out_dtype)
