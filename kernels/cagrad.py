"""CAGrad's weights, inner problem and direction, in one launch.

CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
Alg. 1) solves, on the simplex,

    w* = argmin_w  F(w) = a^T w + phi sqrt(w^T G w),   a = G b (b = 1/K), phi = c sqrt(b^T G b)

(G symmetrised and divided by its trace: w* is scale invariant), and weights the gradients by
``w = b + (phi / ||g_w*||) w*`` (0 when ``||g_w*|| <= norm_eps``), divided by the rescale
divisor. :func:`gradbal.solvers_qp.cagrad_weights` enumerates the faces of the simplex for
K <= 8 and runs an interior point plus exact face solves above; on a GPU that is ~100 launches
at K = 4 and ~1800 at K = 16 (measured on an H200: CAGrad's aggregate 3-7x the Gram and
combine passes at K <= 8 eager, 58-75x at K = 16; benchmarks/RESULTS.md). Here one program
solves it in registers:

A primal active-set method over the faces of the simplex. On the face S (w = 0 off S) the
stationary point of F has a closed form: with ``p = G_SS^-1 1``, ``q = G_SS^-1 a_S``,
``s_p = 1^T p``, ``s_q = 1^T q``, ``t = a_S^T q`` and ``disc = s_q^2 - s_p (t - phi^2)``,
``w_S = (mu p - q) / sqrt(disc)``, ``mu = (s_q + sqrt(disc)) / s_p`` (the same formula as the
torch solver's). G_SS^-1 comes from the matrix kept swept on S (:mod:`._sweep`, one rank-one
update per change of S) with ``REFINE_STEPS`` steps of iterative refinement. Starting from the
best vertex:

* if the face's stationary point is >= 0 it becomes the iterate, and the coordinate off S whose
  partial derivative ``a_i + phi (G w)_i / ||g_w||`` is furthest below ``F(w)`` joins S (F is
  positively homogeneous, so ``w^T grad F = F`` is the multiplier of ``1^T w = 1``); none below
  ``-TOL x scale``: optimal, stop;
* if it has a negative entry, the iterate moves towards it until a coordinate reaches 0, which
  leaves S; if it does not exist (``disc <= 0``: F is unbounded below on the face's affine hull,
  along ``d = (s_q / s_p) p - q``), the iterate moves along d until a coordinate reaches 0.

F decreases at every move (it is convex, and below the iterate at the target, or decreasing
along the whole ray), so no face comes twice; at most ``4K + 8`` iterations run. The faces are
solved with a ridge of ``1e-10 G_ii + 1e-18`` on the normalised G's diagonal (relative, unlike
the torch solver's 1e-10: gradients of very different norms keep their solution), the final
``||g_w*||`` with G itself.

Checked against the torch solver (exact face enumeration for K <= 8) in
tests/kernels/test_kernel_cagrad.py. (Not yet run on a GPU.)
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
    sweep_pivot,
)

__all__ = ["MAX_K", "cagrad_direction", "default_max_iter"]

#: Largest K the one-program kernel takes.
MAX_K = KXK_MAX_K
#: Gram dtypes the kernel reads (it computes in float64).
SUPPORTED_DTYPES = KXK_DTYPES
#: A coordinate joins the face only if its KKT residual is below ``-TOL x (max|a| + phi
#: sqrt(max G_ii))``.
TOL = 1e-12
#: Steps of iterative refinement of the face solves.
REFINE_STEPS = 2
#: Ridge of the face solves: ``RIDGE x G_ii + RIDGE_FLOOR`` on the trace-normalised G's
#: diagonal (the torch solver adds 1e-10 to every diagonal entry).
RIDGE = 1e-10
RIDGE_FLOOR = 1e-18

_TOL = tl.constexpr(TOL)
_RIDGE_C = tl.constexpr(RIDGE)
_FLOOR = tl.constexpr(RIDGE_FLOOR)
_INF = tl.constexpr(float("inf"))

# Hook for every buffer this module allocates; tests swap it for a poisoning allocator.
_alloc = torch.empty


def default_max_iter(k: int) -> int:
    """Iterations the kernel runs at most: 4K + 8."""
    return check_max_iter(None, k, "cagrad_direction")


@triton.jit
def _cagrad_kernel(
    g_ptr, stride_r, stride_c, w_ptr,
    c_hi, c_lo, eps_hi, eps_lo, div_hi, div_lo, max_iter,
    K: tl.constexpr, KP: tl.constexpr, REFINE: tl.constexpr,
):  # fmt: skip
    """One program: CAGrad's direction weights (row 0) and the inner problem's w* (row 1) of
    out[2, K] (float64) for the [K, K] G."""
    r = tl.arange(0, KP)
    ii = r[:, None]
    jj = r[None, :]
    valid = (ii < K) & (jj < K)
    live = r < K
    sym = load_sym(g_ptr, stride_r, stride_c, ii, jj, valid)  # non-finite entries read as 0
    c = f64_arg(c_hi, c_lo)
    norm_eps = f64_arg(eps_hi, eps_lo)
    divisor = f64_arg(div_hi, div_lo)
    tr = tl.sum(tl.sum(tl.where(ii == jj, sym, 0.0), axis=1), axis=0)
    tr = tl.where(tr > 0, tr, 1.0)
    g = sym / tr
    # The ridge is relative to each diagonal entry (plus a floor for zero rows): an absolute one
    # would move the solution by up to 4% where a gradient's squared norm is 1e-8 of the
    # trace (norms 1e-2 and 1e2: K = 2 in the tests).
    gdiag = tl.sum(tl.where(ii == jj, g, 0.0), axis=1)
    ridge = tl.maximum(gdiag, 0.0) * _RIDGE_C + _FLOOR
    gr = g + tl.where((ii == jj) & valid, ridge[:, None], 0.0)
    a = tl.sum(g, axis=1) / K  # G b, b = 1 / K
    phi = c * tl.sqrt(tl.maximum(tl.sum(a, axis=0) / K, 0.0))
    diag = tl.where(live, gdiag + ridge, 0.0)  # gr's diagonal
    scale = tl.max(tl.abs(a), axis=0) + phi * tl.sqrt(tl.max(tl.maximum(diag, 0.0), axis=0))
    tol = _TOL * scale
    # Start at the best vertex (its face's stationary point is the vertex itself).
    i0 = tl.argmin(tl.where(live, a + phi * tl.sqrt(tl.maximum(diag, 0.0)), _INF), axis=0)
    x = tl.where(r == i0, 1.0, 0.0).to(tl.float64)
    free = x
    swept = sweep_pivot(gr, i0, 1.0, ii, jj, r)
    ones = tl.where(live, 1.0, 0.0).to(tl.float64)
    done = phi <= 0  # F = a^T w with a = 0 (b^T G b = 0): every point is optimal
    it = 0
    while (it < max_iter) & ~done:  # stops at convergence (no masked iterations after it)
        it += 1
        p = solve_swept(swept, gr, ones, free, REFINE)
        q = solve_swept(swept, gr, a, free, REFINE)
        s_p = tl.sum(p, axis=0)
        s_q = tl.sum(q, axis=0)
        t = tl.sum(a * q, axis=0)
        disc = s_q * s_q - s_p * (t - phi * phi)
        root = tl.sqrt(tl.maximum(disc, 0.0))
        ok = (disc > 0) & (s_p > 0)
        mu = (s_q + root) / tl.where(ok, s_p, 1.0)
        stat = (mu * p - q) / tl.where(ok, root, 1.0)  # the face's stationary point
        # No stationary point: F is unbounded below along d on the face's affine hull; a
        # far point on that ray makes active_set_step move along it to the first zero.
        d = tl.where(s_p > 0, s_q / tl.where(s_p > 0, s_p, 1.0), 0.0) * p - q
        far = 1e30 / tl.maximum(tl.max(tl.abs(d), axis=0), 1e-270)  # <= 1e300: finite
        cand = tl.where(ok, stat, x + far * d) * free
        # KKT residuals off S at the candidate (used only when it becomes the iterate).
        gc = tl.sum(gr * cand[None, :], axis=1)
        rc = tl.sqrt(tl.maximum(tl.sum(cand * gc, axis=0), 0.0))
        f = tl.sum(a * cand, axis=0) + phi * rc
        grad = a + phi * gc / tl.maximum(rc, 1e-300)
        mult = tl.where((free == 0) & live, grad - f, _INF)
        swept, free, x, done = active_set_step(swept, free, x, cand, mult, tol, done, ii, jj, r)
    w = tl.maximum(x, 0.0)
    w = w / tl.maximum(tl.sum(w, axis=0), 1e-300)
    rw = tl.sqrt(tl.maximum(tl.sum(w * tl.sum(g * w[None, :], axis=1), axis=0), 0.0))
    out = tl.where(rw <= norm_eps, 0.0, (phi / tl.where(rw > 0, rw, 1.0)) * w + 1.0 / K) / divisor
    tl.store(w_ptr + r, out, mask=live)
    tl.store(w_ptr + K + r, w, mask=live)


INTERPRETED = "Interpreted" in type(_cagrad_kernel).__name__


def cagrad_direction(
    gram: Tensor, c: float, norm_eps: float, divisor: float = 1.0, max_iter: int | None = None
) -> tuple[Tensor, Tensor]:
    """CAGrad's weights ``(b + (phi / ||g_w*||) w*) / divisor`` (0 when ``||g_w*|| <= norm_eps``
    relative to ``sqrt(trace(G))``) and the inner problem's minimiser w*, for a [K, K] ``gram``
    (float64 or float32, any strides, K >= 2), as two [K] float64 tensors, in one launch
    (module docstring)."""
    k = check_kxk(gram, "cagrad_direction", "gradbal.methods.CAGrad", INTERPRETED, batched=False)
    if k < 2:
        raise ValueError(f"cagrad_direction: K must be >= 2, got {k}")
    if not float(c) > 0:
        raise ValueError(f"cagrad_direction: c must be > 0 (c = 0 is the mean), got {c}")
    if not float(norm_eps) >= 0 or not float(divisor) > 0:
        raise ValueError(f"cagrad_direction: need norm_eps >= 0 and divisor > 0, got {norm_eps}, {divisor}")
    max_iter = check_max_iter(max_iter, k, "cagrad_direction")
    w = _alloc((2, k), dtype=torch.float64, device=gram.device)
    _cagrad_kernel[(1,)](
        gram, gram.stride(0), gram.stride(1), w,
        *fp32_pair(c), *fp32_pair(norm_eps), *fp32_pair(divisor), max_iter,
        **launch_meta(k, REFINE_STEPS),
    )  # fmt: skip
    return w[0], w[1]
