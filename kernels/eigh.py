"""Symmetric eigendecomposition of a batch of small matrices in one launch (cyclic Jacobi).

Why. The K x K stage of Aligned-MTL, IMTL-G and ConFIG needs ``A = V diag(lambda) V^T``.
``torch.linalg.eigh`` synchronises a CUDA device with the host, which a balanced step must
not do, and the torch-op Jacobi method of :func:`gradbal.solvers_qp.jacobi_eigh` costs one
kernel launch per op (384 launches at K = 4, 5120 at K = 16: milliseconds per step for
microseconds of arithmetic). Here the whole decomposition of one matrix is one Triton program
that keeps the [KP, KP] matrix and its eigenvectors in registers: one launch per batch.

Algorithm (one program per matrix of ``a[B, K, K]``, K <= :data:`MAX_K`, padded to
KP = next power of two >= 2; padding rows/columns are 0 and no rotation touches them):

1. Read A and A^T, replace inf/NaN by 0, ``A <- (A + A^T) / 2`` (as
   :func:`gradbal.solvers_qp._sym`; exactly symmetric), and divide by
   ``s = max |a_ij|`` (1 for a zero matrix) so every entry is in [-1, 1]: no rotation can
   overflow and the eigenvalues are multiplied back by s at the end.
2. ``sweeps`` cyclic sweeps (default :func:`default_sweeps`), each over
   the pairs p < q in row order (runtime loops, so the compiled code does not grow with K).
   Rotation (p, q), with ``tau = (a_qq - a_pp) / (2 a_pq)``::

       t = sign(tau) / (|tau| + sqrt(1 + tau^2))     (the smaller root: |angle| <= pi/4)
       c = 1 / sqrt(1 + t^2),  s = t c

   t = 0 (no rotation, a_pq set to 0) where |a_pq| <= 2^-60 (a perturbation far below
   rounding; rotating by the angle of such noise stalls convergence on multiple eigenvalues,
   see ``_SKIP``) and where tau is inf/NaN.
   ``A <- J^T A J`` and ``V <- V J`` with J the identity but for ``J_pp = J_qq = c``,
   ``J_pq = s``, ``J_qp = -s``: rows/columns p and q of A become
   ``c a_p. - s a_q.`` and ``s a_p. + c a_q.``, the 2 x 2 block becomes
   ``diag(a_pp - t a_pq, a_qq + t a_pq)`` (Rutishauser's form, more accurate than rotating it)
   with ``a_pq = a_qp = 0`` exactly. Each rotated row vector is written as row and as column
   (the same values), so A stays symmetric bit for bit. Cyclic Jacobi converges quadratically once the off-diagonal
   mass is small; after each sweep entries below 1e-200 are flushed to 0 (denormal
   arithmetic is slow on GPUs and meaningless at this scale), as in the torch version.
3. Eigenvalues ``lambda_m = s a_mm``. Sorted in the kernel: ``rank_m = #{n : lambda_n <
   lambda_m, or lambda_n = lambda_m and n < m}`` (a permutation of 0..K-1), and eigenvalue m
   and column m of V are stored at position rank_m: every output entry is written once.

Numerics: with every rotation orthogonal to rounding, the eigenvalues are backward stable
(errors ~ K eps max|lambda| after convergence); the test suite checks agreement with LAPACK to
1e-12 of max|lambda|, ``||V^T V - I|| <= 1e-12`` and ``||A V - V diag(lambda)|| <= 1e-11 ||A||``.

Cost on a GPU: ``sweeps K (K - 1) / 2`` rotations (K = 4: 36, K = 8: 252, K = 16: 1320),
each six masked reductions inside one program (rows p, q of A; a_pq and a_qq - a_pp; columns
p, q of V) and a few where-selects on the tile; 1 warp up to KP = 16, so the reductions are
warp shuffles. Latency-bound, but with no launch per op and no host synchronisation.
Measured on an H200 (2026-11-26, benchmarks/RESULTS.md): Aligned-MTL's whole K = 16 stage,
this kernel and a few ops, replays from a CUDA graph in 1.56 ms (eager 1.61 ms), where the
torch Jacobi's 5120 launches took 60-147x the Gram and combine passes (H100); the next step
is the parallel (round-robin) ordering, K / 2 disjoint rotations at once. (Warp counts untuned.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import KXK_DTYPES, KXK_MAX_K, check_kxk, next_pow2

__all__ = ["MAX_K", "default_sweeps", "eigh_reference", "jacobi_eigh"]

#: Largest K the one-program kernel takes (the [KP, KP] tile and V live in registers).
MAX_K = KXK_MAX_K

#: Input dtypes the kernel reads (it computes in float64).
SUPPORTED_DTYPES = KXK_DTYPES

# Entries below this (after the scaling to max |a| = 1) are flushed to 0 after each sweep.
_FLUSH = tl.constexpr(1e-200)
# Couplings |a_pq| at or below this (after the scaling to max |a| = 1) are dropped without a
# rotation: setting them to 0 perturbs A by < 1e-18 ||A||, far below the eps ||A|| backward
# error, while rotating by the angle such noise gives (45 degrees when a_pp = a_qq) mixes the
# converged eigenvectors of a (near-)multiple eigenvalue and spreads their couplings again:
# measured on matrices with pairs of equal eigenvalues (K = 12, 16), convergence then drops
# from quadratic to linear (off-diagonal ~1e-11 after 10 sweeps, halving per sweep; with the
# threshold 0 after 9). Cf. the threshold in LAPACK's one-sided Jacobi (dgesvj).
_SKIP = tl.constexpr(2.0**-60)
# Largest finite float64: |x| <= DBL_MAX is False exactly for +-inf and NaN.
_DBL_MAX = tl.constexpr(1.7976931348623157e308)

# Hook for every buffer this module allocates; tests swap it for a poisoning allocator to show
# that every output entry is written.
_alloc = torch.empty


def default_sweeps(k: int) -> int:
    """Cyclic sweeps the kernel runs by default for a K x K matrix.

    Measured with this algorithm (row-cyclic order, the ``_SKIP`` threshold) on 1200 (K <= 8),
    600 (K <= 16) or 180 (K > 16) matrices per K: random symmetric, rank K/2 (X X^T), graded
    (eigenvalues +-1e-8..1e8), pairs of equal eigenvalues, equal and zero rows, one row and
    column scaled by 1e4. Sweeps until the largest off-diagonal entry of every matrix was below
    1e-16 of max |a|: K = 2: 1 (one exact rotation), 3: 4, 4: 5, 5: 7, 6-8: 8, 10-14: 9,
    16: 10, 20-24: 11, 28: 12, 32: 13. The counts here add one sweep of margin. (The parallel
    ordering of :func:`gradbal.solvers_qp._default_sweeps` gives 4 at K = 4, which leaves some
    of these matrices at 4e-6 in this ordering.)
    """
    if k <= 2:
        return 1
    if k <= 4:
        return k + 2
    return 9 if k <= 8 else 11 if k <= 16 else 14


# --------------------------------------------------------------------------------------------
# torch reference (the same rotations in the same order, float64 torch ops), used by the tests
# --------------------------------------------------------------------------------------------


def eigh_reference(a: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """The kernel's algorithm in torch ops on one symmetric-ised float64 [K, K] matrix (slow:
    a Python loop over rotations). Returns (eigenvalues ascending [K], V [K, K])."""
    k = a.shape[-1]
    x = a.to(torch.float64)
    x = torch.where(x.abs() <= torch.finfo(torch.float64).max, x, 0.0)
    x = 0.5 * x + 0.5 * x.mT
    scale = x.abs().amax()
    scale = torch.where(scale > 0, scale, 1.0)
    x = x / scale
    v = torch.eye(k, dtype=torch.float64, device=a.device)
    for _ in range(default_sweeps(k) if sweeps is None else sweeps):
        for p in range(k - 1):
            for q in range(p + 1, k):
                app, aqq, apq = x[p, p], x[q, q], x[p, q]
                tau = (aqq - app) / (2 * apq)
                t = torch.where(tau >= 0, 1.0, -1.0) / (tau.abs() + torch.sqrt(1 + tau * tau))
                t = torch.where((apq.abs() > 2.0**-60) & torch.isfinite(tau), t, 0.0)
                c = 1 / torch.sqrt(1 + t * t)
                s = t * c
                rp = c * x[p] - s * x[q]
                rq = s * x[p] + c * x[q]
                rp[p], rp[q] = app - t * apq, 0.0
                rq[p], rq[q] = 0.0, aqq + t * apq
                x[p], x[q] = rp, rq
                x[:, p], x[:, q] = rp, rq
                vp, vq = v[:, p].clone(), v[:, q].clone()
                v[:, p], v[:, q] = c * vp - s * vq, s * vp + c * vq
        x = torch.where(x.abs() < 1e-200, 0.0, x)
    d = x.diagonal()
    order = sorted(range(k), key=lambda m: (float(d[m]), m))
    order_t = torch.tensor(order, device=a.device)
    return d[order_t] * scale, v[:, order_t]


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _eigh_kernel(
    a_ptr,
    stride_b,
    stride_r,
    stride_c,
    w_ptr,
    v_ptr,
    sweeps,
    K: tl.constexpr,
    KP: tl.constexpr,
):
    """Program b: eigenvalues (ascending) of a[b] -> w[b, :K], eigenvectors (columns) ->
    v[b, :K, :K] (both contiguous)."""
    pid = tl.program_id(0)
    r = tl.arange(0, KP)
    ii = r[:, None]  # row index of the tile
    jj = r[None, :]  # column index
    valid = (ii < K) & (jj < K)
    src = a_ptr + pid.to(tl.int64) * stride_b
    # A and A^T from the same buffer (any strides): the symmetrised matrix is exact symmetric.
    x = tl.load(src + ii * stride_r + jj * stride_c, mask=valid, other=0.0).to(tl.float64)
    xt = tl.load(src + jj * stride_r + ii * stride_c, mask=valid, other=0.0).to(tl.float64)
    x = tl.where(tl.abs(x) <= _DBL_MAX, x, 0.0)
    xt = tl.where(tl.abs(xt) <= _DBL_MAX, xt, 0.0)
    a = 0.5 * x + 0.5 * xt  # halves first: no overflow near DBL_MAX
    scale = tl.max(tl.max(tl.abs(a), axis=1), axis=0)
    scale = tl.where(scale > 0, scale, 1.0)
    a = a / scale
    v = tl.where(ii == jj, 1.0, 0.0).to(tl.float64)
    for _sweep in range(sweeps):
        for p in range(K - 1):
            for q in range(p + 1, K):
                row_p = ii == p
                row_q = ii == q
                col_p = jj == p
                col_q = jj == q
                at_p = r == p
                at_q = r == q
                # Rows p and q of A (indexed by column j); a_pq and a_qq - a_pp (two masked sums:
                # the zeros add exactly).
                rp = tl.sum(tl.where(row_p, a, 0.0), axis=0)
                rq = tl.sum(tl.where(row_q, a, 0.0), axis=0)
                apq = tl.sum(tl.where(at_q, rp, 0.0), axis=0)
                diff = tl.sum(tl.where(at_q, rq, tl.where(at_p, -rp, 0.0)), axis=0)
                tau = diff / (2.0 * apq)
                t = tl.where(tau >= 0, 1.0, -1.0) / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau))
                # A negligible a_pq (below _SKIP, including 0: tau = 0/0 or +-inf) is set to 0
                # with no rotation; so is one whose tau^2 overflows (not reachable after the
                # threshold, kept for safety).
                t = tl.where((tl.abs(apq) > _SKIP) & (tl.abs(tau) <= _DBL_MAX), t, 0.0)
                c = 1.0 / tl.sqrt(1.0 + t * t)
                s = t * c
                # Rotated rows, the 2 x 2 block set to its exact form
                # diag(a_pp - t a_pq, a_qq + t a_pq) (lane p of rp is a_pp, lane q of rq a_qq).
                tapq = t * apq
                new_p = tl.where(at_p, rp - tapq, tl.where(at_q, 0.0, c * rp - s * rq))
                new_q = tl.where(at_q, rq + tapq, tl.where(at_p, 0.0, s * rp + c * rq))
                # Written as rows p, q and (A is symmetric) as columns p, q: the same values in
                # both places, so A stays exactly symmetric.
                a = tl.where(
                    row_p,
                    new_p[None, :],
                    tl.where(
                        row_q,
                        new_q[None, :],
                        tl.where(col_p, new_p[:, None], tl.where(col_q, new_q[:, None], a)),
                    ),
                )
                # V <- V J: columns p and q.
                vp = tl.sum(tl.where(col_p, v, 0.0), axis=1)
                vq = tl.sum(tl.where(col_q, v, 0.0), axis=1)
                v = tl.where(
                    col_p,
                    (c * vp - s * vq)[:, None],
                    tl.where(col_q, (s * vp + c * vq)[:, None], v),
                )
        a = tl.where(tl.abs(a) < _FLUSH, 0.0, a)
    d = tl.sum(tl.where(ii == jj, a, 0.0), axis=1)  # diagonal, indexed by row
    dj = tl.sum(tl.where(ii == jj, a, 0.0), axis=0)  # the same, indexed by column
    # rank[m] = #{n < K : d_n < d_m or (d_n == d_m and n < m)}: a permutation of 0..K-1 for
    # any finite d (it is: the input is made finite and scaled to [-1, 1]).
    before = ((dj < d[:, None]) | ((dj == d[:, None]) & (jj < ii))) & (jj < K)
    rank = tl.sum(before.to(tl.int32), axis=1)  # of eigenvalue m = row index
    after = ((d[:, None] < dj) | ((d[:, None] == dj) & (ii < jj))) & (ii < K)
    rank_j = tl.sum(after.to(tl.int32), axis=0)  # the same ranks, indexed by column
    base = pid.to(tl.int64) * K
    tl.store(w_ptr + base + rank, d * scale, mask=r < K)
    # Column m of V goes to column rank_m of the output.
    tl.store(v_ptr + base * K + ii * K + rank_j[None, :], v, mask=valid)


INTERPRETED = "Interpreted" in type(_eigh_kernel).__name__


# --------------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------------


def _num_warps(kp: int) -> int:
    # One warp holds a 16 x 16 tile and V in 16 registers each (float64: 2 x 32-bit) per
    # thread, and its reductions are shuffles with no barrier; at 32 x 32, 4 warps keep the
    # tiles and their temporaries out of local memory. (Untuned: to be measured on a GPU.)
    return 1 if kp <= 16 else 4


def jacobi_eigh(a: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending, [..., K]) and eigenvectors (columns, [..., K, K]) of the
    symmetric part of ``a[..., K, K]`` (float64 or float32; non-finite entries read as 0),
    both float64, in one Triton launch. No value is read back to the host.

    ``sweeps``: cyclic Jacobi sweeps (default :func:`default_sweeps`).
    """
    k = check_kxk(a, "jacobi_eigh", "gradbal.solvers_qp.sym_eig", INTERPRETED)
    if sweeps is None:
        sweeps = default_sweeps(k)
    elif isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"jacobi_eigh: sweeps must be an int >= 0, got {sweeps!r}")
    batch = a.shape[:-2]
    flat = a.reshape(-1, k, k)  # a view when the batch dims allow; any last-two strides work
    b = flat.shape[0]
    evals = _alloc((b, k), dtype=torch.float64, device=a.device)
    evecs = _alloc((b, k, k), dtype=torch.float64, device=a.device)
    if b:
        _eigh_kernel[(b,)](
            flat,
            flat.stride(0),
            flat.stride(1),
            flat.stride(2),
            evals,
            evecs,
            sweeps,
            K=k,
            KP=max(2, next_pow2(k)),
            num_warps=_num_warps(max(2, next_pow2(k))),
        )
    return evals.reshape(*batch, k), evecs.reshape(*batch, k, k)
