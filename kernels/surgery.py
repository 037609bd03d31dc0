"""PCGrad's and GradVac's gradient surgery on the Gram matrix, in one launch.

PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Alg. 1) and GradVac
(Wang et al., "Gradient Vaccine", ICLR 2021, Alg. 1) modify each task gradient g_i in turn
against the others j, in a random order per i. Every modified ``g_i'`` stays in the span of the
gradients, so it is a row of coefficients ``C[i]`` (``g_i' = sum_l C[i, l] g_l``) and every
inner product it needs is ``(C G)[i, j]``; ``w = sum_i C[i]``. :mod:`gradbal.methods.pcgrad`
and :mod:`gradbal.methods.gradvac` run the K - 1 rounds (all i at once per round) as torch ops:
on a GPU ~30-110 launches at K = 4 and ~90-370 at K = 16, and neither can be replayed as a CUDA
graph (each step draws new orders). Here one program runs every round in registers:

* round t pairs each i with ``j = order[i, t]`` (the orders are drawn by the method from the
  optimizer's generator and passed in, so the kernel draws nothing);
* ``(C G)`` is formed fresh each round (as the torch ops do), a sum over l of column l of C
  times row l of G (K rank-one updates of a [KP, KP] tile; no matrix product in registers);
* PCGrad: ``C[i, j] -= min(0, (C G)[i, j]) / ||g_j||^2`` (``1 / ||g_j||^2`` read as 0 for a
  squared norm below float64's smallest normal, as the method does);
* GradVac: with ``phi = (C G)[i, j] / (||g_i'|| ||g_j|| + eps)`` and target ``phi_hat[i, j]``,
  if ``phi < phi_hat``: ``C[i, j] += ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 -
  phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2) + eps)``; the EMA target ``(1 - beta) phi_hat +
  beta phi`` (every pair, or only conflicting ones) is written back for every finite value.

The results equal the torch ops' to rounding (the sums run in another order). Checked in
tests/kernels/test_kernel_surgery.py. (Not yet run on a GPU.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import KXK_MAX_K, check_kxk, next_pow2
from ._sweep import f64_arg, fp32_pair

__all__ = ["MAX_K", "gradvac_weights", "pcgrad_weights"]

#: Largest K the one-program kernels take.
MAX_K = KXK_MAX_K

_TINY = tl.constexpr(2.2250738585072014e-308)  # float64's smallest normal number

# Hook for every buffer this module allocates; tests swap it for a poisoning allocator.
_alloc = torch.empty


@triton.jit
def _load_gram(g_ptr, stride_r, stride_c, ii, jj, K: tl.constexpr):
    """G as a [KP, KP] float64 tile, 0 on padded lanes (entries as they are, NaN included:
    the methods propagate them)."""
    return tl.load(g_ptr + ii * stride_r + jj * stride_c, mask=(ii < K) & (jj < K), other=0.0)


@triton.jit
def _times_gram(coef, g, ii, jj, K: tl.constexpr):
    """``C @ G`` for [KP, KP] tiles, as K rank-one updates (column l of C times row l of G)."""
    out = tl.zeros_like(coef)
    for l in range(K):
        c_col = tl.sum(tl.where(jj == l, coef, 0.0), axis=1)  # C[:, l]
        g_row = tl.sum(tl.where(ii == l, g, 0.0), axis=0)  # G[l, :]
        out += c_col[:, None] * g_row[None, :]
    return out


@triton.jit
def _pcgrad_kernel(g_ptr, stride_r, stride_c, order_ptr, w_ptr, K: tl.constexpr, KP: tl.constexpr):
    """One program: PCGrad's w[K] (float64) for the [K, K] G and order[K, K - 1] (int64)."""
    r = tl.arange(0, KP)
    ii = r[:, None]
    jj = r[None, :]
    live = r < K
    g = _load_gram(g_ptr, stride_r, stride_c, ii, jj, K)
    sq = tl.sum(tl.where(ii == jj, g, 0.0), axis=1)
    inv = tl.where(live & (sq >= _TINY), 1.0 / tl.where(sq >= _TINY, sq, 1.0), 0.0)
    coef = tl.where((ii == jj) & (ii < K), 1.0, 0.0).to(tl.float64)
    cg = g  # C = I in round 0
    for t in range(K - 1):
        j = tl.load(order_ptr + r * (K - 1) + t, mask=live, other=-1)  # partner of each i
        at_j = jj == j[:, None]
        dots = tl.sum(tl.where(at_j, cg, 0.0), axis=1)  # <g_i', g_j>
        inv_j = tl.sum(tl.where(at_j, inv[None, :], 0.0), axis=1)
        coef = coef - tl.where(at_j, (tl.minimum(dots, 0.0) * inv_j)[:, None], 0.0)
        cg = _times_gram(coef, g, ii, jj, K)
    tl.store(w_ptr + r, tl.sum(coef, axis=0), mask=live)


