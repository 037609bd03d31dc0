"""Functional form: balance a materialised [K, N] matrix of task gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _ops
from .methods import Method, get_method
from .methods._common import device_generator, draw_seed

__all__ = ["aggregate"]


def aggregate(
    grads: Tensor,
    method: str | Method = "mokd",
    losses: Tensor | Sequence[float] | None = None,
    *,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    validate: bool = True,
    out: Tensor | None = None,
    **method_options: Any,
) -> Tensor:
    """Balanced direction ``d = sum_k w_k g_k`` of the rows of ``grads``.

    The same two passes as the optimizer: ``G = grads grads^T`` (float64), the method's
    weights from G (and ``losses``), then the weighted combination. Methods that never read
    G (``Method.needs_gram = False``: sum, mean, weighted, rlw and the loss-based methods)
    skip the Gram pass; elementwise methods (``graddrop``) run their own single pass.

    Args:
        grads: [K, N] task gradients (K >= 1), floating point.
        method: a registered name (see :func:`gradbal.available_methods`) or a Method.
        losses: [K] loss values, required by loss-aware methods such as ``"mokd"``.
        generator: seeded CPU generator for random methods (``"pcgrad"``, ``"rlw"``,
            ``"graddrop"``); ``None`` uses torch's global RNG.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`gradbal._ops`).
        validate: check the loss values' signs for log-scaling methods; this reads them on
            the host (a sync on GPU). ``False`` makes the call sync-free.
        out: optional [N] tensor (``grads``' dtype and device, not overlapping ``grads``)
            to write the result into, as torch's ``out=`` arguments: a training loop that
            calls ``aggregate`` every step then allocates nothing N-sized (a fresh
            multi-megabyte buffer costs page faults on every first write).
        **method_options: options of the named method.

    Returns:
        [N] tensor with ``grads``' dtype and device (``out`` when given).
    """
    if not isinstance(grads, Tensor) or grads.ndim != 2 or not grads.is_floating_point():
        raise ValueError(
            "grads must be a floating-point [K, N] tensor (one row per objective); got "
            f"{type(grads).__name__}"
            + (f" of shape {tuple(grads.shape)} and dtype {grads.dtype}" if isinstance(grads, Tensor) else "")
        )
    m = get_method(method, **method_options)
    k = grads.shape[0]
    if k < 1:
        raise ValueError("grads has no rows; pass at least one objective's gradient")
    m.check_num_objectives(k)
    loss_values = None
    if losses is not None:
        if (
            isinstance(losses, Tensor)
            and losses.dtype == torch.float64
            and losses.device == grads.device
            and not losses.requires_grad
        ):
            loss_values = losses  # the common case, without three no-op dispatches
        else:
            loss_values = torch.as_tensor(losses).detach().to(device=grads.device, dtype=torch.float64)
        if loss_values.shape != (k,):
            raise ValueError(f"losses must have shape ({k},) to match grads, got {tuple(loss_values.shape)}")
        if validate and m.requires_nonnegative_losses and bool((loss_values < 0).any()):
            raise ValueError(
                f"method {m.name!r} scales by log-losses and needs losses >= 0, got "
                f"{loss_values.tolist()}; turn log_scale off for signed objectives"
            )
    elif m.requires_losses:
        raise ValueError(f"method {m.name!r} needs the loss values: pass losses=[...]")
    rows = grads.contiguous()
    if out is None:
        out = torch.empty(rows.shape[1], dtype=rows.dtype, device=rows.device)
    else:
        _check_out(out, rows)
    if m.elementwise:
        # Its own pass over the rows, with noise made on their device from ``generator``.
        device_gen = device_generator(draw_seed(generator), rows.device)
        return m.combine(rows, out, False, device_gen, backend=backend)
    if m.needs_gram:
        gram = _ops.gram(rows, backend=backend)
    else:
        # Fixed, random and loss-based weightings never read G: skip its pass. K comes from
        # the loss values (NaN when the caller gave none).
        gram = None
        if loss_values is None:
            loss_values = torch.full((k,), float("nan"), dtype=torch.float64, device=rows.device)
    weights = m.weights(gram, loss_values, generator)
    return _ops.combine(rows, weights, out, backend=backend)


def _check_out(out: Tensor, rows: Tensor) -> None:
    """``out`` must be a [N] tensor of the rows' dtype and device that shares no memory
    with them (the combine pass reads every row while it writes ``out``)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    n = rows.shape[1]
    if out.shape != (n,) or out.dtype != rows.dtype or out.device != rows.device:
        raise ValueError(
            f"out must be a [{n}] tensor of dtype {rows.dtype} on {rows.device} (like one row "
            f"of grads); got shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous; pass out.contiguous() and copy back")
    if n and _ops.overlaps(out, rows):  # a spare row of a [K + 1, N] buffer is fine
        raise ValueError("out shares memory with grads; pass a separate buffer")
