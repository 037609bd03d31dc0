"""Launch helpers shared by the kernels: argument checks and the persistent grid size.

Nothing here reads tensor values, so nothing here synchronises with the host.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_DTYPES", "check_kxk", "check_rows", "check_vector", "next_pow2", "num_programs",
]

#: Element types of the gradient store the kernels read (they accumulate in fp32).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Programs per "SM" when running under Triton's CPU interpreter. The interpreter runs programs
# one after another, so this only sets how many partial results the tests see; it is kept
# small so each program loops over several column blocks (the persistent-loop path).
_INTERPRETER_SMS = 4


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (Triton block shapes must be powers of two)."""
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs(rows: Tensor, num_blocks: int, per_sm: int, interpreted: bool) -> int:
    """Persistent grid: about ``per_sm`` programs per SM, never more than there are blocks
    (and at least one, so an empty store still writes its zero partials)."""
    if interpreted or not rows.is_cuda:
        sms = _INTERPRETER_SMS
    else:
        sms = _sm_count(rows.device.index if rows.device.index is not None else 0)
    return max(1, min(num_blocks, sms * per_sm))


def check_rows(rows: Tensor, interpreted: bool, what: str) -> None:
    """Shape/layout/device checks on the [K, N] store (metadata only: no host sync)."""
    if not isinstance(rows, Tensor) or rows.dim() != 2:
        raise ValueError(
            f"{what}: rows must be a 2-D [K, N] tensor, got {getattr(rows, 'shape', rows)}"
        )
    if rows.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: rows dtype must be one of {SUPPORTED_DTYPES}, got {rows.dtype}")
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        raise ValueError(
            f"{what}: rows must have contiguous rows (column stride 1), got strides {rows.stride()}"
        )
    if not interpreted and not rows.is_cuda:
        raise ValueError(
            f"{what}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
            "gradbal.kernels is imported); use gradbal._ops' torch backend for CPU tensors"
        )


def check_vector(t: Tensor, n: int, what: str, dtypes, device, op: str) -> None:
    """Checks on a 1-D [N] operand of pass ``op`` (``out``, GradDrop's noise): its length,
    dtype, unit stride and device (metadata only: no host sync)."""
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(
            f"{op}: {what} must be a 1-D tensor of {n} elements, got {getattr(t, 'shape', t)}"
        )
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {what} dtype must be one of {dtypes}, got {t.dtype}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{op}: {what} must be contiguous, got stride {t.stride(0)}")
    if t.device != device:
        raise ValueError(f"{op}: {what} is on {t.device}, rows on {device}")


#: Largest K of the K x K stage's one-program kernels (eigh, min_norm, dual_cone): their
#: [KP, KP] float64 tiles live in registers.
KXK_MAX_K = 32
#: Dtypes of the Gram matrices those kernels read (they compute in float64).
KXK_DTYPES = (torch.float64, torch.float32)


def check_kxk(
    gram: Tensor, where: str, instead: str, interpreted: bool, batched: bool = True
) -> int:
    """K of a ``[..., K, K]`` (``[K, K]`` unless ``batched``) Gram matrix a K x K kernel can
    read (1 <= K <= 32, float64 or float32, on CUDA unless ``interpreted``); ValueError or
    TypeError naming the problem, and for a CPU tensor ``instead`` (the torch function)."""
    square = isinstance(gram, Tensor) and gram.dim() >= 2 and gram.shape[-1] == gram.shape[-2]
    if not square or (not batched and gram.dim() != 2):
        shape = "[..., K, K]" if batched else "[K, K]"
        raise ValueError(f"{where}: the matrix must be a {shape} tensor, got "
                         f"{getattr(gram, 'shape', type(gram))}")
    k = gram.shape[-1]
    if not 1 <= k <= KXK_MAX_K:
        raise ValueError(f"{where}: K must be in [1, {KXK_MAX_K}], got {k}")
    if gram.dtype not in KXK_DTYPES:
        raise TypeError(f"{where}: the matrix's dtype must be one of {KXK_DTYPES}, got {gram.dtype}")
    if not interpreted and not gram.is_cuda:
        raise ValueError(
            f"{where}: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1 set before "
            f"gradbal.kernels is imported); use {instead} for CPU tensors"
        )
    return k
