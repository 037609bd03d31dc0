"""The min-norm kernel (gradbal.kernels.min_norm) against independent references: the KKT
conditions of ``min w^T g w`` on the simplex checked in numpy, scipy's SLSQP, and the torch
solver ``gradbal.solvers.min_norm_simplex`` (exact support enumeration for K <= 8); its own
torch reference (the same algorithm with Python control flow); its wrapper's checks; the
dispatch from ``min_norm_simplex``. Under Triton's interpreter on CPU (about 0.05 s per
iteration of a K = 16 problem there: the cases are batched and few), compiled on CUDA.

``g = (G + G^T) / (2 max_i G_ii) + 1e-12 I`` is the problem both solvers state; objectives are
compared on it.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import scipy.optimize
import torch
from _small_k import DEGENERATE, WELL, fall_back_once, gram_case, without_sync

from gradbal import solvers
from gradbal._solver_kernels import MGDA_NORMALIZED, MIN_NORM, MOKD_WEIGHTS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def mn_mod():
    return importlib.import_module("gradbal.kernels.min_norm")


def regularised(g: np.ndarray) -> np.ndarray:
    top = np.diag(g).max()
    return g / (top if top > 0 else 1.0) + 1e-12 * np.eye(g.shape[0])


def check_kkt(g: np.ndarray, w: np.ndarray) -> None:
    """w solves min w^T q w on the simplex, q = regularised(g): feasible, every multiplier
    (q w)_i - obj >= 0 (to 1e-9 of the objective), and 0 where w_i > 0 (to 1e-6)."""
    q = regularised(g)
    assert np.all(np.isfinite(w)) and np.all(w >= 0), w
    assert abs(w.sum() - 1) <= 1e-12, w.sum()
    grad = q @ w
    obj = w @ grad
    assert np.all(grad >= obj - 1e-9 * obj - 1e-15), (grad - obj, obj)
    support = w > 1e-9
    assert np.all(np.abs(grad[support] - obj) <= 1e-6 * obj + 1e-15), (grad - obj, w)


def torch_weights(g: np.ndarray) -> np.ndarray:
    return solvers.min_norm_simplex(torch.tensor(g)).numpy()


def _batch(device, mats) -> torch.Tensor:
    return torch.tensor(np.stack(mats), dtype=torch.float64, device=device)


# ------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("k", [3, 5, 8, 16])
def test_matches_the_kkt_conditions_and_the_torch_solver(mn_mod, device, k):
    seeds = 2 if k <= 8 else 1
    mats = [gram_case(kind, k, s) for s in range(seeds) for kind in WELL + DEGENERATE]
    w = mn_mod.min_norm(_batch(device, mats)).cpu().numpy()
    for g, wk, kind in zip(mats, w, (WELL + DEGENERATE) * seeds):
        check_kkt(g, wk)
        wt = torch_weights(g)
        q = regularised(g)
        # Never a worse objective than the torch solver's (1e-9 relative + 1e-15).
        assert wk @ q @ wk <= wt @ q @ wt * (1 + 1e-9) + 1e-15, kind
        if kind in WELL:  # unique, well-conditioned minimiser: the weights agree
            assert np.abs(wk - wt).max() <= 1e-7, (kind, wk, wt)
        if kind == "zero":
            assert np.allclose(wk, 1.0 / k, rtol=0, atol=1e-12)
        if kind == "equal_rows":  # the pair's total weight is the torch solver's
            assert abs((wk[0] + wk[-1]) - (wt[0] + wt[-1])) <= 1e-6
            assert np.abs(wk[1:-1] - wt[1:-1]).max() <= 1e-6


def test_agrees_with_scipy_slsqp(mn_mod, device):
    """An independent solver: scipy's SLSQP on the same problem (well-conditioned, K <= 5)."""
    mats = [gram_case("random", k, s) for k in (3, 4, 5) for s in range(2)]
    for g in mats:
        q = regularised(g)
        k = g.shape[0]
        res = scipy.optimize.minimize(
            lambda w, q=q: w @ q @ w, np.full(k, 1.0 / k), jac=lambda w, q=q: 2 * q @ w, method="SLSQP",
            bounds=[(0, 1)] * k, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
            options={"ftol": 1e-16, "maxiter": 500},
        )
        assert res.success, res.message
        wk = mn_mod.min_norm(torch.tensor(g, device=device)).cpu().numpy()
        assert np.abs(wk - res.x).max() <= 1e-5 * np.abs(res.x).max(), (wk, res.x)


