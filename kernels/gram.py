"""Gram pass: ``G[i, j] = <g_i, g_j>`` for all K(K+1)/2 pairs of rows, in one read of the store.

Memory traffic budget. One balanced step over K task rows of N elements of s bytes must read
the rows twice and write one row: the floor is (2K + 1) x N x s bytes. This pass is the first
read: K N s bytes, and nothing else of size N (the per-program partials are P x KP^2 x 8 bytes,
P ~ 2 x SMs, independent of N). The non-finite count (``gram_with_nonfinite``) is folded into the
same read, so checking the gradients for inf/NaN costs no traffic of its own.

Formula and numerics. Every program p of a persistent grid of P programs loops over column
blocks b = p, p + P, p + 2P, ... of width B (n_iter = ceil(N / (B P)) blocks at most) and forms

    G_p[i, j] = sum_{b of p} sum_{c in b} x[i, c] * x[j, c]      (x upcast to fp32)

writing G_p to a float64 partials buffer. A second, one-program kernel sums the P partials in
float64 in a fixed order and writes G (float64), reading entry (min(i,j), max(i,j)) for both
(i, j) and (j, i) so G is exactly symmetric. No atomics: the same input on the same device gives
the same bits every run. Products of bf16/fp16 values are exact in fp32, so the only rounding
that matters is fp32 summation, along a chain of n_iter (fma) or B (dot) additions per entry;
every longer sum is float64 (:func:`gram_error_bound` states the bound the tests check).

Two ways to form the K x K block products (chosen per call by :func:`plan_gram`):

* ``fma`` (padded K <= 16 for fp32, <= 8 for bf16/fp16): lane-wise outer products
  ``acc[i, j, c] += x[i, c] x[j, c]`` in fp32 registers, reduced over the B lanes once at the
  end (in float64). No padding beyond the next power of two, no shared memory, no per-block
  reductions. tl.dot is the wrong tool for small K: it needs every dimension >= 16, so K = 2
  would be padded to 16 x 16 (64x the useful work), and an fp32 "ieee" tl.dot runs on CUDA
  cores through shared memory anyway (TF32 tensor cores would round inputs to 10 mantissa bits).
* ``dot`` (larger K, and K > 8 for bf16/fp16): ``tl.dot(x, x^T)`` on a [KP, B] tile with
  KP = max(16, next_pow2(K)); padded rows are masked loads (no traffic). Each block's fp32 dot is
  added into a float64 accumulator. The fma path costs KP^2 FMAs per column, i.e. KP^2 / (KP s)
  FMAs per byte read: 4 per byte for K = 16 fp32 (fine at ~3 TB/s on CUDA cores) but 8 for
  K = 16 bf16, too close to the CUDA-core peak, so bf16/fp16 switch to tensor cores at K > 8:
  on a GPU the dot runs natively in bf16/fp16 (exact products, fp32 accumulation); fp32 uses
  ``input_precision="ieee"``. Under Triton's interpreter the tile is upcast to fp32 first (its
  bf16 dot is broken); the math is the same.

Offsets are int64 (row stride x row index and column index), so stores over 2^31 elements work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_rows, next_pow2, num_programs

__all__ = [
    "GramPlan",
    "gram",
    "gram_error_bound",
    "gram_reference",
    "gram_with_nonfinite",
    "nonfinite_reference",
    "plan_gram",
]

#: Largest K the single-tile kernels take (a [64, B] tile; the K x K stage between the passes
#: is the bottleneck long before this).
MAX_K = 64

# Largest finite fp32; |x| <= FLT_MAX is False exactly for +-inf and NaN. (Written as a
# comparison rather than x - x != 0 so no fast-math folding can remove it.)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)

# Hook for every buffer this module allocates; tests swap it for a poisoning allocator to show
# that no result depends on the previous contents of memory.
_alloc = torch.empty


# --------------------------------------------------------------------------------------------
# torch references (float64 math), used by the tests
# --------------------------------------------------------------------------------------------


# Columns per float64 chunk in the references (bounds their temporary memory).
_REF_CHUNK = 1 << 22


def _gram64(rows: Tensor, absolute: bool = False) -> Tensor:
    k, n = rows.shape
    acc = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    for start in range(0, n, _REF_CHUNK):
        c = rows[:, start : start + _REF_CHUNK].double()
        if absolute:
            c = c.abs()
        acc += c @ c.T
    return acc


def gram_reference(rows: Tensor) -> Tensor:
    """``rows @ rows.T`` in float64 (the exact Gram matrix of the stored values, up to fp64)."""
    return _gram64(rows)


def nonfinite_reference(rows: Tensor) -> Tensor:
    """Number of inf/NaN entries per row, int64 [K]."""
    return (~torch.isfinite(rows)).sum(dim=1, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _gram_partials_kernel(
    rows_ptr,
    stride_k,
    part_ptr,
    cnt_ptr,
    N,
    num_blocks,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_NATIVE: tl.constexpr,
    COUNT_NONFINITE: tl.constexpr,
):
    """Program p: sum of x x^T over column blocks p, p + P, ... -> partials[p] (fp64 [KP, KP]),
    and (COUNT_NONFINITE) the number of inf/NaN per row -> counts[p] (int64 [KP])."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.arange(0, KP)
    row_off = r[:, None].to(tl.int64) * stride_k  # int64: K x stride may exceed 2^31
    row_ok = r[:, None] < K
    if USE_DOT:
        acc = tl.zeros([KP, KP], dtype=tl.float64)
    else:
        acc = tl.zeros([KP, KP, BLOCK], dtype=tl.float32)
    bad = tl.zeros([KP, BLOCK], dtype=tl.int32)
    for blk in range(pid, num_blocks, nprog):
        cols = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = row_ok & (cols[None, :] < N)
        # Masked-off (padding) entries load as 0: they add nothing and cost no traffic.
        x = tl.load(rows_ptr + row_off + cols[None, :], mask=mask, other=0.0)
        xf = x.to(tl.float32)
        if USE_DOT:
            # A fresh fp32 block sum, added into a float64 acc: the fp32 chain per entry is the
            # B columns of one block, not B x n_iter as with tl.dot(..., acc). The fp64 add is
            # KP^2 flops per B columns: free next to the dot.
            if DOT_NATIVE:
                s = tl.dot(x, tl.trans(x))
            else:
                s = tl.dot(xf, tl.trans(xf), input_precision="ieee")
            acc += s.to(tl.float64)
        else:
            acc += xf[:, None, :] * xf[None, :, :]
        if COUNT_NONFINITE:
            bad += (~(tl.abs(xf) <= _FLT_MAX)).to(tl.int32)
    if USE_DOT:
        total = acc
    else:
        # The lane reduction runs once per program, in float64: the fp32 chain per entry is
        # just the n_iter blocks this program visited.
        total = tl.sum(acc.to(tl.float64), axis=2)
    c = tl.arange(0, KP)
    base = pid.to(tl.int64) * (KP * KP)
    tl.store(part_ptr + base + r[:, None] * KP + c[None, :], total)
    if COUNT_NONFINITE:
        # int32 per lane holds at most n_iter; the per-program total is widened first.
        tl.store(cnt_ptr + pid.to(tl.int64) * KP + r, tl.sum(bad.to(tl.int64), axis=1))


