"""gradbal.kernels.fair_weights (FairGrad's and Nash-MTL's ``G w = w^(-1/alpha)`` in one launch)
against the torch solver gradbal.solvers_qp.fair_weights, scipy, the equation itself and the
scaling law, on well-conditioned and degenerate Gram matrices; its dispatch through
fair_weights (the rule: test_solver_kernels.py)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from _small_k import DEGENERATE, WELL, fall_back_once, gram_case, without_sync
from scipy.optimize import least_squares

from gradbal import solvers_qp
from gradbal._solver_kernels import FAIR

ALPHAS = [0.25, 0.5, 1.0, 2.0, 5.0]


@pytest.fixture(scope="module")
def fk_mod():
    return importlib.import_module("gradbal.kernels.fair")


def backward_error(g: np.ndarray, w: np.ndarray, alpha: float, ridge: float = 1e-8) -> float:
    """max_i |(G' u)_i - u_i^(-1/alpha)| / ((|G'| u)_i + u_i^(-1/alpha)) on the solver's own
    normalised problem (G' = G / s + ridge I, s = trace(G) / K, u = w s^(alpha / (1 + alpha)))."""
    k = len(g)
    s = np.trace(g) / k if np.trace(g) > 0 else 1.0
    gn = g / s + ridge * np.eye(k)
    u = w * s ** (alpha / (1 + alpha))
    t = u ** (-1 / alpha)
    return float((np.abs(gn @ u - t) / (np.abs(gn) @ u + t)).max())


@pytest.mark.parametrize("k", [3, 5, 8, 16])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_well_conditioned_is_the_solution(fk_mod, device, k, alpha):
    """Equal to the torch solver's answer to 1e-12; on random rows converged to rounding and
    equal to scipy's. (The conflicting kind, norms over 4 decades, is not converged by either
    solver at K = 16, alpha = 5 within the default steps: backward error 5.5e-3 both.)"""
    for kind in WELL:
        g = gram_case(kind, k, 3)
        w = fk_mod.fair_weights(torch.tensor(g, device=device), alpha).cpu()
        assert w.dtype == torch.float64 and w.shape == (k,)
        wt = solvers_qp.fair_weights(torch.tensor(g), alpha)
        assert (w - wt).abs().max() <= 1e-12 * wt.abs().max(), kind
        if kind == "random":
            assert backward_error(g, w.numpy(), alpha) <= 1e-13
    # LibMTL's reference solver (scipy least_squares from 1/K) on the random kind; the ridge
    # (1e-8 of the mean diagonal) moves the solution by ~1e-8.
    g = gram_case("random", k, 3)
    ref = least_squares(
        lambda x: g @ x - np.power(1 / x, 1 / alpha), np.ones(k) / k,
        bounds=(1e-12, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15,
    ).x  # fmt: skip
    w = fk_mod.fair_weights(torch.tensor(g, device=device), alpha).cpu().numpy()
    assert np.abs(w - ref).max() <= 1e-6 * np.abs(ref).max()


def test_k32_and_float32_and_strides(fk_mod, device):
    g = gram_case("conflicting", 32, 0)
    w = fk_mod.fair_weights(torch.tensor(g, device=device)).cpu()
    assert backward_error(g, w.numpy(), 1.0) <= 1e-12
    # float32 and a transposed (non-contiguous) view read as the float64 matrix they hold.
    g8 = torch.tensor(gram_case("random", 8, 1), dtype=torch.float32, device=device)
    w32 = fk_mod.fair_weights(g8, 2.0)
    w64 = fk_mod.fair_weights(g8.double().t().contiguous().t(), 2.0)
    assert torch.equal(w32, w64)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_scaling_law(fk_mod, device, alpha):
    """w(c G) = c^(-alpha / (1 + alpha)) w(G) (FairGrad's equation is homogeneous)."""
    g = torch.tensor(gram_case("conflicting", 6, 1), device=device)
    w1, w2 = fk_mod.fair_weights(g, alpha), fk_mod.fair_weights(1e6 * g, alpha)
    assert (w2 - w1 * 1e6 ** (-alpha / (1 + alpha))).abs().max() <= 1e-12 * w2.abs().max()


@pytest.mark.parametrize("kind", DEGENERATE)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_degenerate_is_finite_positive_and_as_good_as_torch(fk_mod, device, kind, alpha):
    """Rank-deficient, equal / opposite / zero rows, 8 decades of norms, a zero matrix: finite,
    positive weights, as converged as the torch solver's after the same steps (its backward error
    at most 10x theirs, or 1e-12)."""
    for k in (3, 8, 16):
        g = gram_case(kind, k, 2)
        w = fk_mod.fair_weights(torch.tensor(g, device=device), alpha).cpu()
        assert torch.isfinite(w).all() and (w > 0).all(), (kind, k, w)
        wt = solvers_qp.fair_weights(torch.tensor(g), alpha)
        err, err_t = backward_error(g, w.numpy(), alpha), backward_error(g, wt.numpy(), alpha)
        assert err <= max(10 * err_t, 1e-12), (kind, k, err, err_t)


def test_nonfinite_entries_read_as_zero(fk_mod, device):
    g = gram_case("random", 4, 0)
    clean = g.copy()
    bad = g.copy()
    bad[0, 1], bad[1, 0] = np.inf, np.nan
    clean[0, 1] = clean[1, 0] = 0.0
    w_bad = fk_mod.fair_weights(torch.tensor(bad, device=device))
    assert torch.equal(w_bad, fk_mod.fair_weights(torch.tensor(clean, device=device)))
    assert torch.equal(w_bad.cpu(), solvers_qp.fair_weights(torch.tensor(bad)).cpu()) or (
        (w_bad.cpu() - solvers_qp.fair_weights(torch.tensor(bad))).abs().max() <= 1e-12
    )


def test_bad_arguments_are_named(fk_mod, device):
    g = torch.eye(3, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        fk_mod.fair_weights(g, 0.0)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        fk_mod.fair_weights(g, ridge=0.0)
    with pytest.raises(ValueError, match="iterations must be an int >= 0"):
        fk_mod.fair_weights(g, iterations=-1)
    with pytest.raises(ValueError, match="newton must be an int >= 0"):
        fk_mod.fair_weights(g, newton=True)
    with pytest.raises(ValueError, match=r"\[K, K\]"):
        fk_mod.fair_weights(g.expand(2, 3, 3))
    with pytest.raises(ValueError, match=r"K must be in \[1, 32\]"):
        fk_mod.fair_weights(torch.eye(33, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="dtype"):
        fk_mod.fair_weights(g.half())


def test_output_is_written_whole(fk_mod, device, monkeypatch):
    """The result buffer is allocated poisoned (NaN): every entry is written."""
    def poisoned(*shape, **kwargs):
        return torch.full(*shape, float("nan"), **kwargs)

    monkeypatch.setattr(fk_mod, "_alloc", poisoned)
    w = fk_mod.fair_weights(torch.tensor(gram_case("random", 5, 0), device=device))
    assert torch.isfinite(w).all()


# ------------------------------------------------------------------------------- dispatch


def test_fair_weights_runs_the_kernel_and_falls_back_once(monkeypatch, fk_mod):
    """Through solvers_qp.fair_weights (and so FairGrad / Nash-MTL): the kernel's weights where
    it is chosen, with the caller's alpha and step counts; a failing kernel warns once and the
    torch solver answers, then and from then on."""
    g = torch.tensor(gram_case("conflicting", 5, 1))
    monkeypatch.setattr(FAIR, "failed", False)
    monkeypatch.setattr(FAIR, "usable", lambda t: not FAIR.failed)
    assert torch.equal(solvers_qp.fair_weights(g, 2.0, 5, 1e-6, 2), fk_mod.fair_weights(g, 2.0, 5, 1e-6, 2))
    w = fall_back_once(monkeypatch, lambda: solvers_qp.fair_weights(g), "FairGrad kernel failed.*torch solvers")
    assert (w - fk_mod.fair_weights(g)).abs().max() <= 1e-12 * w.abs().max()


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fairgrad_and_nash_mtl_use_the_kernel_without_host_sync():
    import gradbal
    from gradbal import kernels

    dev = torch.device("cuda")
    for k in (3, 4, 8, 16):
        g = torch.tensor(gram_case("conflicting", k, 2))
        for name in ("fairgrad", "nash_mtl"):
            ref = gradbal.get_method(name).weights(g, None)
            m = gradbal.get_method(name)
            g_dev = g.to(dev)  # (a host-to-device copy synchronises: outside the check)
            w = without_sync(lambda m=m, g_dev=g_dev: m.weights(g_dev, None))
            assert (w.cpu() - ref).abs().max() <= 1e-10 * ref.abs().max(), (name, k)
        assert torch.equal(solvers_qp.fair_weights(g.to(dev)), kernels.fair_weights(g.to(dev)))