def test_same_steps_as_its_reference(mn_mod, device):
    """The kernel against its own torch reference (same algorithm, Python control flow)."""
    for k in (3, 6):
        mats = [gram_case(kind, k, 0) for kind in WELL + ["zero_row", "opposite_rows"]]
        w = mn_mod.min_norm(_batch(device, mats)).cpu()
        for g, wk in zip(mats, w):
            ref = mn_mod.min_norm_reference(torch.tensor(g))
            assert (wk - ref).abs().max() <= 1e-10, (wk, ref)


@settings(max_examples=12, deadline=None)
@given(
    k=st.integers(3, 6),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-6, 1e6),
    rank=st.integers(1, 8),
)
def test_property_kkt_and_scale_invariance(mn_mod, k, seed, scale, rank):
    """Any PSD Gram matrix: the KKT conditions hold, and scaling G leaves w unchanged."""
    x = np.random.default_rng(seed).standard_normal((k, rank))
    g = x @ x.T
    w = mn_mod.min_norm(torch.tensor(np.stack([g, scale * g]))).numpy()
    check_kkt(g, w[0])
    check_kkt(scale * g, w[1])
    q = regularised(g)
    assert abs(w[0] @ q @ w[0] - w[1] @ q @ w[1]) <= 1e-9 * (w[0] @ q @ w[0]) + 1e-15


@pytest.mark.parametrize("k", [2, 3, 6])
def test_mokd_weights_is_the_method_in_one_launch(mn_mod, device, k):
    """mokd_weights (MoKD's whole stage fused) against MoKD.weights' torch ops on the CPU, for
    each option: log scaling or not, both magnitudes, a loss floor that binds, clipping."""
    from gradbal.methods import MoKD

    losses = torch.tensor(np.random.default_rng(k).uniform(0.1, 2.0, k))
    for opts in ({}, {"log_scale": False}, {"magnitude": "faithful"}, {"max_norm": 0.05},
                 {"loss_floor": 0.5}):  # fmt: skip
        m = MoKD(**opts)
        for kind in WELL + ["zero_row"]:
            g = torch.tensor(gram_case(kind, k, 5))
            ref = m.weights(g, losses)  # CPU: the torch ops
            w = mn_mod.mokd_weights(
                g.to(device), losses.to(device), m.log_scale, m.loss_floor,
                m.log_scale and m.magnitude == "mean_loss", m.max_norm,
            ).cpu()  # fmt: skip
            assert (w - ref).abs().max() <= 1e-7 * ref.abs().max(), (opts, kind, w, ref)
    with pytest.raises(ValueError, match="losses must be"):
        mn_mod.mokd_weights(g.to(device), losses[:1].to(device))


def test_mokd_dispatches_to_the_fused_kernel(monkeypatch, mn_mod):
    """MoKD.weights returns the fused kernel's weights where the min-norm kernels run (K >= 2),
    and the torch ops when iterations is given."""
    from gradbal.methods import MoKD

    seen = []

    def use(gram):
        seen.append(gram.shape[-1])
        return True

    monkeypatch.setattr(MOKD_WEIGHTS, "failed", False)
    monkeypatch.setattr(MOKD_WEIGHTS, "usable", use)
    g = torch.tensor(gram_case("conflicting", 2, 1))
    losses = torch.tensor([0.7, 1.9], dtype=torch.float64)
    assert torch.equal(MoKD().weights(g, losses), mn_mod.mokd_weights(g, losses))
    assert seen == [2]
    w = MoKD(iterations=8).weights(g, losses)  # the torch ops (the closed form at K = 2)
    assert seen == [2]  # not even asked
    fused = MoKD().weights(g, losses)
    assert (w - fused).abs().max() <= 1e-10 * w.abs().max()


