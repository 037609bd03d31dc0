"""Projections onto the dual cone of the gradients (UPGrad, DualProj), in one launch.

UPGrad and DualProj (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
2024, Proposition 1) project ``J^T u`` onto the dual cone ``{x : J x >= 0}`` of the K task
gradients (the rows of J) by solving, for each vector u (UPGrad: the K rows of diag(1/K);
DualProj: one)::

    v = argmin_{v >= u}  v^T Q v,   Q = sym(G) / trace(G) + reg I

(:func:`gradbal.solvers_qp.project_dual_cone` states it with TorchJD's normalisation and
regularisation: ``reg = reg_eps + 1e-10``; with ``norm_eps > 0`` a G of trace below it counts
as 0). On a GPU the torch solver is ~100-630 small ops, each a kernel launch (measured on an
H200: UPGrad's K x K stage 0.3-0.8 ms eager at K = 2-8, 7.7 ms at K = 16; benchmarks/
RESULTS.md). Here each program solves one u in registers, with no host synchronisation.

Algorithm: a primal active-set method for the bound constraints (Lawson & Hanson's NNLS in
Gram form) on ``z = v' - u' >= 0``, in the unit-diagonal variables ``v = D v'`` (``D =
diag(Q)^(-1/2)``, ``u' = D^-1 u``, matrix ``D Q D``; without it, gradients of norms over four
decades left the solution accurate to 2e-8 only). The free set F starts empty (v = u). Each iteration solves
the problem with z fixed at 0 off F, ``Q_FF z_F = -(Q u)_F``, on the matrix kept swept on F
(:mod:`._sweep`: ``z_F = A_FF (Q u)_F``), refined by ``REFINE_STEPS`` steps of iterative
refinement against Q itself; if that z is > 0 on F it becomes the iterate and the index off F
with the most negative multiplier ``(Q v)_i`` joins F (none below ``-TOL x sum|u|``:
optimal, stop); otherwise the iterate moves towards it as far as z >= 0 allows and the
index that reaches 0 leaves F. The objective never increases; at most ``max_iter`` (default
4K + 8) iterations run; the loop stops once it has converged. Q is positive definite
(reg >= 1e-10 of a unit trace; TorchJD's default 1e-4 keeps its condition number below
~1e4), so every solve is well posed.

Non-finite entries of G are read as 0. Checked against the torch solver (exact support
enumeration for K <= 8) in tests/kernels/test_kernel_dual_cone.py. (Not yet timed on a GPU.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import KXK_DTYPES, KXK_MAX_K, check_kxk
from ._sweep import (
    active_set_step,
    check_max_iter,
    f64_arg,
    fp32_pair,
    launch_meta,
    load_sym,
    solve_swept,
    sweep_reference,
)

__all__ = ["MAX_K", "default_max_iter", "dual_cone", "dual_cone_reference"]

#: Largest K the one-program kernel takes.
MAX_K = KXK_MAX_K

#: Gram dtypes the kernel reads (it computes in float64).
SUPPORTED_DTYPES = KXK_DTYPES

#: An index joins the free set only if its multiplier is below ``-TOL x sum|u|``.
TOL = 1e-12
#: Steps of iterative refinement of each solve on the free set.
REFINE_STEPS = 2

_TOL = tl.constexpr(TOL)
_INF = tl.constexpr(float("inf"))

# Hook for every buffer this module allocates; tests swap it for a poisoning allocator.
_alloc = torch.empty


def default_max_iter(k: int) -> int:
    """Iterations the kernel runs at most: 4K + 8."""
    return check_max_iter(None, k, "dual_cone")


def _regularised(gram: Tensor, reg: float, norm_eps: float) -> Tensor:
    """Q of the module docstring (float64), as :func:`gradbal.solvers_qp.project_dual_cone`
    forms it."""
    g = gram.to(torch.float64)
    g = torch.where(g.abs() <= torch.finfo(torch.float64).max, g, 0.0)
    tr = torch.trace(g)
    tr = tr if tr > 0 else torch.ones((), dtype=torch.float64, device=g.device)
    q = (g + g.mT) * (0.5 / tr)
    if norm_eps > 0 and not tr >= norm_eps:
        q = torch.zeros_like(q)
    return q + reg * torch.eye(g.shape[-1], dtype=torch.float64, device=g.device)


def dual_cone_reference(
    gram: Tensor, u: Tensor, reg: float, norm_eps: float = 0.0, max_iter: int | None = None
) -> Tensor:
    """The kernel's algorithm for one [K, K] G and one [K] u, with Python control flow."""
    k = gram.shape[-1]
    q0 = _regularised(gram, reg, norm_eps)
    a = q0.diagonal().clamp_min(max(reg, 1e-300)).rsqrt()  # D: unit diagonal, v = D v'
    q = q0 * torch.outer(a, a)
    u0 = u.to(torch.float64)
    u = u0 / a
    tol = TOL * u.abs().sum()
    qu = q @ u
    swept = q.clone()
    free = torch.zeros(k, dtype=torch.bool, device=q.device)
    z = torch.zeros(k, dtype=torch.float64, device=q.device)
    for _ in range(default_max_iter(k) if max_iter is None else max_iter):
        y = (swept @ (qu * free)) * free
        for _ in range(REFINE_STEPS):
            y = y + (swept @ ((qu + q @ y) * free)) * free
        if bool((y[free] > 0).all()):
            z = y
            lam = torch.where(free, torch.inf, qu + q @ y)
            j = int(lam.argmin())
            if not lam[j] < -tol:
                break
            swept, free[j] = sweep_reference(swept, j, 1.0), True
        else:
            ratio = torch.where(free & (y <= 0), z / (z - y).clamp_min(1e-300), torch.inf)
            p = int(ratio.argmin())
            z = (z + ratio[p] * (y - z)).clamp_min(0)
            z[p] = 0
            swept, free[p] = sweep_reference(swept, p, -1.0), False
    return torch.maximum(a * (u + z), u0)


