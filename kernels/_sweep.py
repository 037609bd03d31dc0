"""The machinery of the K x K solvers' kernels (:mod:`.min_norm`, :mod:`.dual_cone`,
:mod:`.cagrad`, :mod:`.fair`): Goodnight's SWEEP operator on a symmetric [KP, KP] tile in
registers (and its torch reference), the refined solve on a swept tile, and one step of the
primal active-set method built on them.

Sweeping pivot p of a symmetric A, with ``d = A_pp`` and r = row p (Beaton 1964; Goodnight,
"A tutorial on the SWEEP operator", 1979)::

    A_ij <- A_ij - r_i r_j / d (i, j != p),   A_pj = A_jp <- s r_j / d,   A_pp <- -1/d

s = +1 sweeps, s = -1 reverse-sweeps (undoing the sweep exactly, up to rounding); the tile
stays symmetric. After sweeping the pivots of a set S of a symmetric positive definite matrix,
``A_SS = -(A_SS before)^-1``: an active-set method adds or removes one index of its support
with one rank-one update (one row read by a reduction) instead of a new factorisation.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "active_set_step", "check_max_iter", "f64_arg", "fp32_pair", "launch_meta", "load_sym", "solve_swept",
    "sweep_pivot", "sweep_reference",
]

_INF = tl.constexpr(float("inf"))
_FP32 = struct.Struct("f")
_TINY = tl.constexpr(1e-300)
_DBL_MAX = tl.constexpr(1.7976931348623157e308)


@triton.jit
def load_sym(src, stride_r, stride_c, ii, jj, valid):
    """(G + G^T) / 2 of the [K, K] matrix at ``src`` (any strides, float64 or float32) as a
    float64 [KP, KP] tile, 0 outside K x K (``valid``); non-finite entries read as 0. G and
    G^T come from the same buffer, so the tile is exactly symmetric, and its diagonal is G's."""
    x0 = tl.load(src + ii * stride_r + jj * stride_c, mask=valid, other=0.0).to(tl.float64)
    x0t = tl.load(src + jj * stride_r + ii * stride_c, mask=valid, other=0.0).to(tl.float64)
    x0 = tl.where(tl.abs(x0) <= _DBL_MAX, x0, 0.0)
    x0t = tl.where(tl.abs(x0t) <= _DBL_MAX, x0t, 0.0)
    return 0.5 * x0 + 0.5 * x0t


