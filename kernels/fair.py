"""FairGrad's and Nash-MTL's weights, ``G w = w^(-1/alpha)``, in one launch.

FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024) with fairness
parameter alpha, and Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML
2022; alpha = 1, ``G w = 1 / w``), weight the K task gradients by the positive solution w of
``G w = w^(-1/alpha)``: the unique minimiser of the strictly convex

    f(w) = 1/2 w^T G w - sum_i phi(w_i),   phi'(w) = w^(-1/alpha)

(``phi = log`` for alpha = 1, ``w^e / e`` with ``e = 1 - 1/alpha`` otherwise).
:func:`gradbal.solvers_qp.fair_weights` finds it with a fixed number of damped Newton steps
(each a line search over 16 step lengths at once) and then undamped ones; on a GPU that is ~240
small ops (measured on an H200 as a CUDA graph: FairGrad's stage 2.9-5.9x the Gram and combine
passes at K <= 8; eager 15-17x; benchmarks/RESULTS.md). This kernel runs the same algorithm in
one program, in registers, with no host synchronisation:

* G is symmetrised, divided by ``s = trace(G) / K`` and given a ridge (``ridge I``); the answer
  is multiplied back by ``s^(-alpha / (1 + alpha))`` (the exact scaling law).
* Start: ``w_i = G_ii^(-alpha/(1+alpha))`` (exact for orthogonal gradients) times the scalar
  that minimises f along it.
* Newton direction ``H^-1 (G w - w^(-1/alpha))``, ``H = G + diag(w^(-1/alpha) / (alpha w))``
  (positive definite): the K pivots of H swept in registers (Goodnight's SWEEP, :mod:`._sweep`,
  which leaves ``-H^-1``), then ``REFINE_STEPS`` steps of iterative refinement against H.
* Damped step: f at ``w - t dw`` for ``t = t_max 2^-i`` (i < 15) and 0, ``t_max`` 0.99 of the
  longest step keeping w > 0, capped at 16; the least is kept. The quadratic term of f along
  the line is ``a + 2 t b + t^2 c`` from three scalars (the torch solver forms the 16 candidates'
  ``G w`` instead; the two differ by rounding, which only matters where the 16 values of f tie
  to ~1e-8, near the solution, before the undamped steps).
* Undamped step: ``w <- max(w - dw, w / 100)``.

Checked against the torch solver in tests/kernels/test_kernel_fair.py. (Not yet run on a GPU.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import KXK_DTYPES, KXK_MAX_K, check_kxk
from ._sweep import f64_arg, fp32_pair, launch_meta, load_sym, solve_swept, sweep_pivot

__all__ = ["MAX_K", "fair_weights"]

#: Largest K the one-program kernel takes.
MAX_K = KXK_MAX_K
#: Gram dtypes the kernel reads (it computes in float64).
SUPPORTED_DTYPES = KXK_DTYPES
#: Steps of iterative refinement of each Newton solve.
REFINE_STEPS = 2
#: Step lengths tried per damped step: t_max 2^-i for i < LINE - 1, and 0.
LINE = 16

_INF = tl.constexpr(float("inf"))

# Hook for every buffer this module allocates; tests swap it for a poisoning allocator.
_alloc = torch.empty


@triton.jit
def _phi_prime(w, expo, ALPHA_ONE: tl.constexpr):
    """``w^(-1/alpha)`` (w > 0)."""
    if ALPHA_ONE:
        return 1.0 / w
    else:
        return tl.exp(expo * tl.log(w))


@triton.jit
def _neg_newton_step(g, w, live_r, expo, inv_alpha, ii, jj, r,
                     K: tl.constexpr, REFINE: tl.constexpr, ALPHA_ONE: tl.constexpr):
    """``H^-1 (G w - w^(-1/alpha))``: the Newton step of f at w, negated (0 on padded lanes)."""
    wp = _phi_prime(w, expo, ALPHA_ONE)
    grad = tl.where(live_r, tl.sum(g * w[None, :], axis=1) - wp, 0.0)
    h = g + tl.where((ii == jj) & live_r[:, None], (wp / w * inv_alpha)[:, None], 0.0)
    swept = h
    for p in range(K):  # -H^-1 on the live block; padded rows and columns stay 0
        swept = sweep_pivot(swept, p, 1.0, ii, jj, r)
    return solve_swept(swept, h, grad, tl.where(live_r, 1.0, 0.0), REFINE)


@triton.jit
def _fair_kernel(
    g_ptr,
    stride_r,
    stride_c,
    w_ptr,
    alpha_hi,
    alpha_lo,
    ridge_hi,
    ridge_lo,
    iterations,
    newton,
    K: tl.constexpr,
    KP: tl.constexpr,
    REFINE: tl.constexpr,
    LINE_N: tl.constexpr,
    ALPHA_ONE: tl.constexpr,
):
    """One program: w[K] (float64) for the [K, K] G at g_ptr."""
    r = tl.arange(0, KP)
    ii = r[:, None]
    jj = r[None, :]
    valid = (ii < K) & (jj < K)
    live_r = r < K
    sym = load_sym(g_ptr, stride_r, stride_c, ii, jj, valid)  # non-finite entries read as 0
    # Float arguments arrive as fp32: each float64 parameter comes as an fp32 pair hi + lo.
    alpha = f64_arg(alpha_hi, alpha_lo)
    ridge = f64_arg(ridge_hi, ridge_lo)
    inv_alpha = 1.0 / alpha
    expo = -inv_alpha
    e = 1.0 - inv_alpha
    p_exp = alpha / (1.0 + alpha)
    # G / s + ridge I with s = trace(G) / K (1 for a zero trace).
    tr = tl.sum(tl.sum(tl.where(ii == jj, sym, 0.0), axis=1), axis=0)
    s = tl.where(tr > 0, tr / K, 1.0)
    g = sym / s + tl.where((ii == jj) & valid, ridge, 0.0)
    diag = tl.sum(tl.where(ii == jj, g, 0.0), axis=1)
    # Start: G_ii^(-p) (diag >= ridge > 0), times the c minimising f(c w0).
    w0 = tl.where(live_r, tl.exp(-p_exp * tl.log(tl.where(live_r, diag, 1.0))), 0.0)
    quad0 = tl.sum(tl.sum(g * w0[None, :], axis=1) * w0, axis=0)
    if ALPHA_ONE:
        c = tl.exp(-p_exp * tl.log(quad0 / K))  # (K / w^T G w)^(1/2)
    else:
        pw = tl.sum(tl.where(live_r, tl.exp(e * tl.log(tl.where(live_r, w0, 1.0))), 0.0), axis=0)
        c = tl.exp(p_exp * tl.log(pw / quad0))
    # Padded lanes hold 1 (log and powers stay finite; every step there is 0).
    w = tl.where(live_r, w0 * c, 1.0)

    cols = tl.arange(0, LINE_N)
    # -0.99 * 2^-i for i < LINE_N - 1, and 0 (the torch solver's fractions); 2^-i exactly, from
    # its bits (biased exponent 1023 - i, zero mantissa).
    pow2 = ((1023 - cols.to(tl.int64)) << 52).to(tl.float64, bitcast=True)
    frac = tl.where(cols < LINE_N - 1, -0.99 * pow2, 0.0)
    for _it in range(iterations):
        neg_dw = _neg_newton_step(g, w, live_r, expo, inv_alpha, ii, jj, r, K, REFINE, ALPHA_ONE)
        m = tl.maximum(tl.max(tl.where(live_r, neg_dw / w, -_INF), axis=0), 0.99 / 16)
        t = frac / m  # [LINE_N]
        cand = w[:, None] + neg_dw[:, None] * t[None, :]  # [KP, LINE_N]
        gw = tl.sum(g * w[None, :], axis=1)
        gd = tl.sum(g * neg_dw[None, :], axis=1)
        qa = tl.sum(w * gw, axis=0)  # padded lanes: gw = 0
        qb = tl.sum(neg_dw * gw, axis=0)
        qc = tl.sum(neg_dw * gd, axis=0)
        quad = qa + t * (2.0 * qb + t * qc)  # (w + t d)^T G (w + t d), per candidate
        logc = tl.where(live_r[:, None], tl.log(cand), 0.0)
        if ALPHA_ONE:
            vals = quad - 2.0 * tl.sum(logc, axis=0)
        else:
            vals = quad - (2.0 / e) * tl.sum(tl.where(live_r[:, None], tl.exp(e * logc), 0.0), axis=0)
        vals = tl.where(vals < _INF, vals, _INF)  # NaN (compares False) is never chosen
        best = tl.argmin(vals, axis=0)
        w = tl.sum(tl.where(cols[None, :] == best, cand, 0.0), axis=1)
    for _it in range(newton):
        # Undamped, each weight kept at >= 1/100 of its value (positive).
        neg_dw = _neg_newton_step(g, w, live_r, expo, inv_alpha, ii, jj, r, K, REFINE, ALPHA_ONE)
        w = tl.maximum(w - neg_dw, 0.01 * w)
    out_scale = tl.exp(-p_exp * tl.log(s))
    tl.store(w_ptr + r, w * out_scale, mask=live_r)


INTERPRETED = "Interpreted" in type(_fair_kernel).__name__


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"fair_weights: {what} must be an int >= 0, got {value!r}")
    return value


def fair_weights(
    gram: Tensor, alpha: float = 1.0, iterations: int = 8, ridge: float = 1e-8, newton: int = 4
) -> Tensor:
    """The positive w of ``G w = w^(-1/alpha)`` for a [K, K] ``gram`` (float64 or float32, any
    strides) in one launch, as [K] float64: the algorithm of
    :func:`gradbal.solvers_qp.fair_weights` (module docstring), ``iterations`` damped and
    ``newton`` undamped Newton steps."""
    k = check_kxk(gram, "fair_weights", "gradbal.solvers_qp.fair_weights", INTERPRETED,
                  batched=False)  # fmt: skip
    if not float(alpha) > 0:
        raise ValueError(f"fair_weights: alpha must be > 0, got {alpha}")
    if not float(ridge) > 0:
        raise ValueError(f"fair_weights: ridge must be > 0, got {ridge}")
    iterations = _check_count(iterations, "iterations")
    newton = _check_count(newton, "newton")
    w = _alloc((k,), dtype=torch.float64, device=gram.device)
    meta = launch_meta(k, REFINE_STEPS)
    _fair_kernel[(1,)](
        gram,
        gram.stride(0),
        gram.stride(1),
        w,
        *fp32_pair(alpha),
        *fp32_pair(ridge),
        iterations,
        newton,
        LINE_N=LINE,
        ALPHA_ONE=float(alpha) == 1.0,
        **meta,
    )
    return w
