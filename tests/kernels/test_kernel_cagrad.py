"""gradbal.kernels.cagrad_direction (CAGrad's inner problem and direction in one launch): the inner
problem's optimality (first-order conditions, scipy's SLSQP as in the official code, and never
worse than the torch solver, equal to it where that is exact), the direction against
CAGrad's torch ops, degenerate Gram matrices, and the dispatch from CAGrad."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from _small_k import DEGENERATE, WELL, fall_back_once, gram_case, jacobian_case, without_sync
from scipy.optimize import minimize

from gradbal._solver_kernels import CAGRAD
from gradbal.methods import CAGrad
from gradbal.solvers_qp import cagrad_weights

CS = [0.1, 0.5, 2.0]


@pytest.fixture(scope="module")
def ck_mod():
    return importlib.import_module("gradbal.kernels.cagrad")


def problem(g: np.ndarray, c: float):
    """(normalised G, a, phi, scale) of CAGrad's inner problem, independently of gradbal."""
    tr = np.trace(g)
    gn = (g + g.T) / 2 / (tr if tr > 0 else 1.0)
    a = gn.mean(1)
    phi = c * np.sqrt(max(a.mean(), 0.0))
    scale = np.abs(a).max() + phi * np.sqrt(np.diag(gn).max()) + 1e-300
    return gn, a, phi, scale


def objective(gn, a, phi, w) -> float:
    return float(a @ w + phi * np.sqrt(max(w @ gn @ w, 0.0)))


@pytest.mark.parametrize("k", [2, 3, 5, 8, 12, 16])
@pytest.mark.parametrize("kind", WELL + DEGENERATE)
def test_inner_problem_is_solved(ck_mod, device, k, kind):
    """w* is on the simplex, meets the first-order conditions where F is differentiable (no
    vertex direction descends: ``a_i + phi (G w)_i / ||g_w|| >= F(w)``, checked where
    ``||g_w|| > 1e-4``, the method's norm_eps; below, the direction is 0), is never worse than
    the torch solver, and equal to it in objective where that one is exact and well posed
    (random rows, K <= 8: every face enumerated). On gradients whose squared norms differ by
    1e8 (the conflicting kind) the kernel's objective is lower by up to 8e-10 (K <= 8): the
    torch solver's absolute ridge of 1e-10 moves its faces' solutions, the kernel's ridge is
    relative."""
    for c in CS:
        for seed in range(2):
            g = gram_case(kind, k, seed)
            gn, a, phi, scale = problem(g, c)
            _, w = ck_mod.cagrad_direction(torch.tensor(g, device=device), c, 1e-4)
            w = w.cpu().numpy()
            assert np.all(w >= 0) and abs(w.sum() - 1) <= 1e-12, (kind, c, w)
            f = objective(gn, a, phi, w)
            r = np.sqrt(max(w @ gn @ w, 0.0))
            if r > 1e-4:
                grad = a + phi * (gn @ w) / r
                assert grad.min() >= f - 1e-8 * scale, (kind, k, c, grad.min() - f)
            w_t = cagrad_weights(torch.tensor(g), c)[0].numpy()
            f_t = objective(gn, a, phi, w_t)
            r_t = np.sqrt(max(w_t @ gn @ w_t, 0.0))
            if min(r, r_t) > 1e-4:
                assert f <= f_t + 1e-12 * scale, (kind, k, c, f, f_t)
            else:
                # (Nearly) Pareto-stationary: the direction is 0, and F's minimum sits at its
                # kink ||g_w|| = 0, which the ridged face solves reach only to ||g_w|| ~
                # sqrt(ridge) = 1e-5: F within sqrt(ridge) x scale of the torch solver's. (The
                # torch solver misses some of these optima by far more: opposite rows, K = 12,
                # c = 0.5: its ||g_w*|| = 0.11 and F = 2.2e-3 where the kernel has 1.8e-8.)
                assert f <= f_t + np.sqrt(ck_mod.RIDGE) * scale, (kind, k, c, r, r_t, f, f_t)
            if k <= 8 and kind == "random":
                assert abs(f - f_t) <= 1e-12 * scale, (kind, k, c, f, f_t)


