"""Symmetric eigendecomposition of a batch of small matrices in one launch (Jacobi).

Why. The K x K stage of Aligned-MTL, IMTL-G and ConFIG needs ``A = V diag(lambda) V^T``.
``torch.linalg.eigh`` synchronises a CUDA device with the host, which a balanced step must
not do, and the torch-op Jacobi method of :func:`gradbal.solvers_qp.jacobi_eigh` costs one
kernel launch per op (384 launches at K = 4, 5120 at K = 16: milliseconds per step for
microseconds of arithmetic). Here the whole decomposition of one matrix is one Triton program
that keeps the [KP, KP] matrix and its eigenvectors in registers: one launch per batch. Its
sweeps (:func:`jacobi_sweeps`) also run inside :mod:`.spectral`, where those three methods' whole
stage is one launch; :func:`gradbal.solvers_qp.sym_eig` calls this kernel for everything else.

Algorithm (one program per matrix of ``a[B, K, K]``, K <= :data:`MAX_K`, padded to
KP = next power of two >= 2, >= 4 in the parallel order; padding rows/columns are 0 and no
rotation touches them):

1. Read A and A^T, replace inf/NaN by 0, ``A <- (A + A^T) / 2`` (as
   :func:`gradbal.solvers_qp._sym`; exactly symmetric), and divide by
   ``s = max |a_ij|`` (1 for a zero matrix) so every entry is in [-1, 1]: no rotation can
   overflow and the eigenvalues are multiplied back by s at the end.
2. ``sweeps`` sweeps (default :func:`default_sweeps`) of Jacobi rotations; for a pair (p, q),
   with ``tau = (a_qq - a_pp) / (2 a_pq)``::

       t = sign(tau) / (|tau| + sqrt(1 + tau^2))     (the smaller root: |angle| <= pi/4)
       c = 1 / sqrt(1 + t^2),  s = t c

   t = 0 (no rotation) where |a_pq| <= 2^-60 (a perturbation far below rounding; rotating by
   the angle of such noise stalls convergence on multiple eigenvalues, see ``_SKIP``) and
   where tau is inf/NaN; ``A <- J^T A J``, ``V <- V J`` with J the identity but for
   ``J_pp = J_qq = c``, ``J_pq = s``, ``J_qp = -s``. Two orders (``order=``):

   * ``"cyclic"`` (default): the pairs p < q in row order, one rotation at a time (runtime
     loops); rows/columns p and q of A become ``c a_p. - s a_q.`` and ``s a_p. + c a_q.``, the
     2 x 2 block ``diag(a_pp - t a_pq, a_qq + t a_pq)`` (Rutishauser's form) with
     ``a_pq = a_qp = 0`` exactly; each rotated row is written as row and as column, so A
     stays symmetric bit for bit. Six masked reductions a rotation.
   * ``"parallel"``: the order of the torch version (:func:`gradbal.solvers_qp.jacobi_eigh`):
     each sweep is N - 1 rounds of the circle method (N = K rounded up to even;
     ``_round_robin``), a round rotates K / 2 disjoint pairs at once, each column (then row)
     mixed with its partner's, read with ``tl.gather`` (a register permutation), and A is made
     exactly symmetric again, ``(A + A^T) / 2``. Two reductions and four gathers a round.

   After each sweep entries below 1e-200 are flushed to 0 (denormal arithmetic is slow on
   GPUs and meaningless at this scale), and the loop ends once every off-diagonal entry is at
   or below ``_SKIP``: each later rotation would be the identity, so this changes no output
   bit, only the time (K = 16: 7 of the 11 default sweeps on a random Gram matrix, 4 on one
   with row norms over 8 decades; ``python benchmarks/bench_eigh.py``, its sweeps table).
3. Eigenvalues ``lambda_m = s a_mm``. Sorted in the kernel: ``rank_m = #{n : lambda_n <
   lambda_m, or lambda_n = lambda_m and n < m}`` (a permutation of 0..K-1), and eigenvalue m
   and column m of V are stored at position rank_m: every output entry is written once.

Numerics: with every rotation orthogonal to rounding, the eigenvalues are backward stable
(errors ~ K eps max|lambda| after convergence); the test suite checks agreement with LAPACK to
1e-12 of max|lambda|, ``||V^T V - I|| <= 1e-12`` and ``||A V - V diag(lambda)|| <= 1e-11 ||A||``.

Cost on a GPU: cyclic, up to ``sweeps K (K - 1) / 2`` rotations (K = 16: 1320 at most, six
reductions each); parallel, up to ``sweeps (N - 1)`` rounds (K = 16: 165, two reductions and
four gathers each); 1 warp up to KP = 16. Measured on an H200 (2026-11-26, benchmarks/RESULTS.md,
all 11 sweeps: the exit at convergence came later), cyclic: Aligned-MTL's whole K = 16 stage
replays from a CUDA graph in 1.56 ms (the torch Jacobi's 5120 launches had taken 60-147x the
Gram and combine passes on an H100). The parallel order
does about an eighth of the reductions at K = 16; it is not yet run on a GPU, so it is not
the default (Triton's compiler for sm_90 hung on its gathers for a [2, 2] tile: it pads to
KP >= 4). (Warp counts untuned.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import KXK_DTYPES, KXK_MAX_K, check_kxk, next_pow2

__all__ = ["MAX_K", "default_sweeps", "eigh_reference", "jacobi_eigh", "reference_sweeps"]

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


#: Rotation orders of :func:`jacobi_eigh`.
ORDERS = ("cyclic", "parallel")


def default_sweeps(k: int, order: str = "cyclic") -> int:
    """Sweeps the kernel runs by default for a K x K matrix in ``order``.

    Measured (the ``_SKIP`` threshold; sweeps until the largest off-diagonal entry of every
    matrix was below 1e-16 of max |a|), with one sweep of margin kept (K = 2 is one exact
    rotation):

    * ``"cyclic"`` (row order), on 1200 (K <= 8), 600 (K <= 16) or 180 (K > 16) matrices per
      K: random symmetric, rank K/2 (X X^T), graded (eigenvalues +-1e-8..1e8), pairs of equal
      eigenvalues, equal and zero rows, one row and column scaled by 1e4: K = 2: 1, 3: 4, 4: 5,
      5: 7, 6-8: 8, 10-14: 9, 16: 10, 20-24: 11, 28: 12, 32: 13.
    * ``"parallel"`` (round robin), on the test suite's kinds (random, rank K/2, graded, zero,
      a zero row, equal rows, diagonal, pairs of equal eigenvalues; 6 seeds for K <= 8, 3
      above): K = 3, 4: 4; 5: 5; 8: 7; 9: 8; 12: 9; 16, 17: 10; 24: 12; 32: 14.
    """
    if k <= 2:
        return 1
    if k <= 4:
        return k + 2
    return 9 if k <= 8 else 11 if k <= 16 else (15 if order == "parallel" else 14)


# --------------------------------------------------------------------------------------------
# torch reference (the same rotations in the same order, float64 torch ops), used by the tests
# --------------------------------------------------------------------------------------------


def _round_robin_reference(k: int, t: int) -> tuple[Tensor, Tensor]:
    """``_round_robin`` of the kernel for lanes 0..k-1 (torch, on the CPU)."""
    n = k + k % 2
    x = torch.arange(k)
    pos = torch.where(x == 0, 0, 1 + (x - 1 + t) % (n - 1))
    ppos = n - 1 - pos
    partner = torch.where(ppos == 0, 0, 1 + (ppos - 1 - t) % (n - 1))
    paired = partner < k
    partner = torch.where(paired, partner, x)
    sign = torch.where(paired, torch.where(x < partner, 1.0, -1.0), 0.0).double()
    return partner, sign


def _off_diagonal_max(x: Tensor) -> float:
    return float((x - torch.diag_embed(x.diagonal())).abs().max())


def _parallel_reference(a: Tensor, sweeps: int, converge: bool) -> tuple[Tensor, Tensor, int]:
    """The parallel order of the kernel in torch ops (the same rounds in the same order);
    also the number of sweeps run."""
    k = a.shape[-1]
    x = a.to(torch.float64).cpu()
    x = torch.where(x.abs() <= torch.finfo(torch.float64).max, x, 0.0)
    x = 0.5 * x + 0.5 * x.mT
    scale = x.abs().amax()
    scale = torch.where(scale > 0, scale, 1.0)
    x = x / scale
    v = torch.eye(k, dtype=torch.float64)
    for ran in range(sweeps + 1):  # ran: the sweeps run, after the loop
        # as the kernel: leave once converged, checked before each sweep and after the last
        if ran == sweeps or (converge and _off_diagonal_max(x) <= 2.0**-60):
            break
        for t in range(k + k % 2 - 1):
            partner, sign = _round_robin_reference(k, t)
            d = x.diagonal()
            ap = x[:, partner]
            apq = ap.diagonal()
            tau = (sign * (d[partner] - d) / (2 * apq)) + 0.0
            ti = torch.where(tau >= 0, 1.0, -1.0) / (tau.abs() + torch.sqrt(1 + tau * tau))
            ok = (sign != 0) & (apq.abs() > 2.0**-60) & (tau.abs() <= torch.finfo(torch.float64).max)
            ti = torch.where(ok, ti, 0.0)
            c = 1 / torch.sqrt(1 + ti * ti)
            s_p = (sign * ti * c)[partner]
            ar = x * c[None, :] + ap * s_p[None, :]
            x = c[:, None] * ar + s_p[:, None] * ar[partner, :]
            x = 0.5 * x + 0.5 * x.mT
            v = v * c[None, :] + v[:, partner] * s_p[None, :]
        x = torch.where(x.abs() < 1e-200, 0.0, x)
    d = x.diagonal()
    order = sorted(range(k), key=lambda m: (float(d[m]), m))
    order_t = torch.tensor(order)
    return (d[order_t] * scale).to(a.device), v[:, order_t].to(a.device), ran


def _cyclic_reference(a: Tensor, sweeps: int, converge: bool) -> tuple[Tensor, Tensor, int]:
    """The cyclic order of the kernel in torch ops (the same rotations in the same order);
    also the number of sweeps run."""
    k = a.shape[-1]
    x = a.to(torch.float64)
    x = torch.where(x.abs() <= torch.finfo(torch.float64).max, x, 0.0)
    x = 0.5 * x + 0.5 * x.mT
    scale = x.abs().amax()
    scale = torch.where(scale > 0, scale, 1.0)
    x = x / scale
    v = torch.eye(k, dtype=torch.float64, device=a.device)
    for ran in range(sweeps + 1):  # ran: the sweeps run, after the loop
        # as the kernel: leave once converged, checked before each sweep and after the last
        if ran == sweeps or (converge and _off_diagonal_max(x) <= 2.0**-60):
            break
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
    return d[order_t] * scale, v[:, order_t], ran


def eigh_reference(
    a: Tensor, sweeps: int | None = None, order: str = "cyclic", converge: bool = True
) -> tuple[Tensor, Tensor]:
    """The kernel's algorithm in ``order`` in torch ops on one symmetric-ised float64 [K, K]
    matrix (slow: a Python loop). Returns (eigenvalues ascending [K], V [K, K]).
    ``converge=False`` runs every sweep, without the kernel's exit at convergence."""
    k = a.shape[-1]
    sweeps = default_sweeps(k, order) if sweeps is None else sweeps
    w, v, _ = (_parallel_reference if order == "parallel" else _cyclic_reference)(a, sweeps, converge)
    return w, v


