"""gradbal.kernels.aligned_mtl_weights / imtl_g_weights / config_weights (the whole K x K stage of
the eigen methods in one launch): against the methods' formulas written out in numpy on LAPACK's
eigendecomposition, the papers' defining properties (Aligned-MTL: the aligned system is
orthogonal with equal singular values; IMTL-G: equal projections onto the unit gradients;
ConFIG: TorchJD's formula on the gradient rows, equal angles), degenerate Gram matrices, and the
dispatch from the methods.

Under Triton's interpreter a K = 16 call takes ~6 s (1100 rotations, one at a time), so K = 16
is checked once per method and K = 32 only on a GPU."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from _small_k import DEGENERATE, WELL, fall_back_once, gram_case, jacobian_case, without_sync

from gradbal._solver_kernels import ALIGNED_MTL, CONFIG, IMTL_G
from gradbal.methods import IMTLG, AlignedMTL, ConFIG

EPS32 = float(np.finfo(np.float32).eps)
MODES = ("min", "median", "rmse")
KINDS = WELL + DEGENERATE


@pytest.fixture(scope="module")
def sp():
    return importlib.import_module("gradbal.kernels.spectral")


# ------------------------------------------------------------------ numpy references (LAPACK)


def kept(lam: np.ndarray) -> np.ndarray:
    """rank_mask: eigenvalues above K eps(float32) times the largest."""
    return lam > lam.max() * len(lam) * EPS32


def aligned_ref(g: np.ndarray, p: np.ndarray, mode: str) -> np.ndarray:
    """w = B p, B = sqrt(s) V_R diag(lambda_R)^(-1/2) V_R^T (Senushkin et al., Alg. 1)."""
    lam, v = np.linalg.eigh((g + g.T) / 2)
    keep = kept(lam)
    if not keep.any():  # a zero matrix: B = I
        return p.copy()
    s = {"min": lam[keep].min(), "median": lam[len(lam) - 1 - keep.sum() // 2],
         "rmse": lam[keep].mean()}[mode]  # fmt: skip
    coef = np.where(keep, np.sqrt(s / np.where(keep, lam, 1.0)), 0.0)
    return v @ (coef * (v.T @ p))


def unit_pinv_ref(g: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, bool]:
    """a = D^-1 C^+ rhs for C = D^-1 G D^-1, and whether rhs has a part in C's kept range."""
    d = np.diag(g)
    inv = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)
    c = g * np.outer(inv, inv)
    lam, v = np.linalg.eigh((c + c.T) / 2)
    keep = kept(lam)
    coords = v.T @ rhs
    ok = (coords[keep] ** 2).sum() > 1e-18 * (coords[~keep] ** 2).sum()
    return inv * (v @ np.where(keep, coords / np.where(keep, lam, 1.0), 0.0)), bool(ok)


def imtl_ref(g: np.ndarray) -> np.ndarray:
    a, ok = unit_pinv_ref(g, np.ones(len(g)))
    total = a.sum()
    return a / total if ok and abs(total) > 1e-9 * np.abs(a).sum() else np.zeros(len(g))