@pytest.mark.parametrize("k", [3, 6, 12])
def test_inner_problem_against_slsqp(ck_mod, device, k):
    """The official CAGrad code's solver (scipy SLSQP from the uniform point)."""
    for c in CS:
        g = gram_case("conflicting", k, 4)
        gn, a, phi, scale = problem(g, c)
        _, w = ck_mod.cagrad_direction(torch.tensor(g, device=device), c, 1e-4)
        ref = minimize(
            lambda x, gn=gn, a=a, phi=phi: objective(gn, a, phi, x), np.ones(k) / k, method="SLSQP",
            bounds=[(0, 1)] * k, constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
            options={"ftol": 1e-14, "maxiter": 1000},
        ).x  # fmt: skip
        assert objective(gn, a, phi, w.cpu().numpy()) <= objective(gn, a, phi, ref) + 1e-9 * scale


@pytest.mark.parametrize("k", [2, 3, 5, 8, 16])
def test_direction_is_the_methods(ck_mod, device, k):
    """The direction is ``(b + (phi / ||g_w*||) w*) / divisor`` of the w* returned (0 when
    ``||g_w*|| <= norm_eps``), on every kind; on random rows (one well-determined minimiser)
    it equals the method's torch ops', and for two equal gradients (w* not unique) it gives
    their direction. (On the conflicting kind w* is ill-determined: F is flat to 1e-15 over
    changes of 1e-6 in w*, which move the direction by up to 5e-5.) Each rescale mode once per
    c."""
    for c, rescale in zip(CS, (0, 1, 2)):
        m = CAGrad(c=c, rescale=rescale)
        divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
        for kind in WELL + DEGENERATE:
            g = gram_case(kind, k, 1)
            w, w_opt = ck_mod.cagrad_direction(torch.tensor(g, device=device), c, m.norm_eps, divisor)
            w, w_opt = w.cpu().numpy(), w_opt.cpu().numpy()
            gn, _, phi, _ = problem(g, c)
            r = np.sqrt(max(w_opt @ gn @ w_opt, 0.0))
            expect = np.zeros(k) if r <= m.norm_eps else (phi / r * w_opt + 1.0 / k) / divisor
            assert np.abs(w - expect).max() <= 1e-12 * max(np.abs(expect).max(), 1.0), (kind, c)
            if kind == "random":
                wt = m.weights(torch.tensor(g), None).numpy()
                assert np.abs(w - wt).max() <= 1e-9 * np.abs(wt).max(), (kind, c)
        j = jacobian_case("equal_rows", k, 1)
        g = torch.tensor(j @ j.T)
        w, _ = ck_mod.cagrad_direction(g.to(device), c, m.norm_eps, divisor)
        d, d_t = w.cpu().numpy() @ j, m.weights(g, None).numpy() @ j
        assert np.abs(d - d_t).max() <= 1e-8 * np.abs(d_t).max(), c


def test_degenerate_and_non_finite(ck_mod, device):
    # A zero matrix: nothing to balance, the direction is 0 (as the method's).
    z = torch.zeros(4, 4, dtype=torch.float64, device=device)
    w, w_opt = ck_mod.cagrad_direction(z, 0.5, 1e-4)
    assert torch.equal(w.cpu(), torch.zeros(4, dtype=torch.float64)) and torch.isfinite(w_opt).all()
    # Two opposite gradients with c >= 1: 0 is in their hull, F >= 0 = F(w*), so the direction
    # is 0 (||g_w*|| below norm_eps).
    j = jacobian_case("opposite_rows", 12, 0)
    w, _ = ck_mod.cagrad_direction(torch.tensor(j @ j.T, device=device), 2.0, 1e-4)
    assert torch.equal(w.cpu(), torch.zeros(12, dtype=torch.float64))
    # Non-finite entries read as 0.
    g = gram_case("random", 4, 0)
    bad, clean = g.copy(), g.copy()
    bad[0, 1], bad[1, 0] = np.inf, np.nan
    clean[0, 1] = clean[1, 0] = 0.0
    wb = ck_mod.cagrad_direction(torch.tensor(bad, device=device), 0.5, 1e-4)[0]
    assert torch.equal(wb, ck_mod.cagrad_direction(torch.tensor(clean, device=device), 0.5, 1e-4)[0])


