"""The device solvers against independent references (scipy's SLSQP, KKT conditions)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from gradbal.solvers import EXACT_MAX_K, min_norm_2, min_norm_simplex, project_simplex


def random_gram(k, n=None, seed=0, scales=None):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, n or k + 3, generator=gen, dtype=torch.float64)
    if scales is not None:
        g = g * torch.as_tensor(scales, dtype=torch.float64).unsqueeze(1)
    return g @ g.T, g


def scipy_min_norm(gram):
    g = gram.numpy()
    k = g.shape[0]
    res = minimize(
        lambda w: w @ g @ w,
        np.full(k, 1.0 / k),
        jac=lambda w: 2 * g @ w,
        bounds=[(0, 1)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return res.x


def assert_kkt(gram, w, tol):
    """KKT of min w^T G w on the simplex: (Gw)_i >= w^T G w, equality where w_i > 0."""
    gw = gram @ w
    obj = w @ gw
    scale = gram.diagonal().max()
    assert torch.all(w >= 0) and abs(w.sum().item() - 1) < 1e-12
    assert torch.all(gw >= obj - tol * scale), (gw, obj)
    active = w > 1e-6
    assert torch.all((gw[active] - obj).abs() <= tol * scale), (gw, obj, w)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 9, 12, 16])
@pytest.mark.parametrize("seed", range(4))
def test_min_norm_matches_scipy(k, seed):
    gram, _ = random_gram(k, n=max(k - 1, 2) if seed % 2 else 3 * k, seed=seed)
    w = min_norm_simplex(gram)
    ref = torch.from_numpy(scipy_min_norm(gram))
    obj, obj_ref = w @ gram @ w, ref @ gram @ ref
    assert obj <= obj_ref * (1 + 1e-5) + 1e-12
    assert_kkt(gram, w, tol=1e-6)


@given(
    k=st.integers(2, 10),
    seed=st.integers(0, 10_000),
    log_scale=st.floats(-3, 3),
)
@settings(max_examples=40, deadline=None)
def test_min_norm_kkt_property(k, seed, log_scale):
    gram, _ = random_gram(k, n=k + 1, seed=seed)
    gram = gram * 10.0**log_scale
    w = min_norm_simplex(gram)
    assert_kkt(gram, w, tol=1e-6)
    # Scale invariance: the minimiser does not depend on the scale of G.
    torch.testing.assert_close(min_norm_simplex(gram * 1e3), w, rtol=1e-6, atol=1e-9)


def test_closed_form_k2_formula():
    gram, _ = random_gram(2, seed=3)
    h11, h22, h12 = gram[0, 0], gram[1, 1], gram[0, 1]
    pi1 = ((h22 - h12) / (h11 + h22 - 2 * h12)).clamp(0, 1)
    torch.testing.assert_close(min_norm_2(gram), torch.stack([pi1, 1 - pi1]))


@pytest.mark.parametrize("k", [2, 3, 5, 8, 9, 16])
def test_degenerate_grams_are_finite(k):
    gen = torch.Generator().manual_seed(k)
    g = torch.randn(k, 6, generator=gen, dtype=torch.float64)
    cases = {}
    g_equal = g.clone()
    g_equal[1] = g_equal[0]
    cases["two equal rows"] = g_equal
    g_opp = g.clone()
    g_opp[1] = -g_opp[0]
    cases["two opposite rows"] = g_opp
    g_zero = g.clone()
    g_zero[0] = 0
    cases["a zero row"] = g_zero
    cases["rank one"] = torch.outer(torch.arange(1.0, k + 1, dtype=torch.float64), g[0])
    cases["all zero"] = torch.zeros_like(g)
    mixed = g * torch.logspace(-6, 6, k, dtype=torch.float64).unsqueeze(1)
    cases["tiny and huge norms"] = mixed
    for name, rows in cases.items():
        gram = rows @ rows.T
        w = min_norm_simplex(gram)
        assert torch.isfinite(w).all(), name
        assert torch.all(w >= 0) and abs(w.sum().item() - 1) < 1e-9, name
        if name != "all zero":
            assert_kkt(gram, w, tol=1e-6)
    # Documented tie-breaking: equal gradients share the weight equally (exactly up to
    # EXACT_MAX_K; above it the ridge's KKT solve is ill-conditioned: even to ~1e-4).
    gram = torch.ones(k, k, dtype=torch.float64)
    even = torch.full((k,), 1.0 / k, dtype=torch.float64)
    atol = 1e-12 if k <= EXACT_MAX_K else 1e-3 / k
    torch.testing.assert_close(min_norm_simplex(gram), even, atol=atol, rtol=0)


def test_zero_row_takes_all_weight():
    gram, _ = random_gram(4, seed=1)
    gram[2, :] = 0
    gram[:, 2] = 0
    w = min_norm_simplex(gram)
    torch.testing.assert_close(w, torch.eye(4, dtype=torch.float64)[2], atol=1e-8, rtol=0)


def test_opposite_pair_gives_zero_direction():
    g = torch.tensor([[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]], dtype=torch.float64)
    w = min_norm_simplex(g @ g.T)
    torch.testing.assert_close(w @ g, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [5, EXACT_MAX_K + 4])
def test_batched_matches_unbatched(k):
    """Both the enumeration and the interior-point path treat leading dims as a batch."""
    grams = torch.stack([random_gram(k, n=k - 2 + s, seed=s)[0] for s in range(3)])
    w = min_norm_simplex(grams.reshape(3, 1, k, k)).reshape(3, k)
    for i in range(3):
        torch.testing.assert_close(w[i], min_norm_simplex(grams[i]), rtol=0, atol=1e-12)
        assert_kkt(grams[i], w[i], tol=1e-9)


def test_large_k_path_matches_scipy():
    """K above EXACT_MAX_K uses the interior point + active-set rounds; scipy on K = 9."""
    gram, _ = random_gram(EXACT_MAX_K + 1, n=5, seed=7)
    w = min_norm_simplex(gram)
    ref = torch.from_numpy(scipy_min_norm(gram))
    assert (w @ gram @ w) <= (ref @ gram @ ref) * (1 + 1e-6) + 1e-12


@given(st.lists(st.floats(-5, 5), min_size=1, max_size=12))
@settings(max_examples=60, deadline=None)
def test_project_simplex_is_the_euclidean_projection(values):
    v = torch.tensor(values, dtype=torch.float64)
    p = project_simplex(v)
    assert torch.all(p >= 0) and abs(p.sum().item() - 1) < 1e-12
    # Optimality: <v - p, q - p> <= 0 for every vertex q of the simplex.
    for i in range(len(values)):
        q = torch.zeros_like(v)
        q[i] = 1
        assert torch.dot(v - p, q - p) <= 1e-10


def _stress_gram(kind, k, gen):
    """Random Gram matrices of the kinds the K > EXACT_MAX_K path was tuned on."""
    n = {"well": 3 * k, "rank-deficient": max(2, k // 2), "rank 3": 3}.get(kind, 2 * k)
    g = torch.randn(k, n, generator=gen, dtype=torch.float64)
    if kind == "equal rows":
        g[1], g[5] = g[0], g[2]
    elif kind == "opposite rows":
        g[1] = -g[0]
    elif kind == "zero row":
        g[3] = 0
    elif kind == "norms over 4 decades":
        g = g * torch.logspace(-2, 2, k, dtype=torch.float64)[torch.randperm(k, generator=gen)].unsqueeze(1)
    elif kind == "correlated":
        g = torch.randn(1, n, generator=gen, dtype=torch.float64) + 0.1 * g
    elif kind == "conflicting":
        signs = torch.sign(torch.randn(k, 1, generator=gen, dtype=torch.float64))
        g = torch.randn(1, n, generator=gen, dtype=torch.float64) * signs + 0.3 * g
    return g @ g.T


STRESS_KINDS = (
    "well", "rank-deficient", "rank 3", "equal rows", "opposite rows", "zero row",
    "norms over 4 decades", "correlated", "conflicting",
)


@pytest.mark.parametrize("kind", STRESS_KINDS)
@pytest.mark.parametrize("k", [EXACT_MAX_K + 1, EXACT_MAX_K + 2])
def test_large_k_path_matches_exact_enumeration(kind, k):
    """The interior point + active-set rounds (K > EXACT_MAX_K) against exact support
    enumeration (all 2^K - 1 KKT systems) on the same normalised, ridged problem."""
    from gradbal.solvers import _RIDGE, _min_norm_enumerate

    gen = torch.Generator().manual_seed(k * 100 + STRESS_KINDS.index(kind))
    for _ in range(3):
        gram = _stress_gram(kind, k, gen)
        w = min_norm_simplex(gram)
        g = (gram + gram.T) / (2 * gram.diagonal().max())
        g = g + _RIDGE * torch.eye(k, dtype=torch.float64)
        ref = _min_norm_enumerate(g)
        obj, obj_ref = w @ g @ w, ref @ g @ ref
        assert torch.all(w >= 0) and abs(w.sum().item() - 1) < 1e-12
        assert obj <= obj_ref * (1 + 1e-9) + 1e-15, (kind, obj.item(), obj_ref.item())
