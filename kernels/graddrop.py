"""GradDrop's elementwise pass (Chen et al., NeurIPS 2020): one read of the K rows, one write.

Memory traffic budget. A Gram-based step reads the K rows twice and writes one row: the floor is
(2K + 1) x N x s bytes. GradDrop replaces the combine pass (the optimizer still runs the Gram
pass, for its non-finite check and its statistics) by this pass, which reads K N s bytes of
rows, reads N x 4 bytes of uniform noise and writes N s' bytes (s' = the element size of
``out``; plus N s' read when accumulating): K N s + 4 N + N s'. Making the noise costs another
4 N bytes written (torch's ``uniform_`` from the caller's generator, so that this pass and the
torch one give the same bits for the same generator state); when ``out`` is fp32 and is
overwritten the noise is drawn into ``out`` itself and costs no buffer. The K per-objective
leak factors (when given) are 2K scalars read on the device: no host synchronisation.

Formula. At every column c, with x_i = rows[i, c] upcast to fp32 and u = noise[c]:

    pos   = sum_i max(x_i, 0)                neg = sum_i min(x_i, 0)
            (sequential, i = 0, 1, ..., K - 1, starting from the terms of row 0; NaN kept)
    total = pos - neg                          (= sum_i |x_i|)
    ratio = total > 0 ? (pos + neg) / total : 0
    keep  = 0.5 * (1 + ratio) > u              (the sign purity P against the draw U)
    res   = keep ? pos : neg
            with leak factors (l_i, d_i = 1 - l_i):
    res   = sum_i l_i x_i + (keep ? sum_i d_i max(x_i, 0) : sum_i d_i min(x_i, 0))
    res   = pos + neg   where total is not finite (see below)
    res   = res + 0.0
    out[c] = round_to(out.dtype, res)          (or round(out[c] + round(res)) when accumulating)

Every operation is one IEEE fp32 operation in that order: the division is correctly rounded
(``div_rn``; Triton's ``/`` is an approximate division on NVIDIA GPUs) and the kernel is
compiled without FMA contraction, so the result has the same bits as
:func:`gradbal._ops.graddrop_torch`, which performs the same operations with torch ops (NaN
payloads aside). The one freedom, the sign of a zero max/min (torch's clamp on CPU and on CUDA
need not agree about -0.0), only reaches zero sums, which ``+ 0.0`` makes +0.0. Runs are
bitwise reproducible (no atomics, no reduction across programs).

Non-finite gradients. A column whose entries include inf or NaN never gives a finite result:
there ``res = pos + neg``, the plain sum, which is +inf, -inf or NaN (so an inf is never dropped
into a finite value; the optimizer's Gram-diagonal check sees the bad row and handles the step).
A column of finite entries whose ``total`` overflows fp32 (|x| near 1e38) gets the plain sum too.

Grid. A persistent grid (about 4 programs per SM) loops over column blocks p, p + P, ...; each
iteration issues K independent, coalesced row loads of B elements plus one noise load.
Offsets are int64. Column c's noise and rows are read before ``out[c]`` is written by the same
program, so the noise may be ``out`` itself; any other overlap of ``out`` with the rows or the
noise is refused.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from gradbal._ops import overlaps

from ._launch import check_rows, check_vector, num_programs
from .combine import _bf16_round_nearest_even

__all__ = [
    "graddrop",
    "graddrop_error_bound",
    "graddrop_reference",
    "purity_tie_margin",
    "sign_purity_reference",
]

#: Element types ``out`` may have (the fp32 result is rounded to it on store).
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Largest finite fp32; |x| <= FLT_MAX is False exactly for +-inf and NaN.
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


# --------------------------------------------------------------------------------------------
# float64 references, used by the tests (the bit-exact torch path is gradbal._ops.graddrop_torch)
# --------------------------------------------------------------------------------------------


def _parts(rows: Tensor) -> tuple[Tensor, Tensor]:
    x = rows.double()
    return x.clamp_min(0), x.clamp_max(0)  # NaN kept in both


def sign_purity_reference(rows: Tensor) -> Tensor:
    """``P = 1/2 (1 + sum_i x_i / sum_i |x_i|)`` in float64 (1/2 where every x_i is 0)."""
    pos, neg = (p.sum(0) for p in _parts(rows))
    total = pos - neg
    return 0.5 * (1 + torch.where(total > 0, (pos + neg) / total.clamp_min(1e-300), 0.0))


def graddrop_reference(
    rows: Tensor,
    noise: Tensor,
    leak: tuple[Tensor, Tensor] | None = None,
    out_before: Tensor | None = None,
    keep_positive: Tensor | None = None,
) -> Tensor:
    """GradDrop of the stored rows in float64 math (the formula in the module docstring).

    ``leak``: the (l, 1 - l) vectors the kernel reads. ``keep_positive`` overrides the
    decision ``P > U`` (the tests use it at near-ties, where fp32 and float64 may disagree).
    ``out_before``: added when given (accumulation)."""
    pos_p, neg_p = _parts(rows)
    pos, neg = pos_p.sum(0), neg_p.sum(0)
    if keep_positive is None:
        keep_positive = sign_purity_reference(rows) > noise.double()
    if leak is None:
        res = torch.where(keep_positive, pos, neg)
    else:
        keep, drop = (v.double().to(rows.device).unsqueeze(1) for v in leak)
        base = (keep * rows.double()).sum(0)
        res = base + torch.where(keep_positive, (drop * pos_p).sum(0), (drop * neg_p).sum(0))
    res = torch.where(torch.isfinite(pos - neg), res, pos + neg)
    if out_before is not None:
        res = res + out_before.double()
    return res


def graddrop_error_bound(
    rows: Tensor, out_dtype: torch.dtype, exact: Tensor, out_before: Tensor | None = None
) -> Tensor:
    """Worst-case |out - exact| (float64 [N]) for the *same* keep decision: ``(1 + u_o)
    gamma_{K+3} T + u_o |exact| + eta_o + (K + 3) eta_32`` with ``T = sum_i |x_i|`` (every
    term of the result is |x_i| times a factor <= 1, so |res| <= T), u = 2^-24, u_o the unit
    roundoff of ``out_dtype`` and eta_o half its smallest subnormal. Accumulating rounds res
    to ``out_dtype`` (u_o T more), adds ``out`` in fp32 (gamma |out| more) and rounds again:
    ``(1 + u_o)^2 ((gamma + u_o) T + gamma |out|) + u_o |exact| + 2 eta_o + (K + 3) eta_32``."""
    k = rows.shape[0]
    u = 2.0**-24
    m = k + 3
    gamma = m * u / (1 - m * u)
    fi = torch.finfo(out_dtype)
    u_o = fi.eps / 2
    eta_o = fi.smallest_normal * fi.eps / 2
    eta_32 = torch.finfo(torch.float32).smallest_normal * u
    t = rows.double().abs().sum(0)
    if out_before is None:
        return (1 + u_o) * gamma * t + u_o * exact.abs() + eta_o + m * eta_32
    before = out_before.double().abs()
    inner = (gamma + u_o) * t + gamma * before
    return (1 + u_o) ** 2 * inner + u_o * exact.abs() + 2 * eta_o + m * eta_32


def purity_tie_margin(k: int) -> float:
    """|P_fp32 - P_fp64| is below this (the fp32 decision may differ from the float64 one only
    where |P - U| is smaller): the sums carry gamma_K relative error each, the ratio one more
    rounding and 1 + ratio another, with |ratio| <= 1."""
    return 4 * (k + 4) * 2.0**-24


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _round_to_out(x, out_ptr, BF16_RNE: tl.constexpr):
    if BF16_RNE:
        return _bf16_round_nearest_even(x)
    return x.to(out_ptr.dtype.element_ty)  # round to nearest even on GPUs


@triton.jit
def _graddrop_kernel(
    rows_ptr,
    stride_k,
    noise_ptr,
    keep_ptr,
    drop_ptr,
    out_ptr,
    N,
    num_blocks,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    LEAK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    OUT_F64: tl.constexpr,
    BF16_RNE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    stride = tl.cast(stride_k, tl.int64)  # k x stride may exceed 2^31
    for blk in range(pid, num_blocks, nprog):
        cols = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        # Row 0 starts the sums. max/min as selects that keep NaN (clamp's behaviour).
        x = tl.load(rows_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        pos = tl.where(x < 0, 0.0, x)
        neg = tl.where(x > 0, 0.0, x)
        if LEAK:
            lk = tl.load(keep_ptr).to(tl.float32)
            dk = tl.load(drop_ptr).to(tl.float32)
            base = x * lk
            pos_d = pos * dk
            neg_d = neg * dk
        # Unrolled over K: K independent coalesced loads in flight, a fixed summation order.
        for k in tl.static_range(1, K):
            x = tl.load(rows_ptr + k * stride + cols, mask=mask, other=0.0).to(tl.float32)
            xp = tl.where(x < 0, 0.0, x)
            xn = tl.where(x > 0, 0.0, x)
            pos = pos + xp
            neg = neg + xn
            if LEAK:
                lk = tl.load(keep_ptr + k).to(tl.float32)
                dk = tl.load(drop_ptr + k).to(tl.float32)
                neg_d = neg_d + xn * dk
                pos_d = pos_d + xp * dk
                base = base + x * lk
        signed = pos + neg
        total = pos - neg
        has_total = total > 0
        ratio = tl.where(has_total, tl.math.div_rn(signed, tl.where(has_total, total, 1.0)), 0.0)
        u = tl.load(noise_ptr + cols, mask=mask, other=1.0)
        keep_positive = 0.5 * (1.0 + ratio) > u
        if LEAK:
            res = base + tl.where(keep_positive, pos_d, neg_d)
        else:
            res = tl.where(keep_positive, pos, neg)
        # total >= 0 unless an entry is inf/NaN (or the fp32 sum overflows): the plain sum.
        res = tl.where(total <= _FLT_MAX, res, signed) + 0.0
        if ACCUMULATE:
            prev = tl.load(out_ptr + cols, mask=mask, other=0.0)
            if OUT_F64:
                res = prev + res.to(tl.float64)
            else:
                rounded = _round_to_out(res, out_ptr, BF16_RNE)
                res = prev.to(tl.float32) + rounded.to(tl.float32)
        tl.store(out_ptr + cols, _round_to_out(res, out_ptr, BF16_RNE), mask=mask)


INTERPRETED = "Interpreted" in type(_graddrop_kernel).__name__

# Programs per SM of the persistent grid, and bytes per row per block (larger under the
# interpreter, whose cost is per operation, not per element: columns are independent, so the
# block width changes no result).
_PROGRAMS_PER_SM = 4
_ROW_BYTES_PER_BLOCK = 16384 if INTERPRETED else 4096


def graddrop(
    rows: Tensor,
    noise: Tensor,
    out: Tensor,
    accumulate: bool = False,
    leak: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Write GradDrop of ``rows`` [K, N] into ``out`` [N] (or add it when ``accumulate``),
    deciding each column by ``P > noise[c]``; returns ``out``.

    ``noise``: fp32 [N] uniforms in [0, 1) (it may be ``out`` itself when ``out`` is fp32 and
    not accumulated into). ``leak``: ``None`` or the two fp32 [K] tensors ``(l, 1 - l)``, read
    on the device. Bit-identical to :func:`gradbal._ops.graddrop_torch` on the same inputs.
    """
    check_rows(rows, INTERPRETED, "graddrop")
    k, n = rows.shape
    check_vector(out, n, "out", OUT_DTYPES, rows.device, "graddrop")
    check_vector(noise, n, "noise", (torch.float32,), rows.device, "graddrop")
    if n and overlaps(out, rows):
        raise ValueError("graddrop: out overlaps the rows (it must be a separate buffer)")
    if n and overlaps(noise, rows):
        raise ValueError("graddrop: noise overlaps the rows")
    same = noise.data_ptr() == out.data_ptr() and noise.dtype == out.dtype
    if n and overlaps(noise, out) and not same:
        raise ValueError("graddrop: noise overlaps out without being out itself")
    if accumulate and n and noise.data_ptr() == out.data_ptr():
        raise ValueError("graddrop: the noise cannot live in out when accumulating into it")
    keep = drop = noise  # placeholders (never read without a leak)
    if leak is not None:
        keep, drop = leak
        for name, v in (("leak", keep), ("1 - leak", drop)):
            if not isinstance(v, Tensor) or v.shape != (k,) or not v.is_floating_point():
                raise ValueError(f"graddrop: {name} must be a floating tensor of shape ({k},)")
        keep = keep.to(rows.device, torch.float32, non_blocking=True).contiguous()
        drop = drop.to(rows.device, torch.float32, non_blocking=True).contiguous()
    if k == 0:  # an empty sum
        if not accumulate:
            out.zero_()
        return out
    block = _ROW_BYTES_PER_BLOCK // rows.element_size()
    num_blocks = triton.cdiv(n, block)
    _graddrop_kernel[(num_programs(rows, num_blocks, _PROGRAMS_PER_SM, INTERPRETED),)](
        rows,
        rows.stride(0),
        noise,
        keep,
        drop,
        out,
        n,
        num_blocks,
        K=k,
        BLOCK=block,
        LEAK=leak is not None,
        ACCUMULATE=bool(accumulate),
        OUT_F64=out.dtype == torch.float64,
        BF16_RNE=INTERPRETED and out.dtype == torch.bfloat16,
        num_warps=4,
        enable_fp_fusion=False,  # x * l + acc must round twice, like the torch ops
    )
    return out
