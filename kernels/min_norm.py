"""Min-norm point of the convex hull of K gradients, from their Gram matrix, in one launch.

The K x K problem of MGDA (Sener & Koltun 2018) and MoKD (arXiv 2505.08170, on the
loss-scaled Gram matrix)::

    w* = argmin_{w >= 0, sum(w) = 1}  w^T G w

On a GPU the torch solvers of :mod:`gradbal.solvers` are dozens to hundreds of small ops, each
a kernel launch (measured on an H100/H200: ~15 us each eager; MoKD's K = 16 interior point,
822 ops, took 10-13 ms eager and 1.8 ms replayed from a CUDA graph; benchmarks/RESULTS.md). This
kernel solves the problem inside one program per matrix, in registers, with no host
synchronisation.

Problem as :func:`gradbal.solvers.min_norm_simplex` states it: ``g = (G + G^T) / (2 max_i
G_ii) + ridge I`` (ridge 1e-12; a zero matrix gives the uniform weights), solved in float64.
Non-finite entries of G are read as 0.

Algorithm: a primal active-set method (the min-norm-point method of Wolfe 1976, as in
Lawson-Hanson NNLS) on the diagonally scaled problem ``q = D g D``, ``D = diag(g)^(-1/2)``
(unit diagonal, so the pivots below are O(1) whatever the spread of gradient norms), ``w = D x``:

    min x^T q x  s.t.  a^T x = 1, x >= 0,  a = diag(D).

Start at the best vertex (the smallest ``g_ii``). Each iteration solves the equality problem on
the current support S, ``x_S = q_SS^-1 a_S / (a_S^T q_SS^-1 a_S)`` (objective
``1 / (a_S^T q_SS^-1 a_S)``). If that point is >= 0 it becomes the iterate and the index outside
S with the most negative KKT multiplier ``(q x)_i / a_i - obj`` joins S (none below
``-TOL x obj``: optimal, stop); otherwise the iterate moves towards it as far as x >= 0
allows and the index that reaches 0 leaves S. The objective never increases; at most
``max_iter`` (default 4K + 8) iterations run; the loop stops once it has converged.

``q_SS^-1`` is never formed from scratch: the matrix is kept *swept* on S (:mod:`._sweep`:
``A_SS = -q_SS^-1``), so each change of S is one rank-one update of the [KP, KP] tile (one row
read by a reduction) and the solution is one masked product; the step itself is
:func:`._sweep.active_set_step`, shared with :mod:`.dual_cone`.
Sweeps and reverse sweeps accumulate rounding, which on rank-deficient G (q_SS near-singular
up to the ridge) left KKT multipliers wrong by up to 2e-6 of the objective; each solve is
therefore followed by ``REFINE_STEPS`` = 2 steps of iterative refinement,
``y <- y + (-A_SS)(a_S - q_SS y)`` (the residual against q itself, the swept matrix as the
approximate inverse), after which every stress case met the KKT conditions to 1e-9 (one step
left 9e-11 absolute).

The tolerance ``TOL = 1e-9`` (relative to the objective) is what the result is accurate to
in objective: near-duplicate gradients (whose multipliers differ from 0 by the ridge alone)
are not both brought into S, so of two equal rows one gets the weight the torch solver
splits evenly between them (the combined direction ``sum_k w_k g_k`` is the same). Checked
against :func:`gradbal.solvers.min_norm_simplex` on the test suite's stress set (random,
rank-deficient, equal / opposite / zero rows, norms over 8 decades, K = 3..16): objective on
g never above the torch solver's by more than 1e-9 relative + 1e-15, weights within 3e-8 of
it on well-conditioned problems; 9 iterations on average, at most 33 at K = 16.

Two kernels wrap the solver with a method's whole K x K stage: :func:`mokd_weights` (MoKD's
loss scaling, magnitude and clipping) and :func:`mgda_normalized_weights` (MGDA's l2, loss and
loss+ normalisers, Sener & Koltun 2018).

Cost on a GPU: per iteration seven tile reductions ([KP, KP], one warp up to KP = 16) and a
few vector ones: latency-bound, with no launch per op. (Timings and warp counts not yet
measured on a GPU.)
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
    sweep_reference,
)

__all__ = [
    "MAX_K", "NORMALIZATIONS", "default_max_iter", "mgda_normalized_weights", "min_norm", "min_norm_reference",
    "mokd_weights",
]

#: Largest K the one-program kernel takes (q and its swept copy live in registers).
MAX_K = KXK_MAX_K

#: Input dtypes the kernel reads (it computes in float64).
SUPPORTED_DTYPES = KXK_DTYPES

#: The ridge of :func:`gradbal.solvers.min_norm_simplex`, relative to the largest diagonal.
RIDGE = 1e-12
#: An index joins the support only if its KKT multiplier is below ``-TOL x objective``.
TOL = 1e-9
#: Steps of iterative refinement of each solve on the support (see the module docstring).
REFINE_STEPS = 2

_RIDGE = tl.constexpr(RIDGE)
_TOL = tl.constexpr(TOL)
_INF = tl.constexpr(float("inf"))

# Hook for every buffer this module allocates; tests swap it for a poisoning allocator.
_alloc = torch.empty


def default_max_iter(k: int) -> int:
    """Iterations the kernel runs at most: 4K + 8 (measured need: 33 at K = 16, see above)."""
    return check_max_iter(None, k, "min_norm")


# --------------------------------------------------------------------------------------------
# reference: the same algorithm in float64 numpy-style torch ops (slow; for the tests)
# --------------------------------------------------------------------------------------------


def min_norm_reference(gram: Tensor, max_iter: int | None = None) -> Tensor:
    """The kernel's algorithm on one [K, K] matrix with Python control flow (float64)."""
    k = gram.shape[-1]
    x0 = gram.to(torch.float64)
    x0 = torch.where(x0.abs() <= torch.finfo(torch.float64).max, x0, 0.0)
    sym = 0.5 * x0 + 0.5 * x0.mT
    scale = sym.diagonal().max()
    scale = scale if scale > 0 else torch.ones((), dtype=torch.float64)
    g = sym / scale
    g.diagonal().clamp_(min=0).add_(RIDGE)
    dg = g.diagonal()
    a = dg.rsqrt()
    q = g * torch.outer(a, a)
    i0 = int(dg.argmin())
    swept = sweep_reference(q, i0, 1.0)
    in_s = torch.zeros(k, dtype=torch.bool, device=gram.device)
    in_s[i0] = True
    x = torch.zeros(k, dtype=torch.float64, device=gram.device)
    x[i0] = 1 / a[i0]
    for _ in range(default_max_iter(k) if max_iter is None else max_iter):
        y = -(swept[:, in_s] @ a[in_s]) * in_s
        for _ in range(REFINE_STEPS):
            y = y - (swept @ ((a - q @ y) * in_s)) * in_s
        tot = a @ y
        v = y / tot
        if bool((v[in_s] > 0).all()):
            x = v
            obj = 1 / tot
            viol = torch.where(in_s, torch.inf, (q @ v) / a - obj)
            j = int(viol.argmin())
            if not viol[j] < -TOL * obj:
                break
            swept, in_s[j] = sweep_reference(swept, j, 1.0), True
        else:
            ratio = torch.where(in_s & (v <= 0), x / (x - v).clamp_min(1e-300), torch.inf)
            p = int(ratio.argmin())
            x = (x + ratio[p] * (v - x)).clamp_min(0)
            x[p] = 0
            swept, in_s[p] = sweep_reference(swept, p, -1.0), False
    w = a * x
    return w / w.sum()


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _simplex_weights(sym, max_iter, ii, jj, r, K: tl.constexpr, REFINE: tl.constexpr):
    """The min-norm simplex weights of the symmetric tile ``sym`` (float64 [KP], 0 on padded
    lanes): the algorithm of the module docstring."""
    live_r = r < K
    valid = (ii < K) & (jj < K)
    diag = tl.sum(tl.where(ii == jj, sym, 0.0), axis=1)
    scale = tl.max(tl.where(live_r, diag, 0.0), axis=0)
    scale = tl.where(scale > 0, scale, 1.0)
    # The diagonal of g; a negative entry (not a Gram matrix: garbage in) is read as 0, so
    # that D stays finite.
    dg = tl.where(live_r, tl.maximum(diag / scale, 0.0) + _RIDGE, 1.0)
    a = tl.where(live_r, 1.0 / tl.sqrt(dg), 0.0)  # D; 0 on padded lanes, which never join S
    g = tl.where(ii == jj, dg[:, None], tl.where(valid, sym / scale, 0.0))
    q = g * a[:, None] * a[None, :]
    # Start: the best vertex (smallest g_ii; the first one on ties).
    i0 = tl.argmin(tl.where(live_r, dg, _INF), axis=0)
    swept = sweep_pivot(q, i0, 1.0, ii, jj, r)
    in_s = tl.where(r == i0, 1.0, 0.0)
    x = tl.where(r == i0, tl.sqrt(dg), 0.0)  # the vertex e_i0 / a_i0: a^T x = 1
    done = i0 < 0  # False, as a tensor the loop can carry
    it = 0
    while (it < max_iter) & ~done:  # stops at convergence (no masked iterations after it)
        it += 1
        # The equality problem on S: y = q_SS^-1 a_S = -A_SS a_S, v = y / (a^T y), then
        # REFINE steps of iterative refinement against q itself (see the module docstring).
        y = solve_swept(swept, q, a, in_s, REFINE)
        tot = tl.sum(a * y, axis=0)
        v = y / tot
        obj = 1.0 / tot
        # KKT multipliers of the indices outside S (scaled back to g's units).
        grad = tl.sum(q * v[None, :], axis=1)
        viol = tl.where((in_s == 0) & live_r, grad / tl.where(live_r, a, 1.0) - obj, _INF)
        swept, in_s, x, done = active_set_step(swept, in_s, x, v, viol, _TOL * obj, done, ii, jj, r)
    w = a * x
    return w / tl.sum(w, axis=0)