@triton.jit
def _dual_cone_kernel(
    g_ptr,
    stride_r,
    stride_c,
    u_ptr,
    v_ptr,
    reg_hi,
    reg_lo,
    eps_hi,
    eps_lo,
    max_iter,
    K: tl.constexpr,
    KP: tl.constexpr,
    REFINE: tl.constexpr,
):
    """Program b: v[b] = argmin_{v >= u[b]} v^T Q v (u, v: [B, K] contiguous float64)."""
    pid = tl.program_id(0)
    r = tl.arange(0, KP)
    ii = r[:, None]
    jj = r[None, :]
    valid = (ii < K) & (jj < K)
    live_r = r < K
    sym = load_sym(g_ptr, stride_r, stride_c, ii, jj, valid)  # non-finite entries read as 0
    tr = tl.sum(tl.sum(tl.where(ii == jj, sym, 0.0), axis=1), axis=0)
    tr = tl.where(tr > 0, tr, 1.0)
    # Float arguments arrive as fp32: each float64 parameter comes as an fp32 pair hi + lo.
    reg = f64_arg(reg_hi, reg_lo)
    norm_eps = f64_arg(eps_hi, eps_lo)
    keep = (norm_eps <= 0) | (tr >= norm_eps)  # TorchJD's rule: G counts as 0 below norm_eps
    q = tl.where(keep, sym / tr, 0.0)
    q = q + tl.where((ii == jj) & valid, reg, 0.0)
    # Unit diagonal, v = D v' (D = diag(Q)^(-1/2), finite: diag(Q) >= reg > 0): the pivots are
    # then O(1) whatever the spread of gradient norms.
    diag = tl.sum(tl.where(ii == jj, q, 0.0), axis=1)
    # (A diagonal below reg, from a G that is not a Gram matrix, is read as reg: D stays finite.)
    diag = tl.maximum(diag, tl.maximum(reg, 1e-300))
    a = tl.where(live_r, 1.0 / tl.sqrt(tl.where(live_r, diag, 1.0)), 0.0)
    q = q * a[:, None] * a[None, :]
    u0 = tl.load(u_ptr + pid.to(tl.int64) * K + r, mask=live_r, other=0.0)
    u = u0 / tl.where(live_r, a, 1.0)
    tol = _TOL * tl.sum(tl.abs(u), axis=0)
    qu = tl.sum(q * u[None, :], axis=1)
    neg_qu = -qu
    swept = q
    free = tl.zeros([KP], dtype=tl.float64)
    z = tl.zeros([KP], dtype=tl.float64)
    done = tl.sum(free, axis=0) < 0  # False, as a tensor the loop can carry
    it = 0
    while (it < max_iter) & ~done:  # stops at convergence (no masked iterations after it)
        it += 1
        # z on F: Q_FF z_F = -(Q u)_F, on the swept tile, refined.
        y = solve_swept(swept, q, neg_qu, free, REFINE)
        # Multipliers of the bounds off F: (Q v)_i = (Q u + Q z)_i.
        lam = qu + tl.sum(q * y[None, :], axis=1)
        lam = tl.where((free == 0) & live_r, lam, _INF)
        swept, free, z, done = active_set_step(swept, free, z, y, lam, tol, done, ii, jj, r)
    # max with u: the rescaling's rounding must not put v below its bound.
    tl.store(v_ptr + pid.to(tl.int64) * K + r, tl.maximum(a * (u + z), u0), mask=live_r)


INTERPRETED = "Interpreted" in type(_dual_cone_kernel).__name__


def dual_cone(
    gram: Tensor, u: Tensor, reg: float, norm_eps: float = 0.0, max_iter: int | None = None
) -> Tensor:
    """``v[b] = argmin_{v >= u[b]} v^T Q v`` (module docstring) for a [K, K] ``gram`` (float64
    or float32, any strides) and ``u`` [B, K] (float64), as [B, K] float64, in one launch."""
    k = check_kxk(
        gram, "dual_cone", "gradbal.solvers_qp.project_dual_cone", INTERPRETED, batched=False
    )
    if not isinstance(u, Tensor) or u.dim() != 2 or u.shape[1] != k or u.dtype != torch.float64:
        raise ValueError(f"dual_cone: u must be a float64 [B, {k}] tensor, got {getattr(u, 'shape', u)}")
    max_iter = check_max_iter(max_iter, k, "dual_cone")
    u = u.contiguous()
    b = u.shape[0]
    v = _alloc((b, k), dtype=torch.float64, device=gram.device)
    if b:
        _dual_cone_kernel[(b,)](
            gram,
            gram.stride(0),
            gram.stride(1),
            u,
            v,
            *fp32_pair(reg),
            *fp32_pair(norm_eps),
            max_iter,
            **launch_meta(k, REFINE_STEPS),
        )
    return v