@triton.jit
def f64_arg(hi, lo):
    """A float64 parameter passed as the fp32 pair of :func:`fp32_pair` (Triton passes Python
    floats to a kernel as fp32)."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def sweep_pivot(swept, p, sign, ii, jj, r):
    """Sweep (sign = +1) or reverse-sweep (sign = -1) pivot p of the symmetric tile ``swept``
    (row index ii = r[:, None], column index jj = r[None, :]); p < 0 leaves it unchanged."""
    row = tl.sum(tl.where(ii == p, swept, 0.0), axis=0)  # row p, indexed by column
    d = tl.sum(tl.where(r == p, row, 0.0), axis=0)
    d = tl.where(p >= 0, d, 1.0)
    scaled = sign * row / d
    out = swept - row[:, None] * row[None, :] / d
    out = tl.where(ii == p, scaled[None, :], out)
    out = tl.where(jj == p, scaled[:, None], out)
    out = tl.where((ii == p) & (jj == p), -1.0 / d, out)
    return tl.where(p >= 0, out, swept)


@triton.jit
def solve_swept(swept, mat, rhs, free, REFINE: tl.constexpr):
    """``mat_SS^-1 rhs_S`` (0 off S) from the tile ``swept`` on S (``-mat_SS^-1`` there), then
    REFINE steps of iterative refinement against ``mat`` itself (the residual
    ``rhs - mat x`` on S, the swept tile as the approximate inverse): sweeps and reverse sweeps
    accumulate rounding. ``free`` is 1.0 on S and 0.0 elsewhere."""
    x = -tl.sum(swept * (rhs * free)[None, :], axis=1) * free
    for _r in tl.static_range(REFINE):
        res = (rhs - tl.sum(mat * x[None, :], axis=1)) * free
        x = x - tl.sum(swept * res[None, :], axis=1) * free
    return x


def sweep_reference(a: Tensor, p: int, sign: float) -> Tensor:
    """:func:`sweep_pivot` on a float64 torch matrix (Python index p)."""
    d = a[p, p]
    row = a[p].clone()
    out = a - torch.outer(row, row) / d
    out[p, :] = sign * row / d
    out[:, p] = sign * row / d
    out[p, p] = -1.0 / d
    return out


@triton.jit
def active_set_step(swept, in_set, x, candidate, mult, slack, done, ii, jj, r):
    """One iteration of a primal active-set method (Lawson & Hanson; Wolfe) on variables
    ``x >= 0`` whose free set ``in_set`` (1.0 / 0.0 per lane) is kept swept in ``swept``.

    ``candidate``: the minimiser with the variables off the set at 0 (0 off the set);
    ``mult``: the multipliers of the variables off the set (+inf on the set and padded lanes);
    ``slack``: how far below 0 a multiplier must be for its variable to join.
    If the candidate is > 0 on the set it becomes x, and the variable of the most negative
    multiplier joins the set (none below ``-slack``: optimal, ``done``); otherwise x moves
    towards it as far as x >= 0 allows and the variable that reaches 0 leaves the set. Once
    ``done``, nothing changes. A candidate that is not finite (a breakdown of the rounding,
    not seen in the tests) also ends the method, at the last x (which is feasible).
    Returns (swept, in_set, x, done)."""
    # |c| <= DBL_MAX is False exactly for inf and NaN.
    finite = tl.max(tl.where(tl.abs(candidate) <= _DBL_MAX, 0.0, 1.0), axis=0) == 0
    done = done | ~finite
    feasible = tl.min(tl.where(in_set > 0, candidate, 1.0), axis=0) > 0
    j = tl.argmin(mult, axis=0)
    add = feasible & (tl.min(mult, axis=0) + slack < 0)
    # Ratio test towards an infeasible candidate: the first variable of the set to reach 0.
    ratio = tl.where((in_set > 0) & (candidate <= 0), x / tl.maximum(x - candidate, _TINY), _INF)
    drop = tl.argmin(ratio, axis=0)
    t = tl.min(ratio, axis=0)
    t = tl.where(t < _INF, t, 0.0)  # no such variable (candidate feasible): the step is unused
    stepped = tl.where(r == drop, 0.0, tl.maximum(x + t * (candidate - x), 0.0))
    live = ~done
    x = tl.where(live, tl.where(feasible, candidate, stepped), x)
    p = tl.where(feasible, tl.where(add, j, -1), drop)
    p = tl.where(live, p, -1)
    swept = sweep_pivot(swept, p, tl.where(feasible, 1.0, -1.0), ii, jj, r)
    in_set = tl.where(r == p, 1.0 - in_set, in_set)
    return swept, in_set, x, done | (live & feasible & ~add)


def check_max_iter(max_iter, k: int, where: str) -> int:
    """The iteration cap: 4K + 8 by default (the min-norm kernel's stress set needed at most
    33 at K = 16), else ``max_iter`` (ValueError unless an int >= 0)."""
    if max_iter is None:
        return 4 * k + 8
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"{where}: max_iter must be an int >= 0, got {max_iter!r}")
    return max_iter


def fp32_pair(x: float) -> tuple[float, float]:
    """``(hi, lo)``, both fp32 values, with ``hi + lo`` = x to ~2^-48 relative: Triton passes
    Python floats to a kernel as fp32, which rounds, for one, UPGrad's default reg (1e-4 + 1e-10) by
    7e-9 relative: measured on a 3 x 3 case, that moved v by up to 7e-9 from the torch solver's
    (1e-19 with the pair)."""
    x = float(x)
    hi = _to_fp32(x)
    return hi, _to_fp32(x - hi)


def _to_fp32(x: float) -> float:
    """x rounded to the nearest fp32 value (round to nearest even; beyond fp32's range +-inf), in
    host arithmetic: no torch op, where rounding through a torch scalar tensor cost three aten
    ops per launch argument (tensor, cast, item) on every kernel call."""
    try:
        return _FP32.unpack(_FP32.pack(x))[0]
    except OverflowError:  # |x| above fp32's largest finite value (as torch: inf)
        return math.copysign(math.inf, x)


def launch_meta(k: int, refine: int) -> dict:
    """The compile-time arguments of the active-set kernels for K: K, KP (next power of two
    >= 2), REFINE, and the warps (1 up to K = 16: the [KP, KP] tile and its reductions stay in
    one warp; 4 above, so that the tiles do not spill)."""
    return {"K": k, "KP": max(2, 1 << max(0, k - 1).bit_length()), "REFINE": refine,
            "num_warps": 1 if k <= 16 else 4}