@triton.jit
def _min_norm_kernel(
    g_ptr,
    stride_b,
    stride_r,
    stride_c,
    w_ptr,
    max_iter,
    K: tl.constexpr,
    KP: tl.constexpr,
    REFINE: tl.constexpr,
):
    """Program b: the min-norm weights of g[b] -> w[b, :K] (contiguous, float64)."""
    pid = tl.program_id(0)
    r = tl.arange(0, KP)
    ii = r[:, None]
    jj = r[None, :]
    sym = load_sym(g_ptr + pid.to(tl.int64) * stride_b, stride_r, stride_c, ii, jj,
                    (ii < K) & (jj < K))  # fmt: skip
    w = _simplex_weights(sym, max_iter, ii, jj, r, K, REFINE)
    tl.store(w_ptr + pid.to(tl.int64) * K + r, w, mask=r < K)


@triton.jit
def _mokd_kernel(
    g_ptr,
    stride_r,
    stride_c,
    l_ptr,
    w_ptr,
    floor_hi,
    floor_lo,
    max_norm_hi,
    max_norm_lo,
    max_iter,
    K: tl.constexpr,
    KP: tl.constexpr,
    REFINE: tl.constexpr,
    LOG_SCALE: tl.constexpr,
    MEAN_LOSS: tl.constexpr,
    CLIP: tl.constexpr,
):
    """MoKD's whole K x K stage (gradbal.methods.MoKD.weights) for one [K, K] G and losses [K]:
    ``l = max(losses, floor)``, the min-norm weights pi of ``G / (l l^T)`` (or of G without log
    scaling), ``w = pi / l``, times ``mean(l)`` for the mean-loss magnitude, and clipped to
    ``||sum_k w_k g_k|| <= max_norm``."""
    r = tl.arange(0, KP)
    ii = r[:, None]
    jj = r[None, :]
    live_r = r < K
    sym = load_sym(g_ptr, stride_r, stride_c, ii, jj, (ii < K) & (jj < K))
    if LOG_SCALE:
        floor = f64_arg(floor_hi, floor_lo)
        losses = tl.load(l_ptr + r, mask=live_r, other=1.0).to(tl.float64)
        clamped = tl.maximum(losses, floor)
        inv = tl.where(live_r, 1.0 / clamped, 0.0)
        pi = _simplex_weights(sym * inv[:, None] * inv[None, :], max_iter, ii, jj, r, K, REFINE)
        w = pi * inv
        if MEAN_LOSS:
            w = w * (tl.sum(tl.where(live_r, clamped, 0.0), axis=0) / K)
    else:
        w = _simplex_weights(sym, max_iter, ii, jj, r, K, REFINE)
    if CLIP:
        max_norm = f64_arg(max_norm_hi, max_norm_lo)
        sq = tl.sum(w * tl.sum(sym * w[None, :], axis=1), axis=0)
        norm = tl.sqrt(tl.maximum(sq, 0.0))
        w = w * tl.minimum(max_norm / tl.maximum(norm, 1e-30), 1.0)
    tl.store(w_ptr + r, w, mask=live_r)


