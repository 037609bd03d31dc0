"""The whole K x K stage of Aligned-MTL, IMTL-G and ConFIG in one launch.

Why. These three methods weight the gradients through an eigendecomposition: of the Gram
matrix G (Aligned-MTL) or of the unit Gram matrix ``C = D^-1 G D^-1``, ``D = diag(||g_k||)``
(IMTL-G, ConFIG). :func:`.eigh.jacobi_eigh` made the decomposition one launch on CUDA, but the
methods still ran 15-30 torch ops around it (the rank cut, the scale, the products with the
eigenvectors, the normalisations): one kernel launch each, on an H200 the better part of the
stage's time at K <= 8 (`benchmarks/RESULTS.md`: imtl_g 448 us eager against 99 us replayed
from a CUDA graph at K = 4). Here one program loads G, runs the same Jacobi sweeps
(:func:`.eigh.jacobi_sweeps`) in registers and forms the weights from D and V directly: no
sort (a sum over eigenpairs needs none), nothing read back to the host.

With ``(lambda, V)`` the eigenpairs (unsorted) and ``keep = lambda > K eps(float32)
max(lambda)`` (:func:`gradbal.solvers_qp.rank_mask`):

* Aligned-MTL (:class:`gradbal.methods.AlignedMTL`): ``w = V diag(coef) V^T p`` with
  ``coef = sqrt(s / lambda)`` on the kept eigenvalues, 0 on the others, and 1 on all when
  ``max(lambda) <= 0`` (``B = I``); ``s`` the smallest kept eigenvalue (``"min"``), the
  lower median of the ascending list at index ``K - 1 - rank // 2`` (``"median"``, found by
  counting, not sorting), or the mean of the kept ones (``"rmse"``).
* The unit Gram pseudo-inverse (:func:`gradbal.solvers_qp.unit_gram_pinv`):
  ``a = D^-1 V diag(keep / lambda) V^T rhs``, ``inv_k = 1 / sqrt(G_kk)`` (0 where that is not
  finite: a zero gradient), C's entries ``G_ij (inv_i inv_j)``; ``ok`` when
  ``sum_kept (V^T rhs)^2 > 1e-18 sum_cut (V^T rhs)^2``.

  - IMTL-G (:class:`gradbal.methods.IMTLG`), ``rhs = 1``: ``w = a / sum(a)`` where ok and
    ``|sum(a)| > 1e-9 ||a||_1``, else 0.
  - ConFIG (:class:`gradbal.methods.ConFIG`), ``rhs = p``: ``w = a sum(G a) / (a^T G a)``
    where ok and ``a^T G a > 0``, else 0 (G as given: not symmetrised, as the torch ops).

Traffic and time: K^2 entries in, K out; the time is the sweeps' (:mod:`.eigh`: K = 16, ten
cyclic sweeps of 120 rotations). (Not yet run on a GPU.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import KXK_DTYPES, KXK_MAX_K, check_kxk
from .eigh import _k_pad, _num_warps, check_order, check_sweeps, jacobi_sweeps, sym_scaled

__all__ = ["MAX_K", "SCALE_MODES", "aligned_mtl_weights", "config_weights", "imtl_g_weights"]

#: Largest K the one-program kernel takes.
MAX_K = KXK_MAX_K
#: Gram dtypes the kernel reads (it computes in float64).
SUPPORTED_DTYPES = KXK_DTYPES
#: Aligned-MTL's scale modes, in the kernel's numbering.
SCALE_MODES = ("min", "median", "rmse")

# What the kernel computes (MODE).
_ALIGNED = tl.constexpr(0)
_IMTL = tl.constexpr(1)
_CONFIG = tl.constexpr(2)

_INF = tl.constexpr(float("inf"))
_DBL_MAX = tl.constexpr(1.7976931348623157e308)
# rank_mask's rtol per unit of K: eps(float32).
_EPS32 = tl.constexpr(1.1920928955078125e-07)

# Hook for every buffer this module allocates; tests swap it for a poisoning allocator.
_alloc = torch.empty


@triton.jit
def _spectral_kernel(
    g_ptr,
    stride_r,
    stride_c,
    p_ptr,
    w_ptr,
    sweeps,
    K: tl.constexpr,
    KP: tl.constexpr,
    N: tl.constexpr,
    PARALLEL: tl.constexpr,
    MODE: tl.constexpr,
    SCALE: tl.constexpr,
):
    """One program: the weights [K] (float64) of MODE from the [K, K] matrix at g_ptr and, for
    Aligned-MTL and ConFIG, the preference vector at p_ptr (float64 [K])."""
    r = tl.arange(0, KP)
    ii = r[:, None]  # row index of the tile
    jj = r[None, :]  # column index
    live = r < K
    valid = (ii < K) & (jj < K)
    g = tl.load(g_ptr + ii * stride_r + jj * stride_c, mask=valid, other=0.0).to(tl.float64)
    gt = tl.load(g_ptr + jj * stride_r + ii * stride_c, mask=valid, other=0.0).to(tl.float64)
    if MODE == _ALIGNED:
        a, scale = sym_scaled(g, gt)
    else:
        # 1 / ||g_k|| from G's diagonal (the same in G and G^T); a zero, negative or non-finite
        # diagonal entry gives 0 (a zero gradient: a zero row and column of C).
        diag = tl.sum(tl.where(ii == jj, g, 0.0), axis=1)
        inv = 1.0 / tl.sqrt(diag)
        inv = tl.where(tl.abs(inv) <= _DBL_MAX, inv, 0.0)  # False for inf and NaN
        inv_j = tl.sum(tl.where(ii == jj, inv[:, None], 0.0), axis=0)  # the same, by column
        outer = inv[:, None] * inv_j[None, :]  # symmetric: C^T's entries are C's transposed
        a, scale = sym_scaled(g * outer, gt * outer)
    a, v = jacobi_sweeps(a, sweeps, r, K, KP, N, PARALLEL)
    lam = scale * tl.sum(tl.where(ii == jj, a, 0.0), axis=0)  # eigenvalue of V's column m
    top = tl.max(tl.where(live, lam, -_INF), axis=0)  # max(lambda)
    keep = live & (lam > top * (K * _EPS32))
    if MODE == _IMTL:
        rhs = tl.where(live, 1.0, 0.0).to(tl.float64)
    else:
        rhs = tl.load(p_ptr + r, mask=live, other=0.0).to(tl.float64)
    coords = tl.sum(v * rhs[:, None], axis=0)  # V^T rhs, by column
    if MODE == _ALIGNED:
        if SCALE == 0:  # "min": the smallest kept eigenvalue
            s = tl.min(tl.where(keep, lam, _INF), axis=0)
        elif SCALE == 1:  # "median": ascending index K - 1 - rank // 2
            lam_i = scale * tl.sum(tl.where(ii == jj, a, 0.0), axis=1)  # the same, by row
            # position of eigenvalue m in the ascending list (ties broken by index)
            before = ((lam_i[:, None] < lam[None, :]) | ((lam_i[:, None] == lam[None, :]) & (ii < jj)))
            pos = tl.sum((before & (ii < K)).to(tl.int32), axis=0)
            rank = tl.sum(keep.to(tl.int32), axis=0)
            s = tl.sum(tl.where(live & (pos == (K - 1) - rank // 2), lam, 0.0), axis=0)
        else:  # "rmse": the mean of the kept eigenvalues (nothing kept: unused)
            s = tl.sum(tl.where(keep, lam, 0.0), axis=0) / tl.sum(keep.to(tl.float64), axis=0)
        # nothing kept (max(lambda) <= 0: a zero matrix): B = I
        none_kept = live & ((tl.zeros([KP], tl.float64) + top) <= 0)
        coef = tl.where(keep, tl.sqrt(s / lam), tl.where(none_kept, 1.0, 0.0))
        w = tl.sum(v * (coef * coords)[None, :], axis=1)
    else:
        sq = coords * coords
        ok = tl.sum(sq * tl.where(keep, 1.0, tl.where(live, -1e-18, 0.0)), axis=0) > 0
        y = tl.where(keep, coords / lam, 0.0)
        coef = inv * tl.sum(v * y[None, :], axis=1)  # a = D^-1 C^+ rhs, by row
        if MODE == _IMTL:
            total = tl.sum(coef, axis=0)
            ok = ok & (tl.abs(total) > 1e-9 * tl.sum(tl.abs(coef), axis=0))
            w = tl.where(ok, coef / total, 0.0)
        else:
            coef_j = tl.sum(tl.where(ii == jj, coef[:, None], 0.0), axis=0)  # a, by column
            ga = tl.sum(g * coef_j[None, :], axis=1)  # G a with G as given (row i of G)
            sq_a = tl.sum(coef * ga, axis=0)
            w = tl.where(ok & (sq_a > 0), coef * (tl.sum(ga, axis=0) / sq_a), 0.0)
    tl.store(w_ptr + r, w, mask=live)


INTERPRETED = "Interpreted" in type(_spectral_kernel).__name__


def _launch(gram: Tensor, pref: Tensor | None, mode: int, scale: int, sweeps, order: str,
            where: str, instead: str) -> Tensor:  # fmt: skip
    check_order(order, where)
    k = check_kxk(gram, where, instead, INTERPRETED, batched=False)
    sweeps = check_sweeps(sweeps, k, order, where)
    if pref is not None:
        if not isinstance(pref, Tensor) or pref.shape != (k,) or pref.dtype != torch.float64:
            raise ValueError(f"{where}: pref must be a float64 [{k}] tensor, got "
                             f"{getattr(pref, 'dtype', type(pref))} {getattr(pref, 'shape', '')}")  # fmt: skip
        if pref.device != gram.device:
            raise ValueError(f"{where}: pref is on {pref.device}, the Gram matrix on {gram.device}")
        pref = pref.contiguous()
    parallel = order == "parallel"
    kp = _k_pad(k, parallel)
    w = _alloc((k,), dtype=torch.float64, device=gram.device)
    _spectral_kernel[(1,)](
        gram,
        gram.stride(0),
        gram.stride(1),
        w if pref is None else pref,  # (IMTL-G reads no pref: any float64 pointer will do)
        w,
        sweeps,
        K=k,
        KP=kp,
        N=k + k % 2,
        PARALLEL=parallel,
        MODE=mode,
        SCALE=scale,
        num_warps=_num_warps(kp),
    )
    return w


def aligned_mtl_weights(
    gram: Tensor, pref: Tensor, scale_mode: str = "min", sweeps: int | None = None,
    order: str = "cyclic",
) -> Tensor:  # fmt: skip
    """Aligned-MTL's weights ``w = B p`` (module docstring) for a [K, K] ``gram`` (float64 or
    float32, any strides; non-finite entries read as 0) and a float64 [K] ``pref``, as [K]
    float64, in one launch. ``sweeps`` / ``order``: the Jacobi sweeps, as in
    :func:`.eigh.jacobi_eigh`."""
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"aligned_mtl_weights: scale_mode must be one of {SCALE_MODES}, "
                         f"got {scale_mode!r}")  # fmt: skip
    return _launch(gram, pref, 0, SCALE_MODES.index(scale_mode), sweeps, order,
                   "aligned_mtl_weights", "gradbal.methods.AlignedMTL")  # fmt: skip


def imtl_g_weights(gram: Tensor, sweeps: int | None = None, order: str = "cyclic") -> Tensor:
    """IMTL-G's weights (module docstring) for a [K, K] ``gram`` (float64 or float32, any
    strides), as [K] float64, in one launch."""
    return _launch(gram, None, 1, 0, sweeps, order, "imtl_g_weights", "gradbal.methods.IMTLG")


def config_weights(
    gram: Tensor, pref: Tensor, sweeps: int | None = None, order: str = "cyclic"
) -> Tensor:
    """ConFIG's weights (module docstring) for a [K, K] ``gram`` (float64 or float32, any
    strides) and a float64 [K] ``pref``, as [K] float64, in one launch."""
    return _launch(gram, pref, 2, 0, sweeps, order, "config_weights", "gradbal.methods.ConFIG")
