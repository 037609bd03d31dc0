"""Goodnight's SWEEP operator on a symmetric [KP, KP] tile in registers, shared by the K x K
solvers' kernels (:mod:`.min_norm`, :mod:`.dual_cone`), and its torch reference.

Sweeping pivot p of a symmetric A, with ``d = A_pp`` and r = row p (Beaton 1964; Goodnight,
"A tutorial on the SWEEP operator", 1979)::

    A_ij <- A_ij - r_i r_j / d (i, j != p),   A_pj = A_jp <- s r_j / d,   A_pp <- -1/d

s = +1 sweeps, s = -1 reverse-sweeps (undoing the sweep exactly, up to rounding); the tile
stays symmetric. After sweeping the pivots of a set S of a symmetric positive definite matrix,
``A_SS = -(A_SS before)^-1``: an active-set method adds or removes one index of its support
with one rank-one update (one row read by a reduction) instead of a new factorisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["sweep_pivot", "sweep_reference"]


@triton.jit
def sweep_pivot(swept, p, sign, ii, jj, r):
    """Sweep (sign = +1) or reverse-sweep (sign = -1) pivot p of the symmetric tile ``swept``
    (row index ii = r[:, None], column index jj = r[None, :]); p < 0 leaves it unchanged."""
    row = tl.sum(tl.where(ii == p, swept, 0.0), axis=0)  # row p, indexed by column
    d = tl.sum(tl.where(r == p, row, 0.0), axis=0)
    d = tl.where(p >= 0, d, 1.0)
    scaled = sign * row / d
    out = swept - row[:, None] * row[None, :] / d
    out = tl.where(ii == p, scaled[None, :], out)
    out = tl.where(jj == p, scaled[:, None], out)
    out = tl.where((ii == p) & (jj == p), -1.0 / d, out)
    return tl.where(p >= 0, out, swept)


def sweep_reference(a: Tensor, p: int, sign: float) -> Tensor:
    """:func:`sweep_pivot` on a float64 torch matrix (Python index p)."""
    d = a[p, p]
    row = a[p].clone()
    out = a - torch.outer(row, row) / d
    out[p, :] = sign * row / d
    out[:, p] = sign * row / d
    out[p, p] = -1.0 / d
    return out