def config_ref(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    a, ok = unit_pinv_ref(g, p)
    ga = g @ a
    sq = a @ ga
    return a * (ga.sum() / sq) if ok and sq > 0 else np.zeros(len(g))


def tol(kind: str) -> float:
    # Relative to max |w|. The conflicting and mixed-norm kinds spread the eigenvalues over
    # 8-16 decades: LAPACK's small eigenvalues are accurate to eps * lambda_max only, so the
    # weights (through 1 / lambda) to ~eps * cond; measured differences up to 9e-11.
    return 1e-9 if kind in ("conflicting", "mixed_norms") else 1e-12


def close(w, ref, kind) -> bool:
    w = w.cpu().numpy()
    return np.abs(w - ref).max() <= tol(kind) * max(np.abs(ref).max(), 1e-300)


def rand_pref(k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 2.0, k)


# ------------------------------------------------------------------ Aligned-MTL


@pytest.mark.parametrize("k", [2, 3, 5])
def test_aligned_mtl_matches_the_formula(sp, device, k):
    for i, kind in enumerate(KINDS):
        g = gram_case(kind, k, 0)
        p = rand_pref(k, i)
        mode = MODES[i % 3]
        w = sp.aligned_mtl_weights(torch.tensor(g, device=device), torch.tensor(p, device=device), mode)
        assert close(w, aligned_ref(g, p, mode), kind), (kind, mode)


@pytest.mark.parametrize("k, kind", [(8, "conflicting"), (8, "rank_deficient"), (16, "mixed_norms")])
def test_aligned_mtl_larger_k(sp, device, k, kind):
    g = gram_case(kind, k, 1)
    p = rand_pref(k, k)
    mode = "median" if k == 8 else "min"
    w = sp.aligned_mtl_weights(torch.tensor(g, device=device), torch.tensor(p, device=device), mode)
    assert close(w, aligned_ref(g, p, mode), kind)


@pytest.mark.parametrize("kind", ["random", "rank_deficient"])
def test_aligned_system_is_orthogonal_with_equal_singular_values(sp, device, kind):
    """The paper's property: the aligned gradients (columns of J^T B) have Gram matrix
    B G B = s P_R, P_R the projector onto G's range (s I at full rank). B's columns are the
    weights for the unit preference vectors."""
    k = 4
    g = gram_case(kind, k, 3)
    gt = torch.tensor(g, device=device)
    eye = torch.eye(k, dtype=torch.float64, device=device)
    for mode in MODES:
        b = torch.stack([sp.aligned_mtl_weights(gt, eye[i], mode) for i in range(k)], 1).cpu().numpy()
        bgb = b @ g @ b
        lam = np.linalg.eigvalsh(g)
        keep = kept(lam)
        s = {"min": lam[keep].min(), "median": lam[k - 1 - keep.sum() // 2],
             "rmse": lam[keep].mean()}[mode]  # fmt: skip
        # a scaled projector of rank R: (BGB)^2 = s BGB, trace = s R
        assert np.abs(bgb @ bgb - s * bgb).max() <= 1e-12 * s * s, (kind, mode)
        assert abs(np.trace(bgb) - s * keep.sum()) <= 1e-12 * s * k, (kind, mode)
        if keep.all():
            assert np.abs(bgb - s * np.eye(k)).max() <= 1e-12 * s, (kind, mode)


# ------------------------------------------------------------------ IMTL-G


@pytest.mark.parametrize("k", [3, 5])
def test_imtl_g_matches_the_formula(sp, device, k):
    for kind in KINDS:
        g = gram_case(kind, k, 0)
        w = sp.imtl_g_weights(torch.tensor(g, device=device))
        assert close(w, imtl_ref(g), kind), kind


@pytest.mark.parametrize("k, kind", [(8, "conflicting"), (16, "random")])
def test_imtl_g_equal_projections(sp, device, k, kind):
    """Liu et al.: d = J^T w with sum(w) = 1 has the same projection onto every unit gradient."""
    j = jacobian_case(kind, k, 2)
    w = sp.imtl_g_weights(torch.tensor(j @ j.T, device=device)).cpu().numpy()
    assert abs(w.sum() - 1) <= 1e-12
    proj = (j / np.linalg.norm(j, axis=1, keepdims=True)) @ (w @ j)
    assert np.ptp(proj) <= 1e-10 * np.abs(proj).max(), proj
    assert close(torch.tensor(w), imtl_ref(j @ j.T), kind)


# ------------------------------------------------------------------ ConFIG


@pytest.mark.parametrize("k", [3, 5])
def test_config_matches_the_formula(sp, device, k):
    for i, kind in enumerate(KINDS):
        g = gram_case(kind, k, 0)
        p = np.ones(k) if i % 2 else rand_pref(k, i)
        w = sp.config_weights(torch.tensor(g, device=device), torch.tensor(p, device=device))
        assert close(w, config_ref(g, p), kind), kind


@pytest.mark.parametrize("k", [4, 16])
def test_config_is_torchjds_formula_on_the_rows(sp, device, k):
    """Liu et al., Eq. 2, as TorchJD computes it on the rows: x = pinv(U) p for the unit rows U,
    d = (sum_k <g_k, x_hat>) x_hat. With p = 1 every gradient makes the same angle with d."""
    j = jacobian_case("random", k, 5)
    for p in (np.ones(k), rand_pref(k, 9)):
        w = sp.config_weights(torch.tensor(j @ j.T, device=device), torch.tensor(p, device=device))
        unit = j / np.linalg.norm(j, axis=1, keepdims=True)
        x = np.linalg.pinv(unit) @ p
        x_hat = x / np.linalg.norm(x)
        d = (j @ x_hat).sum() * x_hat
        assert np.abs(w.cpu().numpy() @ j - d).max() <= 1e-10 * np.abs(d).max()
        if (p == 1).all():
            cos = unit @ d / np.linalg.norm(d)
            assert np.ptp(cos) <= 1e-10, cos
        if k == 16:
            break  # (one K = 16 call: ~6 s under the interpreter)


# ------------------------------------------------------------------ all three


def test_non_finite_entries_and_float32(sp, device):
    """Non-finite entries read as 0 (Aligned-MTL, IMTL-G: as the torch ops' nan_to_num; ConFIG's
    ``G a`` reads G as given, as the torch ops do, so there NaN gives 0 weights); float32 input
    is read as its float64 values."""
    g = gram_case("random", 4, 0)
    bad, clean = g.copy(), g.copy()
    bad[0, 1], bad[1, 0] = np.inf, np.nan
    clean[0, 1] = clean[1, 0] = 0.0
    p = torch.tensor(rand_pref(4, 0), device=device)
    for name, fn in (("aligned", lambda x: sp.aligned_mtl_weights(x, p, "rmse")),
                     ("imtl", sp.imtl_g_weights)):  # fmt: skip
        wb = fn(torch.tensor(bad, device=device))
        assert torch.equal(wb, fn(torch.tensor(clean, device=device))), name
    wb = sp.config_weights(torch.tensor(bad, device=device), p)
    assert torch.equal(wb.cpu(), torch.zeros(4, dtype=torch.float64))
    g32 = torch.tensor(gram_case("conflicting", 5, 1), dtype=torch.float32, device=device)
    p5 = torch.tensor(rand_pref(5, 1), device=device)
    for fn in (lambda x: sp.aligned_mtl_weights(x, p5, "median"), sp.imtl_g_weights,
               lambda x: sp.config_weights(x, p5)):  # fmt: skip
        assert torch.equal(fn(g32), fn(g32.double()))
    # any strides: a transposed view is the same symmetric matrix
    gt = torch.tensor(gram_case("random", 5, 2), device=device)
    assert torch.equal(sp.imtl_g_weights(gt.t()), sp.imtl_g_weights(gt.contiguous()))


def test_parallel_order_agrees(sp, device):
    g = gram_case("conflicting", 8, 4)
    p = torch.tensor(rand_pref(8, 4), device=device)
    gt = torch.tensor(g, device=device)
    w = sp.aligned_mtl_weights(gt, p, "min", order="parallel")
    assert close(w, aligned_ref(g, p.cpu().numpy(), "min"), "conflicting")
    assert close(sp.imtl_g_weights(gt, order="parallel"), imtl_ref(g), "conflicting")


def test_bad_arguments_are_named(sp, device):
    g = torch.eye(3, dtype=torch.float64, device=device)
    p = torch.ones(3, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="scale_mode must be one of"):
        sp.aligned_mtl_weights(g, p, "max")
    with pytest.raises(ValueError, match=r"pref must be a float64 \[3\] tensor"):
        sp.aligned_mtl_weights(g, p.float(), "min")
    with pytest.raises(ValueError, match=r"pref must be a float64 \[3\] tensor"):
        sp.config_weights(g, p[:2])
    with pytest.raises(ValueError, match="sweeps must be an int >= 0"):
        sp.imtl_g_weights(g, sweeps=-1)
    with pytest.raises(ValueError, match="order must be one of"):
        sp.imtl_g_weights(g, order="random")
    with pytest.raises(ValueError, match=r"K must be in \[1, 32\]"):
        sp.imtl_g_weights(torch.eye(33, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"must be a \[K, K\] tensor"):
        sp.imtl_g_weights(torch.eye(3, dtype=torch.float64, device=device)[None])


def test_outputs_are_written_whole(sp, device, monkeypatch):
    def poisoned(*shape, **kwargs):
        return torch.full(*shape, float("nan"), **kwargs)

    monkeypatch.setattr(sp, "_alloc", poisoned)
    g = torch.tensor(gram_case("random", 3, 0), device=device)
    p = torch.ones(3, dtype=torch.float64, device=device)
    for w in (sp.aligned_mtl_weights(g, p), sp.imtl_g_weights(g), sp.config_weights(g, p)):
        assert torch.isfinite(w).all()


# ------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("which", ["aligned_mtl", "imtl_g", "config"])
def test_methods_use_the_kernel_and_fall_back_once(monkeypatch, sp, which):
    kernel, method, call = {
        "aligned_mtl": (ALIGNED_MTL, AlignedMTL(scale_mode="median", pref_vector=[1, 2, 3, 4]),
                        lambda g: sp.aligned_mtl_weights(g, torch.tensor([1.0, 2, 3, 4], dtype=torch.float64), "median")),
        "imtl_g": (IMTL_G, IMTLG(), sp.imtl_g_weights),
        "config": (CONFIG, ConFIG(pref_vector=[1, 2, 3, 4]),
                   lambda g: sp.config_weights(g, torch.tensor([1.0, 2, 3, 4], dtype=torch.float64))),
    }[which]  # fmt: skip
    g = torch.tensor(gram_case("conflicting", 4, 1))
    torch_w = method.weights(g, None)  # (CPU: the torch ops, LAPACK's eigh)
    monkeypatch.setattr(kernel, "failed", False)
    monkeypatch.setattr(kernel, "usable", lambda t: not kernel.failed)
    assert torch.equal(method.weights(g, None), call(g))
    assert method.weights(g.float(), None).dtype == torch.float32
    w = fall_back_once(monkeypatch, lambda: method.weights(g, None), f"{kernel.what[4:]} failed.*torch ops")
    assert torch.equal(w, torch_w)


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_spectral_methods_use_the_kernel_without_host_sync():
    import gradbal

    dev = torch.device("cuda")
    for name in ("aligned_mtl", "imtl_g", "config"):
        for k in (2, 3, 4, 8, 16, 32):
            g = torch.tensor(gram_case("random", k, 2))
            m = gradbal.get_method(name)
            ref = m.weights(g, None)  # LAPACK on the CPU
            g_dev = g.to(dev)  # (a host-to-device copy synchronises: outside the check)
            w = without_sync(lambda m=m, g_dev=g_dev: m.weights(g_dev, None))
            assert (w.cpu() - ref).abs().max() <= 1e-10 * ref.abs().max(), (name, k)
