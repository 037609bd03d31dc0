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

Tuning. The plan (:func:`plan_gram`) is overridable: ``unroll`` U makes each loop iteration
load U consecutive blocks (U x KP x B elements in flight per program; the loop then runs over
ceil(N / (U B)) super-blocks, and a fma lane's fp32 chain becomes min(n_iter U, ceil(N / B))
with n_iter = ceil(N / (U B P))), ``programs_per_sm`` sets P, ``fma_lanes`` sets B = fma_lanes /
KP^2, ``num_warps`` and ``use_dot`` the rest; keyword overrides, the environment variable
``GRADBAL_GRAM_PLAN`` ("unroll=4,programs_per_sm=4") or an explicit :class:`GramPlan` passed to
:func:`gram`. Every plan is deterministic (its own fixed order); different plans round
differently, each within its own :func:`gram_error_bound`. The defaults are the plans
benchmarks/tune_gram.py measured fastest on an H200 (``_TUNED``; U = 4 or 8 everywhere); plans
it has not swept keep U = 1, 2 programs per SM and 16K lanes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_rows, next_pow2, num_programs

__all__ = [
    "PLAN_ENV",
    "PLAN_KEYS",
    "GramPlan",
    "format_plan_spec",
    "gram",
    "gram_error_bound",
    "gram_reference",
    "gram_with_nonfinite",
    "nonfinite_reference",
    "parse_plan_spec",
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
    UNROLL: tl.constexpr = 1,
):
    """Program p: sum of x x^T over the column blocks of super-blocks p, p + P, ... (UNROLL
    consecutive blocks of B columns each; ``num_blocks`` counts super-blocks) -> partials[p]
    (fp64 [KP, KP]), and (COUNT_NONFINITE) the number of inf/NaN per row -> counts[p] (int64
    [KP])."""
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
    for sb in range(pid, num_blocks, nprog):
        start = tl.cast(sb, tl.int64) * (UNROLL * BLOCK)
        # Issue every load of the super-block before any arithmetic on them, so UNROLL x KP x B
        # elements are in flight per program (DRAM latency is hidden by bytes in flight, not
        # by FMAs). A tuple, grown in a static (unrolled) loop, holds the loaded tiles.
        xs = ()
        for u in tl.static_range(UNROLL):
            cols = start + u * BLOCK + tl.arange(0, BLOCK)
            mask = row_ok & (cols[None, :] < N)
            # Masked-off (padding) entries load as 0: they add nothing and cost no traffic.
            xs = xs + (tl.load(rows_ptr + row_off + cols[None, :], mask=mask, other=0.0),)
        # Then accumulate them in block order u = 0, 1, ...: a fixed order, so fixed bits.
        for u in tl.static_range(UNROLL):
            x = xs[u]
            xf = x.to(tl.float32)
            if USE_DOT:
                # A fresh fp32 block sum, added into a float64 acc: the fp32 chain per entry is
                # the B columns of one block, not B x n_iter as with tl.dot(..., acc). The fp64
                # add is KP^2 flops per B columns: free next to the dot.
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
        # int32 per lane holds at most n_iter x UNROLL; the per-program total is widened first.
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
    """Launch configuration of the Gram pass (a pure function of K, N, dtype, device and the
    overrides given to :func:`plan_gram`).

    Each program handles super-blocks of ``unroll`` x ``block`` columns: it issues the
    ``unroll`` loads of [KP, B] first, then accumulates them block by block in a fixed order.
    """

    k_pad: int  # KP: padded row count of the register tile
    block: int  # B: columns per block
    num_programs: int  # P: persistent grid size
    use_dot: bool
    num_warps: int
    unroll: int = 1  # U: column blocks loaded per loop iteration (loads in flight)

    def num_super_blocks(self, n: int) -> int:
        """ceil(N / (U B)): the persistent loop's trip count summed over all programs."""
        return triton.cdiv(n, self.unroll * self.block)

    def accumulation_depth(self, n: int) -> int:
        """Longest fp32 addition chain behind one entry.

        fma: a lane adds one product per column block it sees; a program visits at most
        n_iter = ceil(N / (U B P)) super-blocks of U blocks each, and no lane sees more than the
        ceil(N / B) blocks that exist, so depth = min(n_iter U, ceil(N / B)).
        dot: the B columns inside one tl.dot (the block sums add up in float64)."""
        if self.use_dot:
            return self.block
        n = max(n, 1)
        n_iter = triton.cdiv(self.num_super_blocks(n), self.num_programs)
        return min(n_iter * self.unroll, triton.cdiv(n, self.block))

    def check(self, k: int) -> None:
        """Raise ValueError unless this plan can run the kernel for K = k rows."""
        problems = []
        ints = ("k_pad", "block", "num_programs", "num_warps", "unroll")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.use_dot, bool):
            problems.append(f"use_dot must be a bool, got {self.use_dot!r}")
        if problems:
            raise ValueError("gram: invalid GramPlan: " + "; ".join(problems))
        pow2 = {n: getattr(self, n) for n in ("k_pad", "block", "num_warps", "unroll")}
        problems += [f"{n} must be a power of two, got {v}" for n, v in pow2.items() if v & (v - 1)]
        if self.k_pad < max(2, next_pow2(k)):
            problems.append(f"k_pad must be >= max(2, next_pow2(K)) = {max(2, next_pow2(k))}")
        if self.unroll > _MAX_UNROLL:
            problems.append(f"unroll must be <= {_MAX_UNROLL}, got {self.unroll}")
        if self.num_warps > 16:
            problems.append(f"num_warps must be <= 16, got {self.num_warps}")
        if self.use_dot:
            if not 16 <= self.k_pad <= MAX_K:
                problems.append(f"the dot path needs 16 <= k_pad <= {MAX_K}, got {self.k_pad}")
            if self.block < 16:  # tl.dot needs every dimension >= 16
                problems.append(f"the dot path needs block >= 16, got {self.block}")
            elif self.k_pad * self.block > _MAX_TILE:
                problems.append(f"k_pad x block must be <= {_MAX_TILE}")
        elif self.k_pad > 16:
            problems.append(f"the fma path needs k_pad <= 16, got {self.k_pad}")
        elif self.k_pad * self.k_pad * self.block > _MAX_TILE:
            problems.append(f"k_pad^2 x block (fp32 lanes) must be <= {_MAX_TILE}")
        if problems:
            raise ValueError("gram: invalid GramPlan " + repr(self) + ": " + "; ".join(problems))


