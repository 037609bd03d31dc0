"""The passes over the gradient store: ``gram``, ``combine`` and GradDrop's ``graddrop``.

Memory traffic per balanced step (K task rows of N elements, s bytes each): ``gram`` reads
K*N*s bytes, ``combine`` reads K*N*s and writes N*s; the floor is (2K + 1) N s bytes.
Between the two passes only K x K work runs (:mod:`gradbal.methods`). ``graddrop`` takes the
place of ``combine`` for GradDrop: it reads the rows and N uniforms and writes N*s.

This module is the seam where the fused Triton kernels (``gradbal.kernels``) plug in. The
backend is chosen per call: ``"torch"`` (chunked matmul / matrix-vector product, any
device), ``"triton"`` (CUDA tensors, when ``gradbal.kernels`` provides the ops), or
``"auto"`` (default: Triton for CUDA tensors when available, torch otherwise). The
environment variable ``GRADBAL_BACKEND`` overrides ``"auto"``. ``"auto"`` keeps float64 rows
on torch (the kernels read fp32/bf16/fp16). A Triton failure under ``"auto"`` (a GPU the
kernels cannot compile for) warns once and switches this process to torch; under an explicit
``"triton"`` it raises.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor

__all__ = ["combine", "graddrop", "gram", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")

# Columns per fp32 partial product: bounds the fp32 rounding error of each partial dot
# product (they are summed in float64) and the temporary upcast copy for bf16/fp16 rows.
_CHUNK = 1 << 20

# Up to this K the CPU Gram pass uses one dot product per pair instead of a matmul
# (measured on the 2-core CPU VM, 1 thread, N = 1M / 4M / 11M: K = 3 pairs 0.79 / 5.2 / 12.6 ms
# against blocks 1.20 / 6.6 / 16.5; K = 4 pairs 1.07 / 7.1 / 19.4 against blocks
# 1.09 / 5.9 / 15.8).
_PAIRWISE_MAX_K = 3
# Above it, the CPU pass multiplies cache-sized column blocks (one batched matmul over the
# blocks of a chunk): BLAS runs a thin [K, 1M] @ [1M, K] product far below memory speed
# (measured on the 2-core CPU VM, 1 thread, K = 8, N = 4M: 44 ms as 1M-column chunks, 19 ms
# as 4096-column blocks).
_CPU_BLOCK = 1 << 12
# Up to this K the torch combine pass is one fused multiply-add per row; above, one gemv.
_ROWWISE_MAX_K = 2

# Columns per block of the torch GradDrop pass (CPU: the accumulators stay in cache; GPU: few
# launches).
_GRADDROP_BLOCK = 1 << 16
_GRADDROP_GPU_BLOCK = 1 << 22

# Row dtypes the Triton kernels read; "auto" sends other rows (float64) to torch.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_triton_failed = False


@functools.lru_cache(maxsize=8)
def kernel_function(name: str):
    """``gradbal.kernels.<name>`` (the K x K stage's kernels: ``jacobi_eigh``, ``min_norm``), or
    None without Triton. Imported on first use: importing Triton is slow and optional."""
    try:
        from gradbal import kernels
    except Exception:  # noqa: BLE001 - any import failure means "no Triton here"
        return None
    if not getattr(kernels, "AVAILABLE", False):
        return None
    return getattr(kernels, name, None)


@functools.lru_cache(maxsize=1)
def _triton_ops():
    """gradbal.kernels' (gram, combine, graddrop) or None when Triton or the kernels are
    missing."""
    try:
        from gradbal import kernels
    except Exception:  # noqa: BLE001 - any import failure means "no Triton here"
        return None
    fns = tuple(getattr(kernels, name, None) for name in ("gram", "combine", "graddrop"))
    if any(fn is None for fn in fns) or not getattr(kernels, "AVAILABLE", False):
        return None
    return fns


def env_backend() -> str:
    """The ``GRADBAL_BACKEND`` override of ``"auto"`` ("auto" when unset or empty); also read
    by :func:`gradbal.solvers_qp.sym_eig` for its eigendecomposition kernel."""
    backend = os.environ.get("GRADBAL_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(
            f"GRADBAL_BACKEND must be one of {BACKENDS}, got {os.environ['GRADBAL_BACKEND']!r}"
        )
    return backend


def resolve_backend(rows: Tensor, backend: str = "auto") -> str:
    """The backend that will run for ``rows``: "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = env_backend()
    if backend == "auto":
        use_triton = (
            rows.is_cuda
            and rows.dtype in _KERNEL_DTYPES
            and not _triton_failed
            and _triton_ops() is not None
        )
        return "triton" if use_triton else "torch"
    if backend == "triton" and _triton_ops() is None:
        raise RuntimeError(
            "backend='triton' was requested but gradbal.kernels is unavailable "
            "(install the 'triton' extra, or use backend='torch')"
        )
    return backend


def warn_kernel_failure(what: str, instead: str, err: Exception, stacklevel: int) -> None:
    """The one warning when a Triton kernel fails (a GPU Triton cannot compile for) and
    ``instead`` runs for the rest of the process; ``stacklevel`` counts from the caller."""
    warnings.warn(
        f"gradbal: {what} failed ({type(err).__name__}: {err}); falling back to {instead} "
        "for the rest of this process",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def _fallback(err: Exception) -> None:
    global _triton_failed
    _triton_failed = True
    # _fallback, _dispatch, the pass: point at the pass's caller
    warn_kernel_failure("Triton kernels", "torch ops", err, stacklevel=4)


def gram_torch(rows: Tensor) -> Tensor:
    """Reference Gram pass: ``G = rows @ rows.T`` as float64, summing per-chunk partial
    products computed in fp32 (fp64 for fp64 rows)."""
    k, n = rows.shape
    # On CPUs, for K <= _PAIRWISE_MAX_K one dot product per pair streams faster than BLAS
    # gemm, which runs such thin products far below memory speed (measured: 3 dots 4 ms vs
    # gemm 10 ms for K=2, N=11M), and faster than the blocked matmul (see _PAIRWISE_MAX_K).
    if rows.device.type == "cpu" and k <= _PAIRWISE_MAX_K:
        return _gram_cpu_pairs(rows)
    acc = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    for start in range(0, n, _CHUNK):
        block = rows[:, start : start + _CHUNK]
        if block.dtype not in (torch.float32, torch.float64):
            block = block.float()  # half types: multiply in fp32
        if rows.device.type == "cpu":
            acc += _gram_cpu_blocks(block)
        else:
            acc += (block @ block.T).double()
    return acc


@functools.lru_cache(maxsize=8)
def _pair_index(k: int) -> tuple[list[tuple[int, int]], Tensor]:
    """The row-major upper-triangle pairs (i, j), i <= j, of range(k), and for every entry
    (i, j) of a [k, k] matrix the position of its pair in that list ([k * k] int64)."""
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    pos = {p: n for n, p in enumerate(pairs)}
    index = [pos[(min(i, j), max(i, j))] for i in range(k) for j in range(k)]
    return pairs, torch.tensor(index, dtype=torch.int64)


def _gram_cpu_pairs(rows: Tensor) -> Tensor:
    """:func:`gram_torch` on the CPU for few rows: one dot product per pair and chunk, the
    K(K + 1)/2 sums gathered into the symmetric matrix at the end (at K = 2 and one chunk,
    9 top-level ops where the scatter into an upper triangle took 25; each small op costs
    a few us, and gram + combine at K = 2, N = 1M went from 0.73 to 0.66 ms on the 2-core
    VM)."""
    k, n = rows.shape
    pairs, index = _pair_index(k)
    dots = None
    for start in range(0, n, _CHUNK):
        block = rows[:, start : start + _CHUNK]
        if block.dtype not in (torch.float32, torch.float64):
            block = block.float()  # half types: multiply in fp32
        r = block.unbind(0)
        part = torch.stack([torch.dot(r[i], r[j]) for i, j in pairs]).double()
        dots = part if dots is None else dots.add_(part)
    if dots is None:  # N = 0
        return torch.zeros(k, k, dtype=torch.float64)
    return dots[index].view(k, k)


def _gram_cpu_blocks(block: Tensor) -> Tensor:
    """``block @ block.T`` as float64, from fp32 products over ``_CPU_BLOCK``-column blocks.

    The [K, nb * B] head is viewed as [nb, K, B] (no copy) for one batched matmul; the
    [nb, K, K] partial products are summed in float64, the tail gets one plain product."""
    k, n = block.shape
    nb = n // _CPU_BLOCK
    head = block[:, : nb * _CPU_BLOCK].reshape(k, nb, _CPU_BLOCK).transpose(0, 1)
    acc = torch.bmm(head, head.transpose(1, 2)).double().sum(0)
    tail = block[:, nb * _CPU_BLOCK :]
    return acc + (tail @ tail.T).double()


def combine_torch(rows: Tensor, weights: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
    """Reference combine pass: ``out (+)= weights @ rows`` with fp32 (or wider) arithmetic.

    ``out`` must not overlap ``rows`` here (the store keeps them apart)."""
    if rows.dtype in (torch.float32, torch.float64) and out.dtype == rows.dtype:
        w = weights.to(rows.dtype)
        if rows.shape[0] > _ROWWISE_MAX_K:
            # gemv over rows.T writes ``out`` once (measured on the 2-core CPU VM, 1 thread,
            # K = 16, N = 1M: 3.3 ms against 3.8 ms for the row-wise pass, which reads and
            # writes it K times).
            if accumulate:
                return out.addmv_(rows.T, w)
            return torch.mv(rows.T, w, out=out)
        # Few rows: one fused multiply-add per row streams faster than gemv (same VM, K = 2,
        # N = 1M: 0.24 ms against 0.51 ms for ``w @ rows``).
        r, ws = rows.unbind(0), w.unbind(0)
        if not accumulate:
            torch.mul(r[0], ws[0], out=out)
        for k in range(0 if accumulate else 1, rows.shape[0]):
            out.addcmul_(r[k], ws[k])
        return out
    w = weights.float()
    for start in range(0, rows.shape[1], _CHUNK):
        part = w @ rows[:, start : start + _CHUNK].float()
        dst = out[start : start + _CHUNK]
        if accumulate:
            part += dst.float()
        dst.copy_(part)
    return out


def _span(t: Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a 1-D or 2-D strided tensor can touch."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether the memory ``a`` and ``b`` can touch overlaps (metadata only: no host sync).
    Another part of the same storage, such as a spare row of a [K + 1, N] buffer, does not."""
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _dispatch(kernel: int, torch_pass, rows: Tensor, backend: str, *args, **kwargs):
    """Run ``gradbal.kernels``' pass number ``kernel`` (0 gram, 1 combine, 2 graddrop) when
    ``backend`` resolves to Triton, else ``torch_pass``; same arguments for both. A Triton
    failure falls back to torch (warning once) under "auto" and raises under "triton"."""
    if resolve_backend(rows, backend) == "triton":
        try:
            return _triton_ops()[kernel](rows, *args, **kwargs)
        except Exception as err:
            if backend == "triton":
                raise
            _fallback(err)
    return torch_pass(rows, *args, **kwargs)


def gram(rows: Tensor, backend: str = "auto") -> Tensor:
    """Gram matrix ``[K, K]`` (float64) of the rows of a ``[K, N]`` gradient matrix."""
    return _dispatch(0, gram_torch, rows, backend)


def combine(
    rows: Tensor, weights: Tensor, out: Tensor, accumulate: bool = False, backend: str = "auto"
) -> Tensor:
    """Write ``sum_k weights[k] * rows[k]`` into ``out`` (or add it when ``accumulate``)."""
    return _dispatch(1, combine_torch, rows, backend, weights, out, accumulate=accumulate)


def graddrop_torch(
    rows: Tensor,
    noise: Tensor,
    out: Tensor,
    accumulate: bool = False,
    leak: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """GradDrop's elementwise pass with torch ops, block by block: the reference the Triton
    kernel (gradbal.kernels.graddrop) matches bit for bit (same operations, same order).

    Per column c, with x_i = rows[i, c] in the noise's dtype (fp32, or float64 for float64
    rows) and u = noise[c]: ``pos = sum_i max(x_i, 0)``, ``neg = sum_i min(x_i, 0)`` (row 0
    first, NaN kept), ``total = pos - neg``, ``keep = 0.5 * (1 + (total > 0 ? (pos + neg) /
    total : 0)) > u``, ``res = keep ? pos : neg``, or with ``leak = (l, d)`` (d = 1 - l):
    ``res = sum_i l_i x_i + (keep ? sum_i d_i max(x_i, 0) : sum_i d_i min(x_i, 0))``; where
    ``total`` is not finite (an inf or NaN entry) ``res = pos + neg``, the plain sum; finally
    ``res + 0.0`` (a zero result is +0.0 whatever the device's max/min do with -0.0).
    ``out[c] = res`` rounded to ``out.dtype`` (``out[c] += round(res)`` when accumulating).
    ``noise`` may be ``out`` itself (each block reads its noise before writing its result);
    ``out`` must not overlap ``rows``.
    """
    k, n = rows.shape
    if k == 0:
        if not accumulate:
            out.zero_()
        return out
    work = noise.dtype
    dev = rows.device
    size = max(1, min(n, _GRADDROP_BLOCK if dev.type == "cpu" else _GRADDROP_GPU_BLOCK))
    bufs = [torch.empty(size, dtype=work, device=dev) for _ in range(3 if leak is None else 7)]
    if leak is not None:
        keep, drop = (v.to(device=dev, dtype=work) for v in leak)
    for start in range(0, n, size):
        block = rows[:, start : start + size]
        m = block.shape[1]
        pos, neg, tmp = (b[:m] for b in bufs[:3])
        if leak is not None:
            base, pos_d, neg_d, xn = (b[:m] for b in bufs[3:])
        for i in range(k):
            x = block[i] if block.dtype == work else block[i].to(work)
            if leak is None:
                if i == 0:
                    torch.clamp_min(x, 0, out=pos)
                    torch.clamp_max(x, 0, out=neg)
                else:
                    pos.add_(torch.clamp_min(x, 0, out=tmp))
                    neg.add_(torch.clamp_max(x, 0, out=tmp))
                continue
            # One rounded product, then one rounded sum (the kernel runs without FMA).
            xp = torch.clamp_min(x, 0, out=pos if i == 0 else tmp)
            torch.clamp_max(x, 0, out=neg if i == 0 else xn)
            if i == 0:
                torch.mul(x, keep[0], out=base)
                torch.mul(pos, drop[0], out=pos_d)
                torch.mul(neg, drop[0], out=neg_d)
            else:
                pos.add_(xp)
                neg.add_(xn)
                neg_d.add_(xn.mul_(drop[i]))
                pos_d.add_(xp.mul_(drop[i]))
                base.add_(torch.mul(x, keep[i], out=tmp))
        signed = pos + neg
        total = pos - neg
        has_total = total > 0
        ratio = torch.where(has_total, signed / torch.where(has_total, total, 1.0), 0.0)
        keep_positive = 0.5 * (1 + ratio) > noise[start : start + m]
        if leak is None:
            res = torch.where(keep_positive, pos, neg)
        else:
            res = base + torch.where(keep_positive, pos_d, neg_d)
        res = torch.where(torch.isfinite(total), res, signed).add_(0.0)
        dst = out[start : start + m]
        if accumulate:
            dst.add_(res.to(dst.dtype))
        else:
            dst.copy_(res)
    return out


def graddrop(
    rows: Tensor,
    noise: Tensor,
    out: Tensor,
    accumulate: bool = False,
    leak: tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> Tensor:
    """GradDrop's pass: write (or add) the surviving sum of ``rows`` into ``out``, deciding each
    column by its sign purity against ``noise`` (uniforms the caller drew from its seeded
    generator). Both backends give the same bits for the same inputs."""
    return _dispatch(
        2, graddrop_torch, rows, backend, noise, out, accumulate=accumulate, leak=leak
    )
