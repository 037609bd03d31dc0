"""K = 2 closed form of PCGrad: against the general path (the K - 1 rounds, forced to K = 2:
the same bits) and against the paper's formula written plainly in numpy on the Gram entries
(1e-12 relative), over the stress pairs of ``_grams.stress_pairs`` as fp64 Gram matrices and
as fp32 ones (which may miss PSD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradbal.methods import get_method
from gradbal.methods.pcgrad import PCGrad

from ._grams import F64, PAIR_KINDS, stress_pairs

#: The only order at K = 2: each objective has one other.
ORDER = torch.tensor([[1], [0]])
PAIRS = stress_pairs(400)
GRAMS = [j @ j.T for j in PAIRS] + [(j @ j.T).float().double() for j in PAIRS[::4]]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _after_draws(seed: int, count: int = 1) -> torch.Tensor:
    """The generator's state after ``count`` draws of the K = 2 orders' keys."""
    gen = _gen(seed)
    for _ in range(count):
        torch.rand(2, 2, generator=gen, dtype=F64)
    return gen.get_state()


def test_stress_pairs_cover_the_kinds():
    assert len(PAIRS) == 400 and len(PAIR_KINDS) == 10
    norms = torch.stack([j.norm(dim=1) for j in PAIRS])
    cos = torch.stack([(j[0] @ j[1]) / (j[0].norm() * j[1].norm()) for j in PAIRS]).view(40, 10)
    for kind, want in (("parallel", 1.0), ("opposite", -1.0), ("nearly_opposite", -1.0),
                       ("orthogonal", 0.0), ("nearly_parallel", 1.0)):
        got = cos[:, PAIR_KINDS.index(kind)]
        assert torch.allclose(got, torch.full_like(got, want), atol=1e-7), kind
    assert (cos[:, 3] > -1).any()  # nearly, not exactly, opposite
    assert (norms[4::10, 0] == 0).all() and (norms[5::10] == 0).all()
    assert ((norms[6::10, 1] / norms[6::10, 0]).log10() < -9).all()
    assert ((norms[7::10, 0] / norms[7::10, 1]).log10() < -9).all()


# ---------------------------------------------------------------------------- PCGrad


def _pcgrad_rounds(monkeypatch):
    monkeypatch.setattr(PCGrad, "_pair", staticmethod(lambda gram, inv: PCGrad._rounds(gram, inv, ORDER)))


def pcgrad_numpy(g: np.ndarray) -> np.ndarray:
    """Yu et al. 2020, Alg. 1 at K = 2 on the Gram entries: ``g_i' = g_i - min(0, <g_i, g_j>)
    / ||g_j||^2 g_j`` (no projection on a zero g_j); ``w`` = column sums of the coefficients."""
    coef = np.eye(2)
    for i, j in ((0, 1), (1, 0)):
        if g[i, j] < 0 and g[j, j] > 0:
            coef[i, j] -= g[i, j] / g[j, j]
    return coef.sum(0)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pcgrad_k2_closed_form_is_the_rounds(dtype, reduction, monkeypatch):
    m = get_method("pcgrad", reduction=reduction)
    closed = [m.weights(g.to(dtype), None, _gen(s)) for s, g in enumerate(GRAMS)]
    _pcgrad_rounds(monkeypatch)
    for s, (g, w) in enumerate(zip(GRAMS, closed)):
        gen = _gen(s)
        ref = m.weights(g.to(dtype), None, gen)
        assert w.dtype == ref.dtype and torch.equal(w, ref), (s, w, ref)
        # The forced order is still drawn: the generator advances as at every K.
        assert torch.equal(gen.get_state(), _after_draws(s))


def test_pcgrad_k2_matches_the_paper():
    m = get_method("pcgrad")
    for s, j in enumerate(PAIRS):
        g = j @ j.T
        w = m.weights(g, None, _gen(s))
        np.testing.assert_allclose(w.numpy(), pcgrad_numpy(g.numpy()), rtol=1e-12, atol=0)
        # On the vectors: the projected gradients' sum.
        rows = j.numpy()
        d = rows.sum(0)
        for i, k in ((0, 1), (1, 0)):
            dot = rows[i] @ rows[k]
            if dot < 0 and rows[k] @ rows[k] > 0:
                d = d - dot / (rows[k] @ rows[k]) * rows[k]
        scale = 1e-12 * (w.abs().numpy() @ np.linalg.norm(rows, axis=1))
        assert np.abs((w @ j).numpy() - d).max() <= scale, s


def _orders(gen: torch.Generator, k: int) -> np.ndarray:
    """The orders the methods draw (without advancing ``gen``)."""
    state = gen.get_state()
    keys = torch.rand(k, k, generator=gen, dtype=F64)
    gen.set_state(state)
    keys.fill_diagonal_(2.0)
    return keys.argsort(dim=1)[:, : k - 1].numpy()


def _rows(k: int, seed: int) -> torch.Tensor:
    """Random rows; for seed % 3 == 1 row 2 is -row 1 / 2, for 2 norms 12 decades apart."""
    rows = torch.randn(k, k + 3, generator=_gen(seed), dtype=F64)
    if seed % 3 == 1:
        rows[1] = -rows[0] * 0.5
    elif seed % 3 == 2:
        rows = rows * torch.logspace(-6, 6, k, dtype=F64).unsqueeze(1)
    return rows


@pytest.mark.parametrize("k", [3, 4, 5])
def test_pcgrad_rounds_match_the_paper(k):
    """The general path (K >= 3) against Alg. 1 written plainly, one objective at a time in the
    order drawn from the same generator, on coefficient rows."""
    for seed in range(9):
        g = _rows(k, seed) @ _rows(k, seed).T
        gen = _gen(seed)
        orders = _orders(gen, k)
        w = get_method("pcgrad").weights(g, None, gen).numpy()
        gn, coef = g.numpy(), np.eye(k)
        for i in range(k):
            for j in orders[i]:
                dot = (coef[i] @ gn)[j]
                if dot < 0 and gn[j, j] > 0:
                    coef[i, j] -= dot / gn[j, j]
        np.testing.assert_allclose(w, coef.sum(0), rtol=1e-12, atol=0)