# Untuned fallback (plans no sweep has covered: the fp32 dot path, KP = 32 and 64).
# Programs per SM: two resident programs hide the latency of one another's loads.
_PROGRAMS_PER_SM = 2
# fp32 lane accumulators (KP^2 x B) per program in the fma path: 64 per thread at 8 warps,
# which leaves registers for the loaded tile without spilling.
_FMA_LANES = 16384
# Column blocks per loop iteration (1: one [KP, B] load per iteration).
_UNROLL = 1
# Tuned defaults, (path, KP, element bytes) -> (unroll, programs_per_sm, fma_lanes): the plan
# of benchmarks/tune_gram.py's sweep that was fastest at N = 1e7 and 1e8 together (CUDA-graph
# replays on an NVIDIA H200, 2026-11-26; benchmarks/RESULTS.md has the table and the command).
# Every fastest plan loads several blocks per iteration (U = 4 or 8): one block in flight per
# program left the pass at 16-68% of the copy bandwidth, these reach 39-104%. 2-byte rows
# were swept as bf16; fp16 has the same bytes per column and takes the same plans.
_TUNED = {
    ("fma", 2, 4): (4, 2, 8192),
    ("fma", 4, 4): (8, 2, 8192),
    ("fma", 8, 4): (8, 2, 8192),
    ("fma", 16, 4): (8, 1, 16384),
    ("fma", 2, 2): (4, 4, 4096),
    ("fma", 4, 2): (8, 2, 8192),
    ("fma", 8, 2): (8, 2, 8192),
    ("dot", 16, 2): (8, 2, _FMA_LANES),
}
# Bounds of the overrides: larger unrolls or tiles only spill registers.
_MAX_UNROLL = 16
_MAX_TILE = 65536

#: Environment variable holding plan overrides for every gram() call, e.g.
#: ``GRADBAL_GRAM_PLAN="unroll=4,programs_per_sm=4,fma_lanes=8192"`` (keys: :data:`PLAN_KEYS`).
PLAN_ENV = "GRADBAL_GRAM_PLAN"