@triton.jit
def _mgda_normalized_kernel(
    g_ptr,
    stride_r,
    stride_c,
    l_ptr,
    w_ptr,
    floor_hi,
    floor_lo,
    max_iter,
    K: tl.constexpr,
    KP: tl.constexpr,
    REFINE: tl.constexpr,
    NORM: tl.constexpr,
    APPLY_NORMALIZED: tl.constexpr,
):
    """:class:`gradbal.methods.MGDANormalized`'s whole K x K stage for one [K, K] G (and losses
    [K] for NORM 2, 3): the normaliser n_k (NORM 1 ``||g_k||``, 2 ``max(L_k, floor)``, 3 their
    product), ``inv = 1 / n`` (0 where n is not > 0, NaN included), the min-norm weights pi of
    ``G * inv inv^T``, and ``w = pi * inv`` (APPLY_NORMALIZED) or ``pi``."""
    r = tl.arange(0, KP)
    ii = r[:, None]
    jj = r[None, :]
    live_r = r < K
    valid = (ii < K) & (jj < K)
    # ||g_k|| from G's diagonal as given (NaN stays NaN, so that inv is 0 there, as the torch ops)
    diag = tl.load(g_ptr + r * (stride_r + stride_c), mask=live_r, other=0.0).to(tl.float64)
    norms = tl.sqrt(tl.where(diag <= 0, 0.0, diag))  # NaN compares False: stays NaN
    if NORM == 1:
        scale = norms
    else:
        floor = f64_arg(floor_hi, floor_lo)
        losses = tl.load(l_ptr + r, mask=live_r, other=1.0).to(tl.float64)
        scale = tl.where(losses < floor, floor, losses)  # NaN compares False: stays NaN
        if NORM == 3:
            scale = scale * norms
    inv = tl.where(live_r & (scale > 0), 1.0 / scale, 0.0)
    sym = load_sym(g_ptr, stride_r, stride_c, ii, jj, valid)
    pi = _simplex_weights(sym * inv[:, None] * inv[None, :], max_iter, ii, jj, r, K, REFINE)
    w = pi * inv if APPLY_NORMALIZED else pi
    tl.store(w_ptr + r, w, mask=live_r)