def reference_sweeps(a: Tensor, sweeps: int | None = None, order: str = "cyclic") -> int:
    """How many of its ``sweeps`` (default :func:`default_sweeps`) the kernel runs on the
    [K, K] matrix ``a`` before every off-diagonal entry is at or below ``_SKIP`` (counted on
    :func:`eigh_reference`, which leaves its loop where the kernel does)."""
    k = a.shape[-1]
    sweeps = default_sweeps(k, order) if sweeps is None else sweeps
    return (_parallel_reference if order == "parallel" else _cyclic_reference)(a, sweeps, True)[2]


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _round_robin(r, t, K: tl.constexpr, N: tl.constexpr):
    """Round t of the circle method over N = K + (K odd) players: (partner, sign) per lane r,
    partner(i) = i and sign 0 for an unpaired lane (the bye when K is odd, padded lanes), else
    sign +1 for the smaller index of the pair and -1 for the larger. Player 0 stays at
    position 0; after t rounds player x >= 1 is at position 1 + (x - 1 + t) mod (N - 1)."""
    pos = tl.where(r == 0, 0, 1 + (r - 1 + t) % (N - 1))
    ppos = N - 1 - pos
    partner = tl.where(ppos == 0, 0, 1 + (ppos - 1 - t + (N - 1)) % (N - 1))
    paired = (r < K) & (partner < K)
    partner = tl.where(paired, partner, r)
    sign = tl.where(paired, tl.where(r < partner, 1.0, -1.0), 0.0)
    return partner, sign