#: Overridable plan settings (``plan_gram(..., key=value)`` or :data:`PLAN_ENV`) and the values
#: each accepts.
# The integer settings: (lowest, highest, power of two only, what it is).
_INT_BOUNDS = {
    "programs_per_sm": (1, 64, False, ""),
    "fma_lanes": (1024, 65536, True, " (fp32 accumulators per program, fma path)"),
    "unroll": (1, _MAX_UNROLL, True, ""),
    "num_warps": (1, 16, True, ""),
}
PLAN_KEYS = {
    **{
        key: f"{'a power of two' if pow2 else 'an integer'} in [{lo}, {hi}]{what}"
        for key, (lo, hi, pow2, what) in _INT_BOUNDS.items()
    },
    "use_dot": "a boolean: 1/0, true/false, yes/no or on/off (True pads K to >= 16)",
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _check_override(key: str, value, where: str):
    """The validated value of one override (an int, or a bool for use_dot); ValueError naming
    the key, the value and what is allowed otherwise. Strings (from the environment) parse."""
    if key not in PLAN_KEYS:
        raise ValueError(
            f"{where}: unknown gram plan key {key!r}; allowed keys: {', '.join(PLAN_KEYS)}"
        )
    bad = ValueError(f"{where}: bad value {value!r} for {key!r}; {key} must be {PLAN_KEYS[key]}")
    if key == "use_dot":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise bad from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad
    lo, hi, pow2, _ = _INT_BOUNDS[key]
    if not lo <= value <= hi or (pow2 and value & (value - 1)):
        raise bad
    return value


@functools.lru_cache(maxsize=32)
def parse_plan_spec(spec: str) -> tuple[tuple[str, int | bool], ...]:
    """``"unroll=4, programs_per_sm=4"`` -> ``(("unroll", 4), ("programs_per_sm", 4))``,
    validated (ValueError naming the bad item and the allowed keys/values). Empty items are
    skipped, so "" means no overrides."""
    items: dict[str, int | bool] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(
                f"{PLAN_ENV}: {part.strip()!r} is not key=value; allowed keys: "
                f"{', '.join(PLAN_KEYS)}"
            )
        key, value = (t.strip() for t in part.split("=", 1))
        if key in items:
            raise ValueError(f"{PLAN_ENV}: key {key!r} given twice in {spec!r}")
        items[key] = _check_override(key, value, PLAN_ENV)
    return tuple(items.items())


def format_plan_spec(overrides: dict) -> str:
    """Inverse of :func:`parse_plan_spec`: the ``GRADBAL_GRAM_PLAN`` string of these overrides."""
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in overrides.items())


