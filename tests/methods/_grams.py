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


#: The kinds of :func:`stress_pairs`, in turn.
PAIR_KINDS = (
    "random", "parallel", "opposite", "nearly_opposite", "zero_row", "both_zero",
    "decades_12", "decades_12_reversed", "orthogonal", "nearly_parallel",
)


def stress_pairs(count: int = 400, seed: int = 0) -> list[torch.Tensor]:
    """Jacobians [2, n] of hard pairs, the kinds of ``PAIR_KINDS`` in turn: random, parallel
    (positive multiple), opposite (negative multiple), nearly opposite (g_2 = -g_1 + 1e-9
    noise), g_1 = 0, both 0, norms 12 decades apart (either way), orthogonal, nearly parallel
    (1e-9 noise); random lengths n = 1..8 and scales 1e-3..1e3."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in range(count):
        kind = PAIR_KINDS[c % len(PAIR_KINDS)]
        n = int(torch.randint(2 if kind == "orthogonal" else 1, 9, (1,), generator=gen))
        j = torch.randn(2, n, generator=gen, dtype=F64)
        j = j * 10.0 ** (6 * float(torch.rand(1, generator=gen, dtype=F64)) - 3)
        a = 0.1 + 3 * float(torch.rand(1, generator=gen, dtype=F64))
        noise = 1e-9 * j[0].norm() * torch.randn(n, generator=gen, dtype=F64)
        if kind == "parallel":
            j[1] = a * j[0]
        elif kind == "opposite":
            j[1] = -a * j[0]
        elif kind == "nearly_opposite":
            j[1] = -j[0] + noise
        elif kind == "zero_row":
            j[0] = 0
        elif kind == "both_zero":
            j.zero_()
        elif kind == "decades_12":
            j[1] *= 1e-12
        elif kind == "decades_12_reversed":
            j[0] *= 1e-12
        elif kind == "orthogonal":
            j[1] -= (j[1] @ j[0]) / (j[0] @ j[0]) * j[0]
        elif kind == "nearly_parallel":
            j[1] = j[0] + noise
        out.append(j)
    return out


def k2_pairs(count, seed=0):
    """(kind, 2 x 2 Gram matrix): random; parallel; opposite; one zero row (either); both
    zero; nearly opposite inside the rank cut (g_2 = -2 g_1 + 1e-5 noise) and outside it
    (1e-3 noise); norms 12 decades apart; nearly parallel (kept: 1e-3 noise; cut: 1e-9);
    orthogonal with equal norms (G = c I: no eigenbasis); correlated; rank-deficient (one
    coordinate, so every pair is parallel or opposite)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        kind = i % 13
        j = torch.randn(2, 2 + i % 4, generator=gen, dtype=F64)
        noise = torch.randn(j.shape[1], generator=gen, dtype=F64)
        if kind == 1:
            j[1] = 3 * j[0]
        elif kind == 2:
            j[1] = -0.5 * j[0]
        elif kind == 3:
            j[(i // 13) % 2] = 0
        elif kind == 4:
            j.zero_()
        elif kind in (5, 6):
            j[1] = -2 * j[0] + (1e-5 if kind == 5 else 1e-3) * noise
        elif kind == 7:
            j = j * torch.tensor([[1e-6], [1e6]], dtype=F64)
        elif kind in (8, 9):
            j[1] = 2 * j[0] + (1e-3 if kind == 8 else 1e-9) * noise
        elif kind == 10:
            j = torch.zeros(2, 3, dtype=F64)
            j[0, 0] = j[1, 1] = 1.5 + i / count
        elif kind == 11:
            j[1] = 0.7 * j[0] + 1e-2 * noise
        elif kind == 12:
            j = torch.randn(2, 1, generator=gen, dtype=F64)
        out.append((kind, j @ j.T))
    return out