@triton.jit
def sym_scaled(x, xt):
    """``((X + X^T) / 2) / s`` of the [KP, KP] tiles ``x`` and ``xt = x^T`` (any float type;
    0 outside the matrix) with inf/NaN read as 0, in float64, and ``s = max |entry|`` (1 for a
    zero matrix): every entry in [-1, 1]. Returns (A, s). Exactly symmetric: A and A^T are the
    same sums of the same two values."""
    x = x.to(tl.float64)
    xt = xt.to(tl.float64)
    x = tl.where(tl.abs(x) <= _DBL_MAX, x, 0.0)
    xt = tl.where(tl.abs(xt) <= _DBL_MAX, xt, 0.0)
    a = 0.5 * x + 0.5 * xt  # halves first: no overflow near DBL_MAX
    scale = tl.max(tl.max(tl.abs(a), axis=1), axis=0)
    scale = tl.where(scale > 0, scale, 1.0)
    return a / scale, scale


@triton.jit
def _converged(a, ii, jj):
    """Whether every off-diagonal entry of the tile is at or below _SKIP (no rotation left)."""
    return tl.max(tl.max(tl.where(ii == jj, 0.0, tl.abs(a)), axis=1), axis=0) <= _SKIP


@triton.jit
def jacobi_sweeps(
    a, sweeps, r, K: tl.constexpr, KP: tl.constexpr, N: tl.constexpr, PARALLEL: tl.constexpr
):
    """``sweeps`` Jacobi sweeps on the symmetric [KP, KP] tile ``a`` (scaled to [-1, 1],
    :func:`sym_scaled`; r = tl.arange(0, KP)) in the order the module docstring describes.
    Returns (D, V): D is A rotated to (numerically) diagonal, V the product of the rotations,
    so ``A = V D V^T``; eigenvalue m is ``D_mm`` and its eigenvector column m of V (unsorted).
    Padded rows and columns (index >= K) stay 0 in D and the unit vectors in V."""
    ii = r[:, None]  # row index of the tile
    jj = r[None, :]  # column index
    v = tl.where(ii == jj, 1.0, 0.0).to(tl.float64)
    # Converged: every off-diagonal entry at or below _SKIP, so every later rotation would have
    # t = 0 (c = 1, s = 0) and leave D's diagonal and V as they are: leaving the loop here gives
    # the eigenpairs of all `sweeps` sweeps, sooner (module docstring).
    sweep = 0
    done = _converged(a, ii, jj)
    if PARALLEL:
        while (sweep < sweeps) & ~done:  # leaves once converged (below)
            for t in range(N - 1):  # a round: K / 2 disjoint rotations at once
                partner, sign = _round_robin(r, t, K, N)
                part_cols = tl.broadcast_to(partner[None, :], (KP, KP))
                d = tl.sum(tl.where(ii == jj, a, 0.0), axis=1)  # diagonal, indexed by row
                ap = tl.gather(a, part_cols, axis=1)  # ap[i, j] = a[i, partner(j)]
                apq = tl.sum(tl.where(ii == jj, ap, 0.0), axis=1)  # a[i, partner(i)]
                tau = (sign * (tl.gather(d, partner, axis=0) - d) / (2.0 * apq)) + 0.0
                t_i = tl.where(tau >= 0, 1.0, -1.0) / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau))
                # Unpaired, a negligible a_pq (below _SKIP, 0 included: tau = 0/0 or +-inf), or
                # a tau^2 that overflows: no rotation.
                t_i = tl.where(
                    (sign != 0) & (tl.abs(apq) > _SKIP) & (tl.abs(tau) <= _DBL_MAX), t_i, 0.0
                )
                c = 1.0 / tl.sqrt(1.0 + t_i * t_i)
                s_p = tl.gather(sign * t_i * c, partner, axis=0)  # s of i's partner
                # A <- R^T A R and V <- V R with R = diag(c) + s e_i e_partner(i)^T: columns,
                # then rows, each mixed with its partner's.
                ar = a * c[None, :] + ap * s_p[None, :]
                part_rows = tl.broadcast_to(partner[:, None], (KP, KP))
                a = c[:, None] * ar + s_p[:, None] * tl.gather(ar, part_rows, axis=0)
                a = 0.5 * a + 0.5 * tl.trans(a)  # exactly symmetric again
                v = v * c[None, :] + tl.gather(v, part_cols, axis=1) * s_p[None, :]
            a = tl.where(tl.abs(a) < _FLUSH, 0.0, a)
            done = _converged(a, ii, jj)
            sweep += 1
    else:
        while (sweep < sweeps) & ~done:  # leaves once converged (below)
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
            done = _converged(a, ii, jj)
            sweep += 1
    return a, v


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
    N: tl.constexpr,
    PARALLEL: tl.constexpr,
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
    x = tl.load(src + ii * stride_r + jj * stride_c, mask=valid, other=0.0)
    xt = tl.load(src + jj * stride_r + ii * stride_c, mask=valid, other=0.0)
    a, scale = sym_scaled(x, xt)
    a, v = jacobi_sweeps(a, sweeps, r, K, KP, N, PARALLEL)
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