@triton.jit
def _gram_finish_kernel(
    part_ptr,
    cnt_ptr,
    g_ptr,
    cnt_out_ptr,
    P,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    COUNT_NONFINITE: tl.constexpr,
):
    """One program: G = sum_p partials[p] in float64, fixed order (lane p mod BLOCK_P
    sequentially, then a fixed tree over the BLOCK_P lanes); counts likewise in int64."""
    e = tl.arange(0, KP * KP)
    i = e // KP
    j = e % KP
    # Both (i, j) and (j, i) read the upper-triangle partial: G is symmetric bit for bit.
    src = tl.minimum(i, j) * KP + tl.maximum(i, j)
    lane = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P, KP * KP], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + lane
        ptrs = part_ptr + p[:, None].to(tl.int64) * (KP * KP) + src[None, :]
        acc += tl.load(ptrs, mask=p[:, None] < P, other=0.0)
    g = tl.sum(acc, axis=0)
    tl.store(g_ptr + i * K + j, g, mask=(i < K) & (j < K))
    if COUNT_NONFINITE:
        r = tl.arange(0, KP)
        cacc = tl.zeros([BLOCK_P, KP], dtype=tl.int64)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + lane
            ptrs = cnt_ptr + p[:, None].to(tl.int64) * KP + r[None, :]
            cacc += tl.load(ptrs, mask=p[:, None] < P, other=0)
        tl.store(cnt_out_ptr + r, tl.sum(cacc, axis=0), mask=r < K)


INTERPRETED = "Interpreted" in type(_gram_partials_kernel).__name__


# --------------------------------------------------------------------------------------------
# planning and launch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GramPlan:
    """Launch configuration of the Gram pass (a pure function of K, N, dtype and device)."""

    k_pad: int  # KP: padded row count of the register tile
    block: int  # B: columns per block
    num_programs: int  # P: persistent grid size
    use_dot: bool
    num_warps: int

    def accumulation_depth(self, n: int) -> int:
        """Longest fp32 addition chain behind one entry: the n_iter blocks one fp32 lane sees
        (fma), or the B columns inside one tl.dot (dot, whose block sums add up in float64)."""
        if self.use_dot:
            return self.block
        return math.ceil(max(n, 1) / (self.block * self.num_programs))


