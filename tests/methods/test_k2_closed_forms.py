"""K = 2 closed forms of the eigendecomposition-based methods (IMTL-G, ConFIG, Aligned-MTL)
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

from gradbal.methods.aligned_mtl import SCALE_MODES, AlignedMTL, _aligned_mtl_2
from gradbal.methods.config import ConFIG, _config, _config_2
from gradbal.methods.imtl import _imtl_g, _imtl_g_2
from gradbal.solvers_qp import (
    _dual_cone_enumerate,
    _trace_normalise,
    cagrad_direction_2,
    project_dual_cone,
)

from ._grams import F64, k2_pairs, stress_pairs

EPS = torch.finfo(F64).eps
RTOL_2 = 2 * torch.finfo(torch.float32).eps  # rank_mask's cut-off at K = 2


PAIRS = k2_pairs(520)
KINDS = {kind for kind, _ in PAIRS}


def _prefs(i):
    gen = torch.Generator().manual_seed(1000 + i)
    return [
        torch.ones(2, dtype=F64),
        torch.randn(2, generator=gen, dtype=F64),
        torch.tensor([1.0, 0.0], dtype=F64),
        torch.tensor([2.0, -1.0], dtype=F64),
        torch.tensor([1e-3, 1.0], dtype=F64),
    ]


def _unit_cond(g):
    """Largest over smallest kept eigenvalue of the unit Gram matrix (1 when one is cut)."""
    n = g.diagonal().sqrt()
    if (n == 0).any():
        return 1.0
    c = (g[0, 1] / (n[0] * n[1])).abs().item()
    return (1 + c) / (1 - c) if 1 - c > RTOL_2 * (1 + c) else 1.0


def _cond(g):
    ev = torch.linalg.eigvalsh(g)
    return (ev[1] / ev[0]).item() if ev[0] > RTOL_2 * ev[1] > 0 else 1.0


def _aligned_general(g, p, mode):
    coef, evecs = AlignedMTL(mode)._spectrum(g)
    return evecs @ (coef * (p @ evecs)), coef.abs().max()


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


# ------------------------------------------------------------------------- Aligned-MTL


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_aligned_mtl_k2_closed_form_matches_the_eigendecomposition(mode):
    for i, (kind, g) in enumerate(PAIRS):
        tol = 1e-12 + 8 * EPS * _cond(g)
        for p in _prefs(i):
            w = _aligned_mtl_2(g, p, mode)
            ref, b_norm = _aligned_general(g, p, mode)
            # relative to ||B|| ||p||: w = B p may cancel
            scale = (b_norm * p.abs().max()).item()
            assert (w - ref).abs().max() <= tol * scale, (mode, kind, g, p, w, ref)


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_aligned_mtl_k2_takes_the_closed_form(mode):
    """AlignedMTL at K = 2 is the closed form, on the CPU as elsewhere (same bits)."""
    for i, (_, g) in enumerate(PAIRS[:60]):
        p = _prefs(i)[1]
        assert torch.equal(AlignedMTL(mode, pref_vector=p).weights(g, None), _aligned_mtl_2(g, p, mode))


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_aligned_mtl_k2_closed_form_documented_cases(mode):
    ones = torch.ones(2, dtype=F64)
    # full rank, diagonal: B = sqrt(s) diag(1/2, 1) with s = 1 (min, median) or 2.5 (rmse)
    s = 2.5 if mode == "rmse" else 1.0
    g = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(_aligned_mtl_2(g, ones, mode), s**0.5 * torch.tensor([0.5, 1.0], dtype=F64),
                               rtol=1e-15, atol=0)
    # G = c I (no eigenbasis, h = 0): B = I in every mode
    g = torch.eye(2, dtype=F64) * 7.0
    p = torch.tensor([0.3, -2.0], dtype=F64)
    torch.testing.assert_close(_aligned_mtl_2(g, p, mode), p, rtol=1e-15, atol=0)
    # rank 1 (parallel gradients): B = v v^T in every mode, v = (1, 2) / sqrt(5)
    g = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64)
    torch.testing.assert_close(_aligned_mtl_2(g, ones, mode), torch.tensor([0.6, 1.2], dtype=F64),
                               rtol=1e-15, atol=1e-16)
    # an asymmetric input is symmetrised, as by sym_eig
    g = torch.tensor([[2.0, 1.0], [0.2, 1.0]], dtype=F64)
    ref, b_norm = _aligned_general(g, p, mode)
    torch.testing.assert_close(_aligned_mtl_2(g, p, mode), ref, rtol=0, atol=1e-14 * b_norm.item())
    # zero Gram matrix: B = I; a non-finite entry is read as 0 (as sym_eig does)
    assert torch.equal(_aligned_mtl_2(torch.zeros(2, 2, dtype=F64), p, mode), p)
    g = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(_aligned_mtl_2(g, ones, mode), torch.tensor([0.0, 1.0], dtype=F64),
                               rtol=0, atol=1e-16)
    # the rank cut: lambda_- just above and just below 2 eps(float32) lambda_+ (lambda_- = m - h
    # has an error of ~eps lambda_+, as in any backward-stable eigensolver: relative 1e-10 here)
    for ratio, full in ((1.01 * RTOL_2, True), (0.99 * RTOL_2, False)):
        g = torch.diag(torch.tensor([1.0, ratio], dtype=F64))
        w = _aligned_mtl_2(g, ones, mode)
        if full:
            ref = torch.tensor([ratio**0.5, 1.0], dtype=F64) if mode != "rmse" else \
                ((1 + ratio) / 2) ** 0.5 * torch.tensor([1.0, ratio**-0.5], dtype=F64)
        else:
            ref = torch.tensor([1.0, 0.0], dtype=F64)
        torch.testing.assert_close(w, ref, rtol=8 * EPS / ratio, atol=0)


def test_aligned_mtl_k2_closed_form_is_finite_and_float32_in_float32_out():
    for kind, g in PAIRS:
        w = _aligned_mtl_2(g.float(), torch.ones(2, dtype=F64), "rmse")
        assert torch.isfinite(w).all(), (kind, g)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", SCALE_MODES)
def test_aligned_mtl_k2_on_cuda_takes_the_closed_form(mode):
    m = AlignedMTL(mode)
    for kind, g in PAIRS[:100]:
        w = m.weights(g.cuda(), None).cpu()
        ref, b_norm = _aligned_general(g, torch.ones(2, dtype=F64), mode)
        assert (w - ref).abs().max() <= (1e-12 + 8 * EPS * _cond(g)) * b_norm, (kind, g)


# ------------------------------------------------------------------------------ CAGrad


def _cagrad_general(g, c, norm_eps):
    """CAGrad's direction weights from the segment's stationary point written plainly on the
    trace-normalised Gram matrix (the library's former K = 2 path: per-entry arithmetic, no
    constant product), with ``||g_w*||`` as ``w^T G w``."""
    gn, _ = _trace_normalise(g)
    (g00, g01), (_, g11) = gn.tolist()
    a0, a1 = (g00 + g01) / 2, (g01 + g11) / 2
    phi = c * max((a0 + a1) / 2, 0.0) ** 0.5
    alpha, c1, c2 = a0 - a1, g01 - g11, g00 + g11 - 2 * g01
    det, den = max(g00 * g11 - g01 * g01, 0.0), phi * phi * c2 - alpha * alpha
    t = min(max((-alpha * (det / den) ** 0.5 - c1) / c2, 0.0), 1.0) if den > 0 else float(alpha < 0)
    w_opt = torch.tensor([t, 1 - t], dtype=F64)
    r = torch.sqrt(((gn @ w_opt) * w_opt).sum().clamp_min(0))
    return torch.where(r <= norm_eps, 0.0, (phi / r) * w_opt + 0.5)


@pytest.mark.parametrize("c", [0.1, 0.5, 1.0, 2.0])
def test_cagrad_k2_direct_form_matches_the_normalised_solve(c):
    """cagrad_direction_2 (one constant product, no normalisation) against the closed form
    written plainly on the normalised Gram matrix, as directions: ``||J^T (w - w_ref)|| <= (1e-9 + 4 c sqrt(eps)) sqrt(trace G)
    (1 + max|w_ref|)``. The ``sqrt(eps)`` term: ``phi = c ||g_0|| = c sqrt(b^T G b)``, and
    when the mean gradient g_0 is ~0 (nearly opposite pairs) ``b^T G b`` is rounding noise of
    size ~eps trace(G) in either computation, so phi, and d with it, carry an error up to
    ``c sqrt(eps trace(G))``. Weights alone may differ where the direction does not
    (nearly Pareto-stationary pairs have many optimal w*). With norm_eps = 0 on rank-one
    pairs the direction itself is 0 / 0 (``g_w* = 0``) and rounding picks it, so those are
    left to the default norm_eps."""
    grams = [g for _, g in k2_pairs(520)] + [j @ j.T for j in stress_pairs(400)]
    for norm_eps in (1e-4, 0.0):
        for g in grams:
            full_rank = g[0, 0] * g[1, 1] - g[0, 1] ** 2 > 1e-6 * g[0, 0] * g[1, 1]
            if norm_eps == 0 and not full_rank:
                continue
            w, ref = cagrad_direction_2(g, c, norm_eps), _cagrad_general(g, c, norm_eps)
            assert torch.isfinite(w).all()
            d = w - ref
            gap = torch.sqrt((d @ g @ d).clamp_min(0))
            tol = (1e-9 + 4 * c * EPS**0.5) * torch.sqrt(g.trace()) * (1 + ref.abs().max())
            assert gap <= tol, (norm_eps, g, w, ref)


def test_cagrad_method_uses_the_direct_form_at_k2():
    from gradbal.methods.cagrad import CAGrad

    for rescale, divisor in ((0, 1.0), (1, 1.25), (2, 1.5)):
        m = CAGrad(c=0.5, rescale=rescale)
        for _, g in k2_pairs(60):
            assert torch.equal(m.weights(g, None), cagrad_direction_2(g, 0.5, 1e-4) / divisor)
    # c = 0: the mean, exactly
    assert torch.equal(CAGrad(c=0.0).weights(k2_pairs(1)[0][1], None), torch.full((2,), 0.5, dtype=F64))


def test_cagrad_k2_zero_and_nonfinite_grams_give_zero():
    """A zero Gram matrix (and non-finite entries, read as 0) is Pareto-stationary: d = 0,
    with norm_eps = 0 too (||g_w*|| = 0 <= 0), where 0 / 0 used to give NaN."""
    for g in (torch.zeros(2, 2, dtype=F64), torch.full((2, 2), float("nan"), dtype=F64)):
        for norm_eps in (1e-4, 0.0):
            assert torch.equal(cagrad_direction_2(g, 0.5, norm_eps), torch.zeros(2, dtype=F64))


# ----------------------------------------------------------------- dual cone (UPGrad, DualProj)


def _dual_cone_by_enumeration(g, u, reg_eps, norm_eps):
    """The exact support enumeration (the K <= 8 path) on the trace-normalised Q."""
    q, tr = _trace_normalise(g)
    if norm_eps > 0:
        q = q * (tr >= norm_eps)
    q.diagonal().add_(reg_eps + 1e-10)
    v = torch.nan_to_num(_dual_cone_enumerate(q, u), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.maximum(v, u)


@pytest.mark.parametrize("reg_eps, norm_eps", [(1e-4, 0.0), (0.0, 0.0), (1e-4, 1e-4)])
def test_dual_cone_k2_closed_form_matches_the_enumeration(reg_eps, norm_eps):
    """project_dual_cone at K = 2 (one constant product on G, no normalisation) against the
    exact enumeration of the free sets on the normalised Q, for UPGrad's targets (rows of
    diag(p)), DualProj's (p) and signed ones, over the rank-cut pairs and the stress pairs
    (plus zero and non-finite Grams): the same directions to 1e-9 of sqrt(trace G) (1 +
    |v|)."""
    gen = torch.Generator().manual_seed(5)
    targets = [torch.eye(2, dtype=F64) / 2, torch.tensor([[0.5, 0.5]], dtype=F64),
               torch.tensor([[1.0, -0.3], [-1.0, -2.0]], dtype=F64), torch.randn(4, 2, generator=gen, dtype=F64)]
    grams = [g for _, g in k2_pairs(520)] + [j @ j.T for j in stress_pairs(400)]
    grams += [torch.zeros(2, 2, dtype=F64), torch.tensor([[1.0, float("nan")], [0.5, 2.0]], dtype=F64)]
    for g in grams:
        for u in targets:
            v = project_dual_cone(g, u, reg_eps, norm_eps)
            ref = _dual_cone_by_enumeration(g, u, reg_eps, norm_eps)
            assert torch.isfinite(v).all() and (v >= u).all()
            # As directions J^T v: with norms 12 decades apart the enumeration's KKT
            # tolerance (1e-9 |u|) accepts v_1 = 0 where the exact weight of the tiny
            # gradient is ~1e-9, a difference of ~1e-15 of the direction.
            gs = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            gap = torch.sqrt((((v - ref) @ gs) * (v - ref)).sum(-1).clamp_min(0))
            scale = torch.sqrt(gs.trace().clamp_min(0)) * (1 + ref.abs().amax(-1))
            assert (gap <= 1e-9 * scale).all(), (g, u, v, ref)