@pytest.mark.parametrize("k", [2, 3, 6])
def test_mgda_normalized_weights_is_the_method_in_one_launch(mn_mod, device, k):
    """mgda_normalized_weights (MGDA's normalisers, the min-norm problem and the rescaling
    fused) against MGDANormalized.weights' torch ops on the CPU, for each normaliser, both
    ``apply_to``, a loss floor that binds, a zero gradient (weight 0, as the torch ops)."""
    from gradbal.methods import MGDANormalized

    losses = torch.tensor(np.random.default_rng(k).uniform(0.1, 2.0, k))
    for opts in ({"normalization": "l2"}, {"normalization": "loss"},
                 {"normalization": "loss+", "apply_to": "raw"}, {"normalization": "l2", "apply_to": "raw"},
                 {"normalization": "loss+", "loss_floor": 0.5}):  # fmt: skip
        m = MGDANormalized(**opts)
        for kind in WELL + ["zero_row", "mixed_norms"]:
            g = torch.tensor(gram_case(kind, k, 5))
            ref = m.weights(g, losses)  # CPU: the torch ops
            w = mn_mod.mgda_normalized_weights(
                g.to(device), losses.to(device), m.normalization, m.apply_to, m.loss_floor
            ).cpu()  # fmt: skip
            # With a zero gradient normalised by its norm (l2, loss+) the min-norm point is 0 (that
            # objective is stationary) and the other weights are the ridge's rounding noise
            # (~1e-12 here, against O(0.1) weights otherwise): compared to 1e-11 absolute.
            assert (w - ref).abs().max() <= 1e-7 * max(ref.abs().max(), 1e-4), (opts, kind, w, ref)
    # l2 reads no losses; non-finite entries of G read as 0, as in min_norm (a NaN gradient is
    # a zero one: the torch ops return NaN there)
    g = torch.tensor(gram_case("random", k, 1))
    assert torch.equal(mn_mod.mgda_normalized_weights(g.to(device), None).cpu(),
                       mn_mod.mgda_normalized_weights(g.to(device), losses.to(device)).cpu())  # fmt: skip
    bad, zero = g.clone(), g.clone()
    bad[0, :] = bad[:, 0] = float("nan")
    zero[0, :] = zero[:, 0] = 0.0
    for norm in ("l2", "loss"):
        w = mn_mod.mgda_normalized_weights(bad.to(device), losses.to(device), norm)
        assert torch.equal(w, mn_mod.mgda_normalized_weights(zero.to(device), losses.to(device), norm))
    with pytest.raises(ValueError, match="losses must be"):
        mn_mod.mgda_normalized_weights(g.to(device), None, "loss")
    with pytest.raises(ValueError, match="losses are on meta.*move them"):
        mn_mod.mgda_normalized_weights(g.to(device), losses.to("meta"), "loss")
    with pytest.raises(ValueError, match="losses are on meta.*move them"):
        mn_mod.mokd_weights(g.to(device), losses.to("meta"))
    with pytest.raises(ValueError, match="normalization must be one of"):
        mn_mod.mgda_normalized_weights(g.to(device), None, "none")
    with pytest.raises(ValueError, match="apply_to must be"):
        mn_mod.mgda_normalized_weights(g.to(device), None, "l2", "both")


def test_mgda_normalized_dispatches_to_the_fused_kernel(monkeypatch, mn_mod):
    """MGDANormalized.weights returns the fused kernel's weights where it is chosen, the torch
    ops for "none" (plain MGDA's path) or a given iteration count, and falls back once."""
    from gradbal.methods import MGDANormalized

    monkeypatch.setattr(MGDA_NORMALIZED, "failed", False)
    monkeypatch.setattr(MGDA_NORMALIZED, "usable", lambda t: not MGDA_NORMALIZED.failed)
    g = torch.tensor(gram_case("conflicting", 4, 1))
    losses = torch.tensor([0.7, 1.9, 0.2, 1.1], dtype=torch.float64)
    m = MGDANormalized(normalization="loss+")
    torch_w = MGDANormalized(normalization="loss+", iterations=9).weights(g, losses)
    assert torch.equal(m.weights(g, losses), mn_mod.mgda_normalized_weights(g, losses, "loss+"))
    assert m.weights(g.float(), losses).dtype == torch.float32
    with pytest.raises(ValueError, match="needs the loss values"):
        m.weights(g, None)
    plain = MGDANormalized(normalization="none").weights(g, None)
    assert torch.equal(plain, solvers.min_norm_simplex(g))
    w = fall_back_once(monkeypatch, lambda: m.weights(g, losses), "normalised-MGDA kernel failed.*torch solvers")
    assert (w - torch_w).abs().max() <= 1e-7 * w.abs().max()


# ------------------------------------------------------------------------- wrapper / kernel