INTERPRETED = "Interpreted" in type(_min_norm_kernel).__name__


# --------------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------------


def _check_losses(losses, gram: Tensor, k: int, where: str) -> None:
    """The loss values a kernel reads: a floating-point [K] tensor on the Gram matrix's device
    (a kernel would read a host pointer as a device one)."""
    if not isinstance(losses, Tensor) or losses.shape != (k,) or not losses.is_floating_point():
        raise ValueError(f"{where}: losses must be a floating-point [{k}] tensor, got "
                         f"{getattr(losses, 'shape', losses)}")  # fmt: skip
    if losses.device != gram.device:
        raise ValueError(f"{where}: losses are on {losses.device}, the Gram matrix on "
                         f"{gram.device}; move them to the Gram matrix's device")  # fmt: skip


def min_norm(gram: Tensor, max_iter: int | None = None) -> Tensor:
    """Min-norm simplex weights ``[..., K]`` (float64) of the Gram matrices ``gram[..., K, K]``
    (float64 or float32, any strides) in one Triton launch; no value is read back to the host.

    ``max_iter``: active-set iterations at most (default :func:`default_max_iter`).
    """
    k = check_kxk(gram, "min_norm", "gradbal.solvers.min_norm_simplex", INTERPRETED)
    max_iter = check_max_iter(max_iter, k, "min_norm")
    batch = gram.shape[:-2]
    flat = gram.reshape(-1, k, k)
    b = flat.shape[0]
    w = _alloc((b, k), dtype=torch.float64, device=gram.device)
    if b:
        _min_norm_kernel[(b,)](
            flat,
            flat.stride(0),
            flat.stride(1),
            flat.stride(2),
            w,
            max_iter,
            **launch_meta(k, REFINE_STEPS),
        )
    return w.reshape(*batch, k)


