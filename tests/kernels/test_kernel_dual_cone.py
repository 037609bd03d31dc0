"""The dual-cone kernel (gradbal.kernels.dual_cone) against independent references: the KKT
conditions of ``min v^T Q v`` s.t. ``v >= u`` checked in numpy, and the torch solver
``gradbal.solvers_qp.project_dual_cone`` (exact free-set enumeration for K <= 8); its own
torch reference; UPGrad's defining property; its wrapper's checks; the dispatch. Under Triton's
interpreter on CPU (slow: the cases are few and small), compiled on CUDA.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from _small_k import DEGENERATE, WELL, fall_back_once, gram_case, without_sync

from gradbal import solvers_qp
from gradbal._solver_kernels import DUAL_CONE

REG = 1e-4 + 1e-10  # TorchJD's reg_eps plus gradbal's ridge: what UPGrad passes by default


@pytest.fixture(scope="module")
def dc_mod():
    return importlib.import_module("gradbal.kernels.dual_cone")


def check_kkt(q: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """v = argmin_{v >= u} v^T q v for each row: feasible, multipliers (q v)_i >= 0 (to
    1e-12 sum|u| max q_ii), and 0 where the bound is not active."""
    for ub, vb in zip(u, v):
        scale = np.abs(ub).sum() * np.abs(np.diag(q)).max() + 1e-300
        lam = q @ vb
        assert np.all(vb >= ub - 1e-15), (vb, ub)
        assert np.all(lam >= -1e-12 * scale), (lam, scale)
        off_bound = vb > ub + 1e-12
        assert np.all(np.abs(lam[off_bound]) <= 1e-9 * scale), (lam, off_bound)


@pytest.mark.parametrize("k", [3, 5, 8])
def test_matches_kkt_and_the_torch_solver(dc_mod, device, k):
    u = np.eye(k) / k  # UPGrad's vectors
    for kind in WELL + DEGENERATE:
        g = gram_case(kind, k, 1)
        v = dc_mod.dual_cone(torch.tensor(g, device=device), torch.tensor(u, device=device), REG)
        v = v.cpu().numpy()
        q = dc_mod._regularised(torch.tensor(g), REG, 0.0).numpy()
        check_kkt(q, u, v)
        # Q is well conditioned (reg 1e-4 of a unit trace): one minimiser, the same weights,
        # up to the torch solver's own KKT tolerance (1e-9 (|u| + |v|) on a multiplier: with
        # norms over 8 decades it leaves a bound active whose multiplier is -1e-13, where the
        # kernel frees it and moves v by 1e-9); never a worse objective.
        vt = solvers_qp.project_dual_cone(torch.tensor(g), torch.tensor(u)).numpy()
        assert np.abs(v - vt).max() <= 1e-8 * np.abs(vt).max(), (kind, v, vt)
        obj, obj_t = (np.einsum("bi,ij,bj->b", x, q, x) for x in (v, vt))
        assert np.all(obj <= obj_t * (1 + 1e-12) + 1e-18), (kind, obj - obj_t)


def test_k16_dualproj_and_norm_eps(dc_mod, device):
    """K = 16 (the torch solver's interior point there), DualProj's single vector (the mean),
    and TorchJD's norm_eps rule (a G of trace below it counts as 0: v = max(u, 0)... = u here)."""
    k = 16
    u = np.stack([np.full(k, 1.0 / k), np.eye(k)[3] / k])
    for kind in ("conflicting", "rank_deficient"):
        g = gram_case(kind, k, 0)
        v = dc_mod.dual_cone(torch.tensor(g, device=device), torch.tensor(u, device=device), REG)
        v = v.cpu().numpy()
        check_kkt(dc_mod._regularised(torch.tensor(g), REG, 0.0).numpy(), u, v)
        vt = solvers_qp.project_dual_cone(torch.tensor(g), torch.tensor(u)).numpy()
        assert np.abs(v - vt).max() <= 1e-7, (kind, np.abs(v - vt).max())
    tiny = gram_case("conflicting", 4, 0) * 1e-12  # trace ~4e-7 < norm_eps
    u4 = torch.eye(4, dtype=torch.float64, device=device) / 4
    v = dc_mod.dual_cone(torch.tensor(tiny, device=device), u4, REG, norm_eps=1e-4)
    assert torch.equal(v, u4)  # Q = reg I: the projection of u >= 0 is u itself


def test_without_ridge_the_result_is_in_the_dual_cone(dc_mod, device):
    """UPGrad's property (reg_eps = 0): G v >= 0, i.e. the aggregated direction J^T v has a
    non-negative inner product with every gradient, up to what the ridge r = 1e-10 allows:
    (Q v)_i >= 0 with Q = G / tr + r I gives (G v)_i >= -r tr v_i (v >= u >= 0 here)."""
    k = 6
    for kind in ("conflicting", "opposite_rows", "rank_deficient"):
        g = gram_case(kind, k, 2)
        u = np.eye(k) / k
        v = dc_mod.dual_cone(torch.tensor(g, device=device), torch.tensor(u, device=device), 1e-10)
        total = v.cpu().numpy().sum(0)
        tr = np.trace(g)
        assert np.all(g @ total >= -(1e-10 + 1e-12) * tr * total - 1e-15 * tr), (kind, g @ total)


def test_same_steps_as_its_reference(dc_mod, device):
    g = gram_case("conflicting", 5, 3)
    u = np.eye(5) / 5
    v = dc_mod.dual_cone(torch.tensor(g, device=device), torch.tensor(u, device=device), REG).cpu()
    for b in range(5):
        ref = dc_mod.dual_cone_reference(torch.tensor(g), torch.tensor(u[b]), REG)
        assert (v[b] - ref).abs().max() <= 1e-12


def test_wrapper_errors_strides_and_full_write(dc_mod, device, monkeypatch):
    g = torch.tensor(gram_case("random", 4, 0), device=device)
    u = torch.eye(4, dtype=torch.float64, device=device) / 4
    monkeypatch.setattr(dc_mod, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    v = dc_mod.dual_cone(g, u, REG)
    assert torch.isfinite(v).all()
    assert torch.equal(dc_mod.dual_cone(g.mT, u, REG), v)  # other strides, same symmetric G
    assert (dc_mod.dual_cone(g.float(), u, REG) - v).abs().max() <= 1e-6
    assert torch.equal(dc_mod.dual_cone(g, u, REG).view(torch.int64), v.view(torch.int64))
    with pytest.raises(ValueError, match=r"\[K, K\]"):
        dc_mod.dual_cone(g[:3], u, REG)
    with pytest.raises(ValueError, match="K must be in"):
        dc_mod.dual_cone(torch.eye(33, dtype=torch.float64, device=device), u, REG)
    with pytest.raises(TypeError, match="dtype"):
        dc_mod.dual_cone(g.half(), u, REG)
    with pytest.raises(ValueError, match="u must be a float64"):
        dc_mod.dual_cone(g, u.float(), REG)
    with pytest.raises(ValueError, match="max_iter"):
        dc_mod.dual_cone(g, u, REG, max_iter=-2)
    assert torch.equal(dc_mod.dual_cone(g, u, REG, max_iter=0), u)  # the start: v = u
    # Garbage in (indefinite, negative diagonal): never NaN, never below u.
    bad = torch.tensor([[1.0, 3.0, 3.0], [3.0, -1.0, 3.0], [3.0, 3.0, 1.0]],
                       dtype=torch.float64, device=device)  # fmt: skip
    u3 = torch.eye(3, dtype=torch.float64, device=device) / 3
    v = dc_mod.dual_cone(bad, u3, REG)
    assert torch.isfinite(v).all() and (v >= u3).all()


def test_dispatch(monkeypatch, dc_mod):
    """Through project_dual_cone (the rule itself: tests/kernels/test_solver_kernels.py)."""
    # Chosen: project_dual_cone returns the kernel's v (batch dims kept); a non-default
    # iteration count keeps the torch solver; a failing kernel warns once, then torch.
    g = torch.tensor(gram_case("conflicting", 4, 4))
    u = (torch.eye(4, dtype=torch.float64) / 4).reshape(2, 2, 4)
    monkeypatch.setattr(DUAL_CONE, "failed", False)
    monkeypatch.setattr(DUAL_CONE, "usable", lambda t: not DUAL_CONE.failed)
    v = solvers_qp.project_dual_cone(g, u)
    assert v.shape == (2, 2, 4) and torch.equal(v.reshape(4, 4), dc_mod.dual_cone(g, u.reshape(4, 4), REG))
    assert (v >= u).all()  # feasible as returned: the kernel stores max(v, u) itself
    w = fall_back_once(monkeypatch, lambda: solvers_qp.project_dual_cone(g, u), "dual-cone kernel failed.*torch solvers")
    assert (w - v).abs().max() <= 1e-9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_upgrad_and_dualproj_use_the_kernel_without_host_sync():
    import gradbal
    from gradbal import kernels

    dev = torch.device("cuda")
    for k in (3, 4, 8, 16):
        g = torch.tensor(gram_case("conflicting", k, 2))
        for name in ("upgrad", "dualproj"):
            m = gradbal.get_method(name)
            ref = m.weights(g, None)
            g_dev = g.to(dev)  # (a host-to-device copy synchronises: outside the check)
            w = without_sync(lambda m=m, g_dev=g_dev: m.weights(g_dev, None))
            assert (w.cpu() - ref).abs().max() <= 1e-7 * ref.abs().max(), (name, k)
        u = torch.eye(k, dtype=torch.float64, device=dev) / k
        assert torch.equal(
            solvers_qp.project_dual_cone(g.to(dev), u), kernels.dual_cone(g.to(dev), u, REG)
        )