@triton.jit
def _gradvac_kernel(
    g_ptr, stride_r, stride_c, order_ptr, target_ptr, w_ptr, new_target_ptr,
    beta_hi, beta_lo, eps_hi, eps_lo,
    K: tl.constexpr, KP: tl.constexpr, ON_CONFLICT: tl.constexpr,
):  # fmt: skip
    """One program: GradVac's w[K] and new targets [K, K] (float64) for the [K, K] G, the
    targets [K, K] and order[K, K - 1] (int64)."""
    r = tl.arange(0, KP)
    ii = r[:, None]
    jj = r[None, :]
    live = r < K
    valid = (ii < K) & (jj < K)
    g = _load_gram(g_ptr, stride_r, stride_c, ii, jj, K)
    target = tl.load(target_ptr + ii * K + jj, mask=valid, other=0.0)
    beta = f64_arg(beta_hi, beta_lo)
    eps = f64_arg(eps_hi, eps_lo)
    # Any non-finite entry of G makes every cosine NaN: no pair conflicts (w = 1) and no target
    # moves. (|x| <= DBL_MAX is False exactly for inf and NaN.)
    bad = tl.sum(tl.sum(tl.where(valid & ~(tl.abs(g) <= 1.7976931348623157e308), 1, 0), axis=1), axis=0)
    nan = tl.where(bad > 0, float("nan"), 0.0).to(tl.float64)
    norms = tl.sqrt(tl.maximum(tl.sum(tl.where(ii == jj, g, 0.0), axis=1), 0.0))
    coef = tl.where((ii == jj) & (ii < K), 1.0, 0.0).to(tl.float64)
    cg = g
    norm_i = norms
    new_target = target
    for t in range(K - 1):
        j = tl.load(order_ptr + r * (K - 1) + t, mask=live, other=-1)
        at_j = jj == j[:, None]
        norm_j = tl.sum(tl.where(at_j, norms[None, :], 0.0), axis=1) + nan
        hat = tl.sum(tl.where(at_j, target, 0.0), axis=1)
        sqrt_hat = tl.sqrt(tl.maximum(1 - hat * hat, 0.0))
        phi = tl.sum(tl.where(at_j, cg, 0.0), axis=1) / (norm_i * norm_j + eps)
        conflict = phi < hat
        sqrt_phi = tl.sqrt(tl.maximum(1 - phi * phi, 0.0))
        step = norm_i * (hat * sqrt_phi - phi * sqrt_hat) / (norm_j * sqrt_hat + eps)
        coef = coef + tl.where(at_j & conflict[:, None], step[:, None], 0.0)
        ema = (1 - beta) * hat + beta * phi
        if ON_CONFLICT:
            ema = tl.where(conflict, ema, hat)
        # Each pair (i, j) comes once: its target is read above before this write; a
        # non-finite value (a skipped step) leaves the target as it was.
        write = at_j & live[:, None] & (tl.abs(ema) <= 1.7976931348623157e308)[:, None]
        new_target = tl.where(write, ema[:, None], new_target)
        cg = _times_gram(coef, g, ii, jj, K)
        norm_i = tl.sqrt(tl.maximum(tl.sum(cg * coef, axis=1), 0.0))
    tl.store(w_ptr + r, tl.sum(coef, axis=0), mask=live)
    tl.store(new_target_ptr + ii * K + jj, new_target, mask=valid)


INTERPRETED = "Interpreted" in type(_pcgrad_kernel).__name__


def _check(gram: Tensor, order: Tensor, where: str, instead: str) -> int:
    k = check_kxk(gram, where, instead, INTERPRETED, batched=False)
    if gram.dtype != torch.float64:
        raise TypeError(f"{where}: the Gram matrix must be float64 (the methods' dtype), got {gram.dtype}")
    if k < 2:
        raise ValueError(f"{where}: K must be >= 2, got {k}")
    if (not isinstance(order, Tensor) or order.shape != (k, k - 1) or order.dtype != torch.int64
            or order.device != gram.device):
        raise ValueError(
            f"{where}: order must be an int64 [{k}, {k - 1}] tensor on {gram.device} (row i: the "
            f"others in the order i meets them), got {getattr(order, 'shape', order)}"
        )
    return k


def pcgrad_weights(gram: Tensor, order: Tensor) -> Tensor:
    """PCGrad's weights (``reduction="sum"``) for a float64 [K, K] ``gram`` and the orders
    ``order[i]`` (the K - 1 others, int64), as [K] float64, in one launch."""
    k = _check(gram, order, "pcgrad_weights", "gradbal.methods.PCGrad")
    w = _alloc((k,), dtype=torch.float64, device=gram.device)
    _pcgrad_kernel[(1,)](gram, gram.stride(0), gram.stride(1), order.contiguous(), w, K=k,
                         KP=max(2, next_pow2(k)), num_warps=1 if k <= 16 else 4)  # fmt: skip
    return w


def gradvac_weights(
    gram: Tensor, target: Tensor, order: Tensor, beta: float, eps: float, on_conflict: bool = False
) -> tuple[Tensor, Tensor]:
    """GradVac's weights [K] and new targets [K, K] (float64) for a float64 [K, K] ``gram``,
    the targets ``phi_hat`` [K, K] and the orders [K, K - 1] (int64), in one launch."""
    k = _check(gram, order, "gradvac_weights", "gradbal.methods.GradVac")
    if not isinstance(target, Tensor) or target.shape != (k, k) or target.dtype != torch.float64:
        raise ValueError(f"gradvac_weights: target must be a float64 [{k}, {k}] tensor, got "
                         f"{getattr(target, 'shape', target)}")  # fmt: skip
    w = _alloc((k,), dtype=torch.float64, device=gram.device)
    new_target = _alloc((k, k), dtype=torch.float64, device=gram.device)
    _gradvac_kernel[(1,)](
        gram, gram.stride(0), gram.stride(1), order.contiguous(), target.contiguous(), w, new_target,
        *fp32_pair(beta), *fp32_pair(eps),
        K=k, KP=max(2, next_pow2(k)), ON_CONFLICT=bool(on_conflict), num_warps=1 if k <= 16 else 4,
    )  # fmt: skip
    return w, new_target
