"""gradbal.kernels.pcgrad_weights / gradvac_weights (PCGrad's and GradVac's rounds in one launch)
against the papers' algorithms run literally on explicit gradient vectors (numpy, float64) and
against the methods' torch ops; their dispatch from PCGrad and GradVac (the rule:
test_solver_kernels.py)."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch
from _small_k import DEGENERATE, WELL, fall_back_once, without_sync
from _small_k import jacobian_case as jacobian

from gradbal._solver_kernels import GRADVAC, PCGRAD
from gradbal.methods import GradVac, PCGrad

KINDS = WELL + [kind for kind in DEGENERATE if kind != "zero"] + ["zero"]


@pytest.fixture(scope="module")
def sk_mod():
    return importlib.import_module("gradbal.kernels.surgery")


def random_order(k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation([j for j in range(k) if j != i]) for i in range(k)])


def pcgrad_literal(j: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Yu et al. 2020, Algorithm 1, on the vectors: d = sum_i g_i'."""
    d = np.zeros(j.shape[1])
    for i in range(len(j)):
        gi = j[i].copy()
        for o in order[i]:
            dot, sq = gi @ j[o], j[o] @ j[o]
            if dot < 0 and sq >= np.finfo(np.float64).tiny:
                gi -= dot / sq * j[o]
        d += gi
    return d


def gradvac_literal(j, target, order, beta, eps, on_conflict):
    """Wang et al. 2021, Algorithm 1, on the vectors (targets as a K x K table)."""
    d = np.zeros(j.shape[1])
    new = target.copy()
    norms = np.linalg.norm(j, axis=1)
    for i in range(len(j)):
        gi = j[i].copy()
        for o in order[i]:
            ni = np.linalg.norm(gi)
            phi = gi @ j[o] / (ni * norms[o] + eps)
            hat = target[i, o]
            conflict = phi < hat
            if conflict:
                gi += ni * (hat * np.sqrt(max(1 - phi * phi, 0)) - phi * np.sqrt(max(1 - hat * hat, 0))) / (
                    norms[o] * np.sqrt(max(1 - hat * hat, 0)) + eps) * j[o]  # fmt: skip
            if conflict or not on_conflict:
                new[i, o] = (1 - beta) * hat + beta * phi
        d += gi
    return d, new


def close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    return float(np.abs(a - b).max()) <= rtol * max(float(np.abs(b).max()), 1e-300)


def close_direction(w: np.ndarray, j: np.ndarray, d_ref: np.ndarray, rtol: float) -> bool:
    """``w @ j`` equals the reference direction to ``rtol`` of the larger of its size and that
    of its terms (a direction that cancels to ~0, as for rank-one J, has only rounding left)."""
    scale = max(float(np.abs(d_ref).max()), float(np.abs(w).max() * np.abs(j).max()), 1e-300)
    return float(np.abs(w @ j - d_ref).max()) <= rtol * scale


