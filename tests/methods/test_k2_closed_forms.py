"""K = 2 closed forms of the eigendecomposition-based methods (IMTL-G, ConFIG)
against their general path (LAPACK's eigh through sym_eig) and against their formulas, on
hundreds of 2 x 2 Gram matrices covering every rank-cut case.

Tolerances: 1e-12 relative where both sides are well conditioned. Where the unit Gram matrix
(or, for Aligned-MTL, G) keeps an eigenvalue much smaller than the largest, the general path
divides by that eigenvalue, which rounding of the entries moves by ~eps of the largest: a
relative error of ~eps * cond (cond = largest / smallest kept eigenvalue, up to 1 /
(2 eps(float32)) = 4e6). The tolerance then grows by 8 eps * cond (at most 7e-9, at the cut)."""

from __future__ import annotations

import pytest
import torch

from gradbal.methods.config import ConFIG, _config, _config_2
from gradbal.methods.imtl import _imtl_g, _imtl_g_2

from ._grams import F64

EPS = torch.finfo(F64).eps
RTOL_2 = 2 * torch.finfo(torch.float32).eps  # rank_mask's cut-off at K = 2


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


PAIRS = k2_pairs(520)
KINDS = {kind for kind, _ in PAIRS}


def _unit_cond(g):
    """Largest over smallest kept eigenvalue of the unit Gram matrix (1 when one is cut)."""
    n = g.diagonal().sqrt()
    if (n == 0).any():
        return 1.0
    c = (g[0, 1] / (n[0] * n[1])).abs().item()
    return (1 + c) / (1 - c) if 1 - c > RTOL_2 * (1 + c) else 1.0


# ------------------------------------------------------------------------------ IMTL-G


def test_imtl_g_k2_closed_form_matches_general_path_and_formula():
    for kind, g in PAIRS:
        w, ref = _imtl_g_2(g), _imtl_g(g)
        tol = 1e-12 + 8 * EPS * _unit_cond(g)
        assert (w - ref).abs().max() <= tol * max(1.0, ref.abs().max().item()), (kind, g, w, ref)
        assert torch.equal(w == 0, ref == 0), (kind, g, w, ref)  # the same cut, the same zeros
        n = g.diagonal().sqrt()
        if kind in (0, 1, 7, 8, 9, 10, 11):  # 1 + c kept: w = (|g_2|, |g_1|) / sum
            torch.testing.assert_close(w, n.flip(0) / n.sum(), rtol=1e-14, atol=0)
        elif kind in (2, 4, 5):  # opposite, no gradient, 1 + c cut: 0
            assert torch.equal(w, torch.zeros(2, dtype=F64))
        elif kind == 3:
            torch.testing.assert_close(w, (n > 0).to(F64), rtol=0, atol=0)
        elif w.abs().sum() > 0:  # around the cut (6), parallel or opposite (12)
            torch.testing.assert_close(w, n.flip(0) / n.sum(), rtol=1e-14, atol=0)
    assert KINDS == set(range(13))


# ------------------------------------------------------------------------------ ConFIG


def test_config_k2_closed_form_matches_general_path_and_formula():
    ones = torch.ones(2, dtype=F64)
    for kind, g in PAIRS:
        w, ref = _config_2(g), _config(g, ones)
        tol = 1e-12 + 8 * EPS * _unit_cond(g)
        assert (w - ref).abs().max() <= tol * max(1.0, ref.abs().max().item()), (kind, g, w, ref)
        assert torch.equal(w == 0, ref == 0), (kind, g, w, ref)
        n = g.diagonal().sqrt()
        if kind in (0, 1, 7, 8, 9, 10, 11):  # d = mean |g_k| (u_1 + u_2)
            torch.testing.assert_close(w, n.mean() / n, rtol=1e-14, atol=0)
        elif kind in (2, 4, 5):
            assert torch.equal(w, torch.zeros(2, dtype=F64))
        elif kind == 3:  # the nonzero gradient itself
            torch.testing.assert_close(w, (n > 0).to(F64), rtol=1e-15, atol=0)
        elif w.abs().sum() > 0:
            torch.testing.assert_close(w, n.mean() / n, rtol=1e-14, atol=0)


@pytest.mark.parametrize("pref", [None, [1.0, 1.0], [3.0, 3.0], [-2.0, -2.0]])
def test_config_k2_uniform_prefs_take_the_closed_form(pref):
    """w is invariant to a nonzero scaling of p, so every p = c 1 gives the default's weights;
    the method takes the closed form for all of them and the general path otherwise."""
    m = ConFIG(pref_vector=pref)
    assert m._uniform
    for kind, g in PAIRS[:60]:
        torch.testing.assert_close(m.weights(g, None), _config_2(g), rtol=0, atol=0)
        ref = _config(g, torch.tensor(pref or [1.0, 1.0], dtype=F64))
        tol = 1e-12 + 8 * EPS * _unit_cond(g)
        assert (m.weights(g, None) - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())
    assert not ConFIG(pref_vector=[1.0, 2.0])._uniform
    assert not ConFIG(pref_vector=[0.0, 0.0])._uniform


def test_config_k2_custom_pref_uses_the_general_path():
    p = [2.0, -1.0]
    m = ConFIG(pref_vector=p)
    for _, g in PAIRS[:60]:
        torch.testing.assert_close(m.weights(g, None), _config(g, torch.tensor(p, dtype=F64)), rtol=0, atol=0)