# Programs per SM: two resident programs hide the latency of one another's loads.
_PROGRAMS_PER_SM = 2
# fp32 lane accumulators (KP^2 x B) per program in the fma path: 64 per thread at 8 warps,
# which leaves registers for the loaded tile without spilling. (To be tuned on a GPU.)
_FMA_LANES = 16384


def plan_gram(k: int, n: int, dtype: torch.dtype, rows: Tensor | None = None) -> GramPlan:
    """Choose the block products (fma or dot), tile sizes and grid for a [k, n] store."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"gram: K must be in [1, {MAX_K}], got {k}")
    kp = max(2, next_pow2(k))
    fma_limit = 16 if dtype == torch.float32 else 8
    use_dot = kp > fma_limit
    if use_dot:
        kp = max(16, kp)
        # [KP, B] tile of 2K elements (B = 128, 64, 32 for KP = 16, 32, 64) beside a float64
        # [KP, KP] accumulator.
        block = 2048 // kp
        num_warps = 8 if kp >= 64 else 4
    else:
        # 16K fp32 lane accumulators (64 per thread at 8 warps): B = 4096, 1024, 256, 64
        # columns for KP = 2, 4, 8, 16, i.e. 32 KiB (fp32) in flight per program and block.
        block = _FMA_LANES // (kp * kp)
        num_warps = 8
    num_blocks = triton.cdiv(n, block)
    probe = rows if rows is not None else torch.empty(0)
    p = num_programs(probe, num_blocks, _PROGRAMS_PER_SM, INTERPRETED)
    return GramPlan(kp, block, p, use_dot, num_warps)


def _gram(rows: Tensor, count_nonfinite: bool) -> tuple[Tensor, Tensor | None]:
    check_rows(rows, INTERPRETED, "gram")
    k, n = rows.shape
    plan = plan_gram(k, n, rows.dtype, rows)
    kp, p = plan.k_pad, plan.num_programs
    dev = rows.device
    partials = _alloc((p, kp, kp), dtype=torch.float64, device=dev)
    g = _alloc((k, k), dtype=torch.float64, device=dev)
    if count_nonfinite:
        cnt_part = _alloc((p, kp), dtype=torch.int64, device=dev)
        counts = _alloc((k,), dtype=torch.int64, device=dev)
    else:  # unused pointers (the constexpr flag removes every access)
        cnt_part = counts = partials
    _gram_partials_kernel[(p,)](
        rows,
        rows.stride(0),
        partials,
        cnt_part,
        n,
        triton.cdiv(n, plan.block),
        K=k,
        KP=kp,
        BLOCK=plan.block,
        USE_DOT=plan.use_dot,
        DOT_NATIVE=plan.use_dot and rows.dtype != torch.float32 and not INTERPRETED,
        COUNT_NONFINITE=count_nonfinite,
        num_warps=plan.num_warps,
    )
    # Fixed BLOCK_P for a given P, so the stage-2 order (and the bits) never vary.
    block_p = max(1, min(next_pow2(p), 8192 // (kp * kp)))
    _gram_finish_kernel[(1,)](
        partials,
        cnt_part,
        g,
        counts,
        p,
        K=k,
        KP=kp,
        BLOCK_P=block_p,
        COUNT_NONFINITE=count_nonfinite,
        num_warps=8 if kp * kp >= 4096 else 4,
    )
    return g, (counts if count_nonfinite else None)


def gram(rows: Tensor) -> Tensor:
    """Gram matrix ``G = rows @ rows.T`` (float64 [K, K]) of a [K, N] store, one pass, fp32
    accumulation, deterministic two-stage reduction."""
    return _gram(rows, count_nonfinite=False)[0]


def gram_with_nonfinite(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(gram(rows), counts)`` where ``counts[k]`` (int64) is the number of inf/NaN entries of
    row k, computed in the same read of the store."""
    g, counts = _gram(rows, count_nonfinite=True)
    return g, counts


def gram_error_bound(rows: Tensor) -> Tensor:
    """Worst-case |G - G_exact| of :func:`gram` for these rows (float64 [K, K]):
    ``gamma_m * sum_c |x_i[c]| |x_j[c]|`` with ``gamma_m = m u / (1 - m u)``, u = 2^-24 (fp32)
    and m = the plan's fp32 accumulation depth + 1 (the rounding of an fp32 product, or of the
    fp32 lane/block sum into float64), plus float64 sums of at most N + P terms (u = 2^-53),
    counted twice so the bound also covers a float64 reference's own rounding."""
    k, n = rows.shape
    plan = plan_gram(k, n, rows.dtype, rows)
    m = plan.accumulation_depth(n) + 1
    u = 2.0**-24
    gamma = m * u / (1 - m * u) + 2 * (n + plan.num_programs) * 2.0**-53
    return gamma * _gram64(rows, absolute=True)