def check_order(order: str, where: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"{where}: order must be one of {ORDERS}, got {order!r}")


def check_sweeps(sweeps: int | None, k: int, order: str, where: str) -> int:
    """The sweeps to run: :func:`default_sweeps` for None, else ``sweeps`` (an int >= 0)."""
    if sweeps is None:
        return default_sweeps(k, order)
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"{where}: sweeps must be an int >= 0, got {sweeps!r}")
    return sweeps


def _k_pad(k: int, parallel: bool) -> int:
    # The parallel order pads to at least 4: a [2, 2] tile made Triton's compiler for sm_90
    # hang on the gathers (3.8, seen on 2026-11-27); padded lanes never rotate.
    return max(4 if parallel else 2, next_pow2(k))


def _num_warps(kp: int) -> int:
    # One warp holds a 16 x 16 tile and V in 16 registers each (float64: 2 x 32-bit) per
    # thread, and its reductions are shuffles with no barrier; at 32 x 32, 4 warps keep the
    # tiles and their temporaries out of local memory. (Untuned: to be measured on a GPU.)
    return 1 if kp <= 16 else 4


def jacobi_eigh(
    a: Tensor, sweeps: int | None = None, order: str = "cyclic"
) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending, [..., K]) and eigenvectors (columns, [..., K, K]) of the
    symmetric part of ``a[..., K, K]`` (float64 or float32; non-finite entries read as 0),
    both float64, in one Triton launch. No value is read back to the host.

    ``sweeps``: Jacobi sweeps (default :func:`default_sweeps`). ``order``: ``"cyclic"`` (one
    rotation at a time, the default: the order timed and tested on a GPU) or ``"parallel"``
    (K / 2 disjoint rotations per round through register gathers; about an eighth of the
    reductions at K = 16, not yet run on a GPU).
    """
    check_order(order, "jacobi_eigh")
    parallel = order == "parallel"
    k = check_kxk(a, "jacobi_eigh", "gradbal.solvers_qp.sym_eig", INTERPRETED)
    sweeps = check_sweeps(sweeps, k, order, "jacobi_eigh")
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
            KP=_k_pad(k, parallel),
            N=k + k % 2,
            PARALLEL=parallel,
            num_warps=_num_warps(_k_pad(k, parallel)),
        )
    return evals.reshape(*batch, k), evecs.reshape(*batch, k, k)