def test_batch_dims_strides_float32_and_full_write(mn_mod, device, monkeypatch):
    mats = [gram_case("random", 4, s) for s in range(6)]
    g = _batch(device, mats)
    monkeypatch.setattr(mn_mod, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    w = mn_mod.min_norm(g)
    assert torch.isfinite(w).all()
    # Batch dims, a transposed (non-contiguous) view, float32 input: the same weights.
    assert torch.equal(mn_mod.min_norm(g.reshape(2, 3, 4, 4)).reshape(6, 4), w)
    assert torch.equal(mn_mod.min_norm(g.mT), w)  # G is symmetric, read with other strides
    w32 = mn_mod.min_norm(g.float())
    assert w32.dtype == torch.float64 and (w32 - w).abs().max() <= 1e-5
    # Deterministic: the same bits twice.
    assert torch.equal(mn_mod.min_norm(g).view(torch.int64), w.view(torch.int64))
    assert mn_mod.min_norm(g[:0]).shape == (0, 4)


def test_wrapper_errors(mn_mod, device):
    g = torch.eye(4, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"\[\.\.\., K, K\]"):
        mn_mod.min_norm(torch.ones(3, 4, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="K must be in"):
        mn_mod.min_norm(torch.eye(33, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="dtype"):
        mn_mod.min_norm(g.half())
    with pytest.raises(ValueError, match="max_iter"):
        mn_mod.min_norm(g, max_iter=-1)
    # max_iter = 0: the best vertex (the smallest diagonal entry), still on the simplex.
    g2 = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64, device=device))
    assert mn_mod.min_norm(g2, max_iter=0).cpu().tolist() == [0.0, 1.0, 0.0]


def test_not_a_gram_matrix_gives_a_finite_point_of_the_simplex(mn_mod, device):
    """Garbage in (indefinite, a negative diagonal entry): never NaN, always on the simplex."""
    bad = torch.tensor(
        [[[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, -1.0]],
         [[1.0, 3.0, 3.0], [3.0, 1.0, 3.0], [3.0, 3.0, 1.0]],
         [[-1.0, 0.0, 0.0], [0.0, -2.0, 0.0], [0.0, 0.0, -3.0]]],
        dtype=torch.float64, device=device,
    )  # fmt: skip
    w = mn_mod.min_norm(bad)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(3, dtype=torch.float64, device=device))


def test_non_finite_entries_read_as_zero(mn_mod, device):
    g = torch.tensor(gram_case("random", 4, 3), device=device)
    bad = g.clone()
    bad[0, 1] = bad[1, 0] = float("nan")
    clean = g.clone()
    clean[0, 1] = clean[1, 0] = 0.0
    assert torch.equal(mn_mod.min_norm(bad), mn_mod.min_norm(clean))


# ------------------------------------------------------------------------------- dispatch


def test_dispatch_runs_the_kernel_and_falls_back_once(monkeypatch, mn_mod):
    """Through min_norm_simplex: the kernel's weights where it is chosen; a failing kernel
    warns once and the torch solver answers, then and from then on."""
    g = torch.tensor(gram_case("conflicting", 5, 1))
    monkeypatch.setattr(MIN_NORM, "failed", False)
    monkeypatch.setattr(MIN_NORM, "usable", lambda t: not MIN_NORM.failed)
    assert torch.equal(solvers.min_norm_simplex(g), mn_mod.min_norm(g))
    assert solvers.min_norm_simplex(g.float()).dtype == torch.float32
    w = fall_back_once(monkeypatch, lambda: solvers.min_norm_simplex(g), "min-norm kernel failed.*torch solvers")
    check_kkt(g.numpy(), w.numpy())


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_methods_use_the_kernel_without_host_sync():
    """On CUDA, mgda / mokd / mgda_l2 / mgda_loss+ weights at K = 3..16 (the fused ones also at
    K = 2) come from the
    kernels (one launch), make no host sync, and agree with the CPU solvers on
    well-conditioned Gram matrices."""
    import gradbal
    from gradbal import kernels

    dev = torch.device("cuda")
    for k in (2, 3, 4, 8, 16):
        g = torch.tensor(gram_case("conflicting", k, 2))
        losses = torch.rand(k, dtype=torch.float64) + 0.5
        for name in ("mgda", "mokd", "mgda_l2", "mgda_loss+"):
            m = gradbal.get_method(name)
            ref = m.weights(g, losses)
            g_dev, l_dev = g.to(dev), losses.to(dev)
            w = without_sync(lambda m=m, g_dev=g_dev, l_dev=l_dev: m.weights(g_dev, l_dev))
            assert (w.cpu() - ref).abs().max() <= 1e-7 * ref.abs().max(), (name, k)
        if k >= 3:
            assert torch.equal(solvers.min_norm_simplex(g.to(dev)), kernels.min_norm(g.to(dev)))