def mokd_weights(
    gram: Tensor,
    losses: Tensor,
    log_scale: bool = True,
    loss_floor: float = 1e-6,
    mean_loss: bool = True,
    max_norm: float | None = None,
    max_iter: int | None = None,
) -> Tensor:
    """:class:`gradbal.methods.MoKD`'s weights [K] (float64) for one [K, K] ``gram`` and the
    loss values ``losses`` [K], in one launch: see ``_mokd_kernel`` (``mean_loss``: the
    ``"mean_loss"`` magnitude, which applies with log scaling only)."""
    k = check_kxk(gram, "mokd_weights", "gradbal.methods.MoKD.weights", INTERPRETED, batched=False)
    _check_losses(losses, gram, k, "mokd_weights")
    max_iter = check_max_iter(max_iter, k, "mokd_weights")
    w = _alloc((k,), dtype=torch.float64, device=gram.device)
    _mokd_kernel[(1,)](
        gram,
        gram.stride(0),
        gram.stride(1),
        losses,
        w,
        *fp32_pair(loss_floor),
        *fp32_pair(0.0 if max_norm is None else max_norm),
        max_iter,
        LOG_SCALE=bool(log_scale),
        MEAN_LOSS=bool(mean_loss),
        CLIP=max_norm is not None,
        **launch_meta(k, REFINE_STEPS),
    )
    return w


#: :func:`mgda_normalized_weights`' normalisers, in the kernel's numbering (1, 2, 3).
NORMALIZATIONS = ("l2", "loss", "loss+")


def mgda_normalized_weights(
    gram: Tensor,
    losses: Tensor | None,
    normalization: str = "l2",
    apply_to: str = "normalized",
    loss_floor: float = 1e-6,
    max_iter: int | None = None,
) -> Tensor:
    """:class:`gradbal.methods.MGDANormalized`'s weights [K] (float64) for one [K, K] ``gram``
    (and the loss values ``losses`` [K] for ``"loss"`` / ``"loss+"``), in one launch: see
    ``_mgda_normalized_kernel``. (``normalization="none"`` is plain :func:`min_norm`.)"""
    where = "mgda_normalized_weights"
    k = check_kxk(gram, where, "gradbal.methods.MGDANormalized.weights", INTERPRETED, batched=False)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{where}: normalization must be one of {NORMALIZATIONS}, got "
                         f"{normalization!r}")  # fmt: skip
    if apply_to not in ("normalized", "raw"):
        raise ValueError(f"{where}: apply_to must be 'normalized' or 'raw', got {apply_to!r}")
    if normalization != "l2":
        _check_losses(losses, gram, k, where)
    max_iter = check_max_iter(max_iter, k, where)
    w = _alloc((k,), dtype=torch.float64, device=gram.device)
    _mgda_normalized_kernel[(1,)](
        gram,
        gram.stride(0),
        gram.stride(1),
        w if normalization == "l2" else losses,  # (l2 reads no losses: any pointer will do)
        w,
        *fp32_pair(loss_floor),
        max_iter,
        NORM=NORMALIZATIONS.index(normalization) + 1,
        APPLY_NORMALIZED=apply_to == "normalized",
        **launch_meta(k, REFINE_STEPS),
    )
    return w
