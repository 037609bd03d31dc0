"""The two passes over the gradient store: ``gram`` and ``combine``.

Memory traffic per balanced step (K task rows of N elements, s bytes each): ``gram`` reads
K*N*s bytes, ``combine`` reads K*N*s and writes N*s; the floor is (2K + 1) N s bytes.
Between the two passes only K x K work runs (:mod:`gradbal.methods`).

This module is the seam where the fused Triton kernels (``gradbal.kernels``) plug in. The
backend is chosen per call: ``"torch"`` (chunked matmul / matrix-vector product, any
device), ``"triton"`` (CUDA tensors, when ``gradbal.kernels`` provides the ops), or
``"auto"`` (default: Triton for CUDA tensors when available, torch otherwise). The
environment variable ``GRADBAL_BACKEND`` overrides ``"auto"``.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor

__all__ = ["combine", "gram", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")

# Columns per fp32 partial product: bounds the fp32 rounding error of each partial dot
# product (they are summed in float64) and the temporary upcast copy for bf16/fp16 rows.
_CHUNK = 1 << 20

# Up to this K the CPU Gram pass uses one dot product per pair instead of a matmul.
_PAIRWISE_MAX_K = 4

_triton_failed = False


@functools.lru_cache(maxsize=1)
def _triton_ops():
    """gradbal.kernels' (gram, combine) or None when Triton or the kernels are missing."""
    try:
        from gradbal import kernels
    except Exception:  # noqa: BLE001 - any import failure means "no Triton here"
        return None
    gram_fn = getattr(kernels, "gram", None)
    combine_fn = getattr(kernels, "combine", None)
    if gram_fn is None or combine_fn is None or not getattr(kernels, "AVAILABLE", False):
        return None
    return gram_fn, combine_fn


def resolve_backend(rows: Tensor, backend: str = "auto") -> str:
    """The backend that will run for ``rows``: "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("GRADBAL_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"GRADBAL_BACKEND must be one of {BACKENDS}, got {os.environ['GRADBAL_BACKEND']!r}"
            )
    if backend == "auto":
        use_triton = rows.is_cuda and not _triton_failed and _triton_ops() is not None
        return "triton" if use_triton else "torch"
    if backend == "triton" and _triton_ops() is None:
        raise RuntimeError(
            "backend='triton' was requested but gradbal.kernels is unavailable "
            "(install the 'triton' extra, or use backend='torch')"
        )
    return backend


def _fallback(err: Exception) -> None:
    global _triton_failed
    _triton_failed = True
    warnings.warn(
        f"gradbal: Triton kernels failed ({type(err).__name__}: {err}); falling back to torch "
        "ops for the rest of this process",
        RuntimeWarning,
        stacklevel=3,
    )


def gram_torch(rows: Tensor) -> Tensor:
    """Reference Gram pass: ``G = rows @ rows.T`` as float64, summing per-chunk partial
    products computed in fp32 (fp64 for fp64 rows)."""
    k, n = rows.shape
    acc = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    # On CPUs, BLAS gemm with an inner dimension of K <= 4 runs far below memory speed while
    # one dot product per pair streams (measured: 3 dots 4 ms vs gemm 10 ms for K=2, N=11M).
    pairwise = rows.device.type == "cpu" and k <= _PAIRWISE_MAX_K
    pairs = [(i, j) for i in range(k) for j in range(i, k)]  # row-major upper triangle
    upper = torch.triu_indices(k, k, device=rows.device) if pairwise else None
    for start in range(0, n, _CHUNK):
        block = rows[:, start : start + _CHUNK]
        if block.dtype not in (torch.float32, torch.float64):
            block = block.float()  # half types: multiply in fp32
        if pairwise:
            dots = torch.stack([torch.dot(block[i], block[j]) for i, j in pairs])
            acc[upper[0], upper[1]] += dots.double()
        else:
            acc += (block @ block.T).double()
    if pairwise:
        acc = acc + acc.triu(1).T
    return acc


def combine_torch(rows: Tensor, weights: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
    """Reference combine pass: ``out (+)= weights @ rows`` with fp32 (or wider) arithmetic.

    ``out`` must not overlap ``rows`` here (the store keeps them apart)."""
    if rows.dtype in (torch.float32, torch.float64) and out.dtype == rows.dtype:
        w = weights.to(rows.dtype)
        # One fused multiply-add per row streams faster than gemv over rows.T (which strides
        # across the K rows) on CPUs; on GPUs the Triton kernel takes this pass.
        if not accumulate:
            torch.mul(rows[0], w[0], out=out)
        for k in range(0 if accumulate else 1, rows.shape[0]):
            out.addcmul_(rows[k], w[k])
        return out
    w = weights.float()
    for start in range(0, rows.shape[1], _CHUNK):
        part = w @ rows[:, start : start + _CHUNK].float()
        dst = out[start : start + _CHUNK]
        if accumulate:
            part += dst.float()
        dst.copy_(part)
    return out


def gram(rows: Tensor, backend: str = "auto") -> Tensor:
    """Gram matrix ``[K, K]`` (float64) of the rows of a ``[K, N]`` gradient matrix."""
    if resolve_backend(rows, backend) == "triton":
        try:
            return _triton_ops()[0](rows)
        except Exception as err:
            if backend == "triton":
                raise
            _fallback(err)
    return gram_torch(rows)


def combine(
    rows: Tensor, weights: Tensor, out: Tensor, accumulate: bool = False, backend: str = "auto"
) -> Tensor:
    """Write ``sum_k weights[k] * rows[k]`` into ``out`` (or add it when ``accumulate``)."""
    if resolve_backend(rows, backend) == "triton":
        try:
            return _triton_ops()[1](rows, weights, out, accumulate=accumulate)
        except Exception as err:
            if backend == "triton":
                raise
            _fallback(err)
    return combine_torch(rows, weights, out, accumulate)
