"""Combine pass: ``out[c] = scale * sum_k w[k] * rows[k, c]`` (or ``out[c] += ...``), one read.

Memory traffic budget. One balanced step over K task rows of N elements of s bytes must read
the rows twice and write one row: the floor is (2K + 1) x N x s bytes. This pass is the second
read and the write: K N s bytes read and N s' bytes written (s' = the element size of ``out``;
plus N s' read when accumulating). The K weights (and the optional scale) are read on the device
by every program: K + 1 scalars, no host synchronisation.

Formula and numerics. Each element is computed independently in fp32,

    acc = sum_{k = 0}^{K-1} fl32(w[k]) * x[k, c]        (sequential, k = 0, 1, ..., K - 1)
    acc = acc * scale        (when a scale is given: clipping folded into this pass)
    acc = acc + out[c]       (when accumulating)
    out[c] = round_to(out.dtype, acc)                   (round to nearest even)

so the result is within ``gamma_{K+3} (|scale| sum_k |w_k x_k| + |out[c]|)`` of the exact value
before the final rounding (:func:`combine_error_bound`). The order is fixed, so runs are bitwise
reproducible. Element c reads all K rows at column c before writing ``out[c]`` and programs own
disjoint columns, so ``out`` may be one of the rows (in place into the store): every read of a
column precedes the only write to it. Any other overlap of ``out`` with the store is refused.

Grid. A persistent grid (about 4 programs per SM) loops over column blocks p, p + P, ...; each
iteration issues K independent, coalesced row loads of B elements, which keeps enough bytes in
flight per SM to approach copy bandwidth for small K. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_rows, check_vector, num_programs

__all__ = ["combine", "combine_error_bound", "combine_reference"]

#: Element types ``out`` may have (the fp32 result is rounded to it on store).
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Hook for the buffers this module allocates (none today besides a moved weight vector); kept
# for symmetry with gram.py.
_alloc = torch.empty


# --------------------------------------------------------------------------------------------
# torch reference (float64 math), used by the tests
# --------------------------------------------------------------------------------------------


def combine_reference(
    rows: Tensor,
    weights: Tensor,
    out: Tensor | None = None,
    accumulate: bool = False,
    scale: float | Tensor | None = None,
) -> Tensor:
    """``scale * weights @ rows (+ out)`` in float64, from the stored values (not in place)."""
    res = weights.double().to(rows.device) @ rows.double()
    if scale is not None:
        res = res * (scale.double() if isinstance(scale, Tensor) else float(scale))
    if accumulate:
        res = res + out.double()
    return res


def combine_error_bound(
    rows: Tensor,
    weights: Tensor,
    out_dtype: torch.dtype,
    out_before: Tensor | None = None,
    accumulate: bool = False,
    scale: float | Tensor | None = None,
) -> Tensor:
    """Worst-case |out - exact| of :func:`combine` (float64 [N]): ``(1 + u_o) gamma_{K+3} T +
    u_o |exact| + eta_o`` with ``T = |scale| sum_k |w_k x_k| (+ |out[c]|)``, u = 2^-24 (fp32
    arithmetic), u_o the unit roundoff of ``out_dtype`` and eta_o half its smallest subnormal
    (results that underflow on store); fp32 underflow adds K + 3 times fp32's eta."""
    k = rows.shape[0]
    u = 2.0**-24
    m = k + 3
    gamma = m * u / (1 - m * u)
    fi = torch.finfo(out_dtype)
    u_o = fi.eps / 2
    eta_o = fi.smallest_normal * fi.eps / 2
    eta_32 = torch.finfo(torch.float32).smallest_normal * 2.0**-24
    t = weights.double().abs().to(rows.device) @ rows.double().abs()
    if scale is not None:
        t = t * abs(scale.double() if isinstance(scale, Tensor) else float(scale))
    if accumulate:
        t = t + out_before.double().abs()
    exact = combine_reference(rows, weights, out_before, accumulate, scale)
    return (1 + u_o) * gamma * t + u_o * exact.abs() + eta_o + m * eta_32


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _combine_kernel(
    rows_ptr,
    stride_k,
    w_ptr,
    stride_w,
    scale_ptr,
    scale_val,
    out_ptr,
    N,
    num_blocks,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    SCALE: tl.constexpr,  # 0: none, 1: the scalar scale_val, 2: the 1-element tensor scale_ptr
    BF16_RNE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    stride = tl.cast(stride_k, tl.int64)  # k x stride may exceed 2^31
    for blk in range(pid, num_blocks, nprog):
        cols = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        # Unrolled over K: K independent coalesced loads in flight, a fixed summation order.
        # The weight loads are uniform scalars (cache hits); they stay in the loop because
        # out may alias memory the compiler cannot prove disjoint from w.
        for k in tl.static_range(K):
            w = tl.load(w_ptr + k * stride_w).to(tl.float32)
            x = tl.load(rows_ptr + k * stride + cols, mask=mask, other=0.0)
            acc += w * x.to(tl.float32)
        if SCALE == 1:
            acc = acc * scale_val
        elif SCALE == 2:
            acc = acc * tl.load(scale_ptr).to(tl.float32)
        if ACCUMULATE:
            acc += tl.load(out_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if BF16_RNE:
            res = _bf16_round_nearest_even(acc)
        else:
            res = acc.to(out_ptr.dtype.element_ty)  # round to nearest even on GPUs
        tl.store(out_ptr + cols, res, mask=mask)


@triton.jit
def _bf16_round_nearest_even(x):
    """fp32 -> bf16 rounding to nearest, ties to even, by integer arithmetic on the bits (the
    classic bias trick); NaN is kept NaN. Used only under Triton's interpreter, whose cast
    truncates instead of rounding as GPUs do."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)  # noqa: PLR0124 (NaN test)


INTERPRETED = "Interpreted" in type(_combine_kernel).__name__

# Programs per SM of the persistent grid, and bytes per row per block.
_PROGRAMS_PER_SM = 4
_ROW_BYTES_PER_BLOCK = 4096


def _check_out(rows: Tensor, out: Tensor) -> None:
    k, n = rows.shape
    check_vector(out, n, "out", OUT_DTYPES, rows.device, "combine")
    if n == 0:
        return
    # Overlap with the store is safe only when out *is* a row: same dtype, same columns.
    es = rows.element_size()
    lo, hi = rows.data_ptr(), rows.data_ptr() + ((k - 1) * rows.stride(0) + n) * es
    o_lo, o_hi = out.data_ptr(), out.data_ptr() + n * out.element_size()
    if o_lo < hi and lo < o_hi:
        row_starts = {lo + r * rows.stride(0) * es for r in range(k)}
        is_row = out.dtype == rows.dtype and o_lo in row_starts
        if not is_row:
            raise ValueError(
                "combine: out overlaps the rows without being one of them (a shifted or "
                "differently typed view would be read after being written)"
            )


def combine(
    rows: Tensor,
    weights: Tensor,
    out: Tensor,
    accumulate: bool = False,
    scale: float | Tensor | None = None,
) -> Tensor:
    """Write ``scale * sum_k weights[k] * rows[k]`` into ``out`` (or add it when
    ``accumulate``) with fp32 arithmetic, rounding to ``out.dtype`` on store; returns ``out``.

    ``weights`` is any floating [K] tensor (read on the device, never synchronised); ``out`` may
    be a row of ``rows`` (in-place update of the store).
    """
    check_rows(rows, INTERPRETED, "combine")
    _check_out(rows, out)
    k, n = rows.shape
    if not isinstance(weights, Tensor) or weights.shape != (k,) or not weights.is_floating_point():
        raise ValueError(
            f"combine: weights must be a floating tensor of shape ({k},), got {weights!r}"
        )
    if weights.device != rows.device:
        weights = weights.to(rows.device, non_blocking=True)
    if k == 0:  # an empty sum
        if not accumulate:
            out.zero_()
        return out
    mode, scale_t, scale_v = 0, weights, 1.0
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"combine: a tensor scale must be one floating element, got {scale!r}")
        mode, scale_t = 2, scale.to(rows.device, non_blocking=True).reshape(1)
    elif scale is not None:
        mode, scale_v = 1, float(scale)
    block = _ROW_BYTES_PER_BLOCK // rows.element_size()
    num_blocks = triton.cdiv(n, block)
    _combine_kernel[(num_programs(rows, num_blocks, _PROGRAMS_PER_SM, INTERPRETED),)](
        rows,
        rows.stride(0),
        weights,
        weights.stride(0),
        scale_t,
        scale_v,
        out,
        n,
        num_blocks,
        K=k,
        BLOCK=block,
        ACCUMULATE=bool(accumulate),
        SCALE=mode,
        BF16_RNE=INTERPRETED and out.dtype == torch.bfloat16,
        num_warps=4,
    )
    return out
