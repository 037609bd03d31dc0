"""Gram matrices shared by the method tests: random well-conditioned ones and the degenerate
cases the issue lists (rank-deficient, zero row, equal rows, opposite rows, mixed scales)."""

from __future__ import annotations

import torch

F64 = torch.float64


def rand_jacobian(k: int, n: int | None = None, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, n if n is not None else k + 5, generator=gen, dtype=F64)


def well_conditioned(k: int, seed: int = 0) -> torch.Tensor:
    """Random Gram matrix with condition number below ~1e3 (K + 5 random directions)."""
    j = rand_jacobian(k, 3 * k + 5, seed)
    return j @ j.T


def degenerate(k: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    j = rand_jacobian(k, k + 5, seed)
    cases = {}
    low = rand_jacobian(k, 2, seed)  # rank 2
    cases["rank_deficient"] = low @ low.T
    z = j.clone()
    z[1] = 0
    cases["zero_row"] = z @ z.T
    e = j.clone()
    e[2] = e[0]
    cases["equal_rows"] = e @ e.T
    o = j.clone()
    o[1] = -o[0]
    cases["opposite_rows"] = o @ o.T
    cases["zero_matrix"] = torch.zeros(k, k, dtype=F64)
    j16 = rand_jacobian(16, 40, seed)
    scales = torch.logspace(-6, 6, 16, dtype=F64)[torch.randperm(16, generator=torch.Generator().manual_seed(seed))]
    m = j16 * scales.unsqueeze(1)
    cases["k16_mixed_scales"] = m @ m.T
    return cases


def opposite_pair() -> torch.Tensor:
    j = torch.tensor([[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]], dtype=F64)
    return j @ j.T