@pytest.mark.parametrize("k", [3, 5, 8, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_pcgrad_is_algorithm_1(sk_mod, device, k, kind):
    j = jacobian(kind, k, 1)
    order = random_order(k, k)
    g = torch.tensor(j @ j.T, device=device)
    w = sk_mod.pcgrad_weights(g, torch.tensor(order, device=device)).cpu().numpy()
    assert close_direction(w, j, pcgrad_literal(j, order), 1e-9), kind
    # and the method's torch rounds with the same orders, to rounding
    gt = torch.tensor(j @ j.T)
    inv = torch.where(gt.diagonal() >= torch.finfo(torch.float64).tiny, gt.diagonal().reciprocal(), 0.0)
    wt = PCGrad._rounds(gt, inv, torch.tensor(order)).numpy()
    assert close(w, wt, 1e-12), kind


def test_pcgrad_k32(sk_mod, device):
    j = jacobian("conflicting", 32, 0)
    order = random_order(32, 5)
    w = sk_mod.pcgrad_weights(torch.tensor(j @ j.T, device=device), torch.tensor(order, device=device))
    assert close_direction(w.cpu().numpy(), j, pcgrad_literal(j, order), 1e-9)


@pytest.mark.parametrize("k", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("on_conflict", [False, True])
def test_gradvac_is_algorithm_1(sk_mod, device, k, kind, on_conflict):
    """Two steps (the second from the first's targets): direction and targets."""
    j = jacobian(kind, k, 2)
    target = np.zeros((k, k))
    for step in range(2):
        order = random_order(k, 10 * k + step)
        w, new = sk_mod.gradvac_weights(
            torch.tensor(j @ j.T, device=device), torch.tensor(target, device=device),
            torch.tensor(order, device=device), 0.5, 1e-8, on_conflict,
        )  # fmt: skip
        d_ref, new_ref = gradvac_literal(j, target, order, 0.5, 1e-8, on_conflict)
        assert close_direction(w.cpu().numpy(), j, d_ref, 1e-9), (kind, step)
        assert np.abs(new.cpu().numpy() - new_ref).max() <= 1e-9, (kind, step)
        target = new.cpu().numpy()


def test_gradvac_matches_the_method_rounds(sk_mod, device):
    """Against GradVac's torch rounds, same orders and targets: equal to 1e-12."""
    k = 6
    j = jacobian("conflicting", k, 3)
    gt = torch.tensor(j @ j.T)
    target = torch.rand(k, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5
    order = torch.tensor(random_order(k, 3))
    m = GradVac(beta=0.3, ema_update="on_conflict")
    norms = torch.sqrt(gt.diagonal())
    wt, new_t = m._rounds(gt, target, norms, torch.tensor(True), order)
    w, new = sk_mod.gradvac_weights(gt.to(device), target.to(device), order.to(device), 0.3, 1e-8, True)
    assert close(w.cpu().numpy(), wt.numpy(), 1e-12)
    assert (new.cpu() - new_t).abs().max() <= 1e-12


def test_non_finite_gram(sk_mod, device):
    """GradVac: any non-finite entry of G means no surgery (w = 1) and no target moves."""
    k = 4
    g = torch.tensor(jacobian("random", k, 0) @ jacobian("random", k, 0).T, device=device)
    g[0, 1] = g[1, 0] = float("nan")
    target = torch.full((k, k), 0.25, dtype=torch.float64, device=device)
    order = torch.tensor(random_order(k, 0), device=device)
    w, new = sk_mod.gradvac_weights(g, target, order, 0.5, 1e-8)
    assert torch.equal(w.cpu(), torch.ones(k, dtype=torch.float64))
    assert torch.equal(new, target)


def test_bad_arguments_are_named(sk_mod, device):
    g = torch.eye(3, dtype=torch.float64, device=device)
    order = torch.tensor(random_order(3, 0), device=device)
    with pytest.raises(TypeError, match="must be float64"):
        sk_mod.pcgrad_weights(g.float(), order)
    with pytest.raises(ValueError, match=r"order must be an int64 \[3, 2\] tensor"):
        sk_mod.pcgrad_weights(g, order.int())
    with pytest.raises(ValueError, match=r"order must be an int64 \[3, 2\] tensor"):
        sk_mod.pcgrad_weights(g, order[:, :1])
    with pytest.raises(ValueError, match="K must be >= 2"):
        sk_mod.pcgrad_weights(g[:1, :1], order[:1, :0])
    with pytest.raises(ValueError, match=r"target must be a float64 \[3, 3\] tensor"):
        sk_mod.gradvac_weights(g, g[:2, :2], order, 0.5, 1e-8)


def test_outputs_are_written_whole(sk_mod, device, monkeypatch):
    def poisoned(*shape, **kwargs):
        return torch.full(*shape, float("nan"), **kwargs)

    monkeypatch.setattr(sk_mod, "_alloc", poisoned)
    k = 5
    g = torch.tensor(jacobian("random", k, 1) @ jacobian("random", k, 1).T, device=device)
    order = torch.tensor(random_order(k, 1), device=device)
    assert torch.isfinite(sk_mod.pcgrad_weights(g, order)).all()
    w, new = sk_mod.gradvac_weights(g, torch.zeros(k, k, dtype=torch.float64, device=device), order, 0.5, 1e-8)
    assert torch.isfinite(w).all() and torch.isfinite(new).all()


# ------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pcgrad_method_uses_the_kernel_with_its_own_draw(monkeypatch, sk_mod, reduction):
    """Where the kernel is chosen, PCGrad's weights are the kernel's for the orders the torch
    rounds would use (same generator draw), equal to them to rounding; a failing kernel warns
    once and the torch rounds answer."""
    k = 6
    j = jacobian("conflicting", k, 4)
    g = torch.tensor(j @ j.T)
    gen_t = torch.Generator().manual_seed(7)
    torch_w = PCGrad(reduction).weights(g, None, gen_t)
    monkeypatch.setattr(PCGRAD, "failed", False)
    monkeypatch.setattr(PCGRAD, "usable", lambda t: not PCGRAD.failed)
    gen = torch.Generator().manual_seed(7)
    w = PCGrad(reduction).weights(g, None, gen)
    assert close(w.numpy(), torch_w.numpy(), 1e-12)
    assert torch.equal(gen.get_state(), gen_t.get_state())  # the same draw

    w2 = fall_back_once(
        monkeypatch, lambda: PCGrad(reduction).weights(g, None, torch.Generator().manual_seed(7)),
        "PCGrad kernel failed.*torch ops",
    )
    assert torch.equal(w2, torch_w)


def test_gradvac_method_uses_the_kernel_and_keeps_its_state(monkeypatch, sk_mod):
    """Three steps through GradVac with the kernel chosen: weights and state equal those of the
    torch ops to rounding (K = 2 included, where the torch ops take their closed form)."""
    for k in (2, 5):
        j = jacobian("conflicting", k, 5)
        g = torch.tensor(j @ j.T)
        plain, fused = GradVac(), GradVac()
        gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for _ in range(3):
            wa = plain.weights(g, None, gen_a)
            with monkeypatch.context() as mp:
                mp.setattr(GRADVAC, "failed", False)
                mp.setattr(GRADVAC, "usable", lambda t: True)
                wb = fused.weights(g, None, gen_b)
            assert close(wb.numpy(), wa.numpy(), 1e-12), k
            assert (fused.state_dict()["target"] - plain.state_dict()["target"]).abs().max() <= 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing failed: no warning
        GradVac().weights(g, None, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_pcgrad_and_gradvac_use_the_kernels_without_host_sync():
    import gradbal

    dev = torch.device("cuda")
    for k in (3, 4, 8, 16):
        j = jacobian("conflicting", k, 2)
        g = torch.tensor(j @ j.T)
        for name in ("pcgrad", "gradvac"):
            ref = gradbal.get_method(name).weights(g, None, torch.Generator().manual_seed(1))
            g_dev = g.to(dev)  # (a host-to-device copy synchronises: outside the check)
            # A fresh method and generator each call: the same draws, the same (stateless) start.
            w = without_sync(lambda name=name, g_dev=g_dev: gradbal.get_method(name).weights(
                g_dev, None, torch.Generator().manual_seed(1)))
            assert (w.cpu() - ref).abs().max() <= 1e-10 * ref.abs().max(), (name, k)