def plan_gram(
    k: int, n: int, dtype: torch.dtype, rows: Tensor | None = None, **overrides
) -> GramPlan:
    """Choose the block products (fma or dot), tile sizes and grid for a [k, n] store.

    Defaults: fma for KP = max(2, next_pow2(K)) <= 16 (fp32) or <= 8 (bf16/fp16), with
    B = fma_lanes / KP^2 columns per block; else tl.dot on [KP, 2048 / KP] tiles, KP >= 16;
    P = min(ceil(N / (U B)), SMs x programs_per_sm); (U, programs_per_sm, fma_lanes) from the
    GPU sweep's table ``_TUNED`` per (path, KP, element size), (1, 2, 16384) where it has none.

    ``overrides`` (see :data:`PLAN_KEYS`) replace these defaults; the settings in the
    environment variable :data:`PLAN_ENV` apply first, the keyword overrides on top. Forcing
    ``use_dot=True`` pads KP to 16; ``use_dot=False`` is refused for K > 16. ``fma_lanes`` only
    matters on the fma path, ``num_warps`` replaces the path's default (8 fma; 4 dot, 8 at
    KP = 64). Invalid keys or values raise ValueError before anything runs."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"gram: K must be in [1, {MAX_K}], got {k}")
    settings = dict(parse_plan_spec(os.environ.get(PLAN_ENV, "")))
    for key, value in overrides.items():
        settings[key] = _check_override(key, value, "plan_gram")
    kp = max(2, next_pow2(k))
    fma_limit = 16 if dtype == torch.float32 else 8
    use_dot = settings.get("use_dot", kp > fma_limit)
    if use_dot:
        kp = max(16, kp)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    unroll, per_sm, lanes = _TUNED.get(
        ("dot" if use_dot else "fma", kp, itemsize), (_UNROLL, _PROGRAMS_PER_SM, _FMA_LANES)
    )
    if use_dot:
        # [KP, B] tile of 2K elements (B = 128, 64, 32 for KP = 16, 32, 64) beside a float64
        # [KP, KP] accumulator.
        block = 2048 // kp
        num_warps = 8 if kp >= 64 else 4
    else:
        if kp > 16:
            raise ValueError(
                f"plan_gram: use_dot=False needs K <= 16 (the fma path keeps KP^2 x B fp32 "
                f"accumulators), got K={k}"
            )
        # 16K fp32 lane accumulators (64 per thread at 8 warps): B = 4096, 1024, 256, 64
        # columns for KP = 2, 4, 8, 16, i.e. 32 KiB (fp32) in flight per program and block.
        block = settings.get("fma_lanes", lanes) // (kp * kp)
        num_warps = 8
    num_warps = settings.get("num_warps", num_warps)
    unroll = settings.get("unroll", unroll)
    num_blocks = triton.cdiv(n, unroll * block)
    probe = rows if rows is not None else torch.empty(0)
    per_sm = settings.get("programs_per_sm", per_sm)
    p = num_programs(probe, num_blocks, per_sm, INTERPRETED)
    return GramPlan(kp, block, p, use_dot, num_warps, unroll)


def _resolve_plan(rows: Tensor, plan: GramPlan | None) -> GramPlan:
    k, n = rows.shape
    if plan is None:
        return plan_gram(k, n, rows.dtype, rows)
    if not isinstance(plan, GramPlan):
        raise TypeError(f"gram: plan must be a GramPlan or None, got {type(plan).__name__}")
    plan.check(k)
    return plan


def _gram(
    rows: Tensor, count_nonfinite: bool, plan: GramPlan | None
) -> tuple[Tensor, Tensor | None]:
    check_rows(rows, INTERPRETED, "gram")
    k, n = rows.shape
    plan = _resolve_plan(rows, plan)
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
        plan.num_super_blocks(n),
        K=k,
        KP=kp,
        BLOCK=plan.block,
        USE_DOT=plan.use_dot,
        DOT_NATIVE=plan.use_dot and rows.dtype != torch.float32 and not INTERPRETED,
        COUNT_NONFINITE=count_nonfinite,
        UNROLL=plan.unroll,
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


def gram(rows: Tensor, plan: GramPlan | None = None) -> Tensor:
    """Gram matrix ``G = rows @ rows.T`` (float64 [K, K]) of a [K, N] store, one pass, fp32
    accumulation, deterministic two-stage reduction. ``plan`` (checked by
    :meth:`GramPlan.check`) replaces :func:`plan_gram`'s choice (and :data:`PLAN_ENV`)."""
    return _gram(rows, count_nonfinite=False, plan=plan)[0]


def gram_with_nonfinite(rows: Tensor, plan: GramPlan | None = None) -> tuple[Tensor, Tensor]:
    """``(gram(rows, plan), counts)`` where ``counts[k]`` (int64) is the number of inf/NaN
    entries of row k, computed in the same read of the store."""
    g, counts = _gram(rows, count_nonfinite=True, plan=plan)
    return g, counts


def gram_error_bound(rows: Tensor, plan: GramPlan | None = None) -> Tensor:
    """Worst-case |G - G_exact| of :func:`gram` (with ``plan``, or the plan it would choose)
    for these rows (float64 [K, K]):
    ``gamma_m * sum_c |x_i[c]| |x_j[c]|`` with ``gamma_m = m u / (1 - m u)``, u = 2^-24 (fp32)
    and m = the plan's fp32 accumulation depth + 1 (the rounding of an fp32 product, or of the
    fp32 lane/block sum into float64), plus float64 sums of at most N + P terms (u = 2^-53),
    counted twice so the bound also covers a float64 reference's own rounding."""
    n = rows.shape[1]
    plan = _resolve_plan(rows, plan)
    m = plan.accumulation_depth(n) + 1
    u = 2.0**-24
    gamma = m * u / (1 - m * u) + 2 * (n + plan.num_programs) * 2.0**-53
    return gamma * _gram64(rows, absolute=True)