def test_k32_and_float32(ck_mod, device):
    g = gram_case("conflicting", 32, 0)
    gn, a, phi, scale = problem(g, 0.5)
    _, w = ck_mod.cagrad_direction(torch.tensor(g, device=device), 0.5, 1e-4)
    w = w.cpu().numpy()
    r = np.sqrt(w @ gn @ w)
    assert (a + 0.5 * np.sqrt(a.mean()) * (gn @ w) / r).min() >= objective(gn, a, phi, w) - 1e-8 * scale
    g32 = torch.tensor(gram_case("random", 6, 2), dtype=torch.float32, device=device)
    assert torch.equal(ck_mod.cagrad_direction(g32, 0.5, 1e-4)[0],
                       ck_mod.cagrad_direction(g32.double(), 0.5, 1e-4)[0])  # fmt: skip


def test_bad_arguments_are_named(ck_mod, device):
    g = torch.eye(3, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="c must be > 0"):
        ck_mod.cagrad_direction(g, 0.0, 1e-4)
    with pytest.raises(ValueError, match="norm_eps >= 0 and divisor > 0"):
        ck_mod.cagrad_direction(g, 0.5, -1.0)
    with pytest.raises(ValueError, match="K must be >= 2"):
        ck_mod.cagrad_direction(g[:1, :1], 0.5, 1e-4)
    with pytest.raises(ValueError, match="max_iter must be an int >= 0"):
        ck_mod.cagrad_direction(g, 0.5, 1e-4, max_iter=-2)


def test_outputs_are_written_whole(ck_mod, device, monkeypatch):
    def poisoned(*shape, **kwargs):
        return torch.full(*shape, float("nan"), **kwargs)

    monkeypatch.setattr(ck_mod, "_alloc", poisoned)
    w, w_opt = ck_mod.cagrad_direction(torch.tensor(gram_case("random", 5, 0), device=device), 0.5, 1e-4)
    assert torch.isfinite(w).all() and torch.isfinite(w_opt).all()


# ------------------------------------------------------------------------------- dispatch


def test_cagrad_method_uses_the_kernel_and_falls_back_once(monkeypatch, ck_mod):
    g = torch.tensor(gram_case("conflicting", 5, 1))
    monkeypatch.setattr(CAGRAD, "failed", False)
    monkeypatch.setattr(CAGRAD, "usable", lambda t: not CAGRAD.failed)
    m = CAGrad(c=0.4, rescale=2)
    assert torch.equal(m.weights(g, None), ck_mod.cagrad_direction(g, 0.4, m.norm_eps, 1.4)[0])
    # c = 0 (the mean) and a non-default iteration count keep the torch ops.
    assert torch.equal(CAGrad(c=0.0).weights(g, None), torch.full((5,), 0.2, dtype=torch.float64))
    torch_w = CAGrad(c=0.4, rescale=2, iterations=25).weights(g, None)
    w = fall_back_once(monkeypatch, lambda: m.weights(g, None), "CAGrad kernel failed.*torch solvers")
    assert (w - torch_w).abs().max() <= 1e-8 * w.abs().max()


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cagrad_uses_the_kernel_without_host_sync():
    import gradbal

    dev = torch.device("cuda")
    for k in (2, 3, 4, 8, 16):
        # (random rows: w* well determined, so the CPU's torch solver is a reference to 1e-8)
        g = torch.tensor(gram_case("random", k, 2))
        m = gradbal.get_method("cagrad")
        ref = m.weights(g, None)
        g_dev = g.to(dev)  # (a host-to-device copy synchronises: outside the check)
        w = without_sync(lambda m=m, g_dev=g_dev: m.weights(g_dev, None))
        assert (w.cpu() - ref).abs().max() <= 1e-8 * ref.abs().max(), k
