"""The eigendecomposition kernel (gradbal.kernels.eigh) against an independent reference
(LAPACK through numpy/scipy, on numpy arrays), the torch Jacobi method and its own torch
reference; its wrapper's checks; sym_eig's dispatch to it. Under Triton's interpreter on CPU
(a K = 16 matrix takes ~7 s there in the cyclic order: the cases are batched and few),
compiled on CUDA. Both rotation orders (``order="cyclic"``, the default, and "parallel").

Accuracy checked on every case, float64: eigenvalues within 1e-12 max|lambda| of LAPACK's,
ascending; ``||V^T V - I|| <= 1e-12``; ``||A V - V diag(lambda)|| <= 1e-11 ||A||``.
"""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import gradbal
from gradbal import _solver_kernels, solvers_qp
from gradbal._solver_kernels import EIGH

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def eigh_mod():
    return importlib.import_module("gradbal.kernels.eigh")


# ------------------------------------------------------------------------------- matrices


def _orth(k: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return q


def case(kind: str, k: int, seed: int) -> np.ndarray:
    """A symmetric float64 [k, k] test matrix of the given kind."""
    rng = np.random.default_rng(1000 * seed + 10 * k + len(kind))
    if kind == "random":
        x = rng.standard_normal((k, k))
        return x + x.T
    if kind == "rank_deficient":  # G = X X^T, rank max(1, k // 2) < k
        x = rng.standard_normal((k, max(1, k // 2)))
        return x @ x.T
    if kind == "graded":  # eigenvalues +-1e-8 .. 1e8
        ev = np.logspace(-8, 8, k) * rng.choice([-1.0, 1.0], k)
        q = _orth(k, rng)
        return (q * ev) @ q.T
    if kind == "zero":
        return np.zeros((k, k))
    if kind == "zero_row":  # a zero gradient: zero row and column of a Gram matrix
        x = rng.standard_normal((k, k + 3))
        x[k // 2] = 0
        return x @ x.T
    if kind == "equal_rows":  # two equal gradients
        x = rng.standard_normal((k, k + 3))
        x[-1] = x[0]
        return x @ x.T
    if kind == "diagonal":
        return np.diag(rng.standard_normal(k) * 10.0 ** rng.integers(-3, 4, k))
    if kind == "repeated":  # eigenvalues in equal pairs (a triple for odd k > 2)
        ev = np.repeat(rng.standard_normal((k + 1) // 2), 2)[:k]
        q = _orth(k, rng)
        return (q * ev) @ q.T
    raise ValueError(kind)


KINDS = [
    "random", "rank_deficient", "graded", "zero", "zero_row", "equal_rows", "diagonal", "repeated",
]

# (K, seeds): every kind for each seed. Interpreter cost per matrix (cyclic order): K = 2..5:
# <= 0.4 s, K = 8: ~1.2 s, K = 16: ~7 s (parallel: ~1 s), so K = 16 gets three kinds only.
PLAN = [(2, 3), (3, 3), (4, 3), (5, 2), (8, 1)]
K16_KINDS = ["random", "graded", "repeated"]


def _to(device, arrays) -> torch.Tensor:
    return torch.tensor(np.stack(arrays), dtype=torch.float64, device=device)


def check_decomposition(a: np.ndarray, w: torch.Tensor, v: torch.Tensor) -> None:
    """Accuracy of (w, v) for the symmetric a (numpy, [B, K, K]) against LAPACK."""
    w = w.cpu().numpy()
    v = v.cpu().numpy()
    k = a.shape[-1]
    for b in range(a.shape[0]):
        ref = scipy.linalg.eigh(a[b], eigvals_only=True)
        top = max(np.abs(ref).max(), np.finfo(float).tiny)
        norm = np.linalg.norm(a[b], 2)
        assert np.all(np.diff(w[b]) >= 0), (b, w[b])
        assert np.abs(w[b] - ref).max() <= 1e-12 * top, (b, w[b], ref)
        assert np.linalg.norm(v[b].T @ v[b] - np.eye(k), 2) <= 1e-12, b
        resid = np.linalg.norm(a[b] @ v[b] - v[b] * w[b], 2)
        assert resid <= 1e-11 * norm, (b, resid, norm)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float64 tensor (NaNs compare equal to themselves)."""
    return t.contiguous().view(torch.int64)


def _nan_empty(*shape, **kwargs):
    """torch.empty that fills the buffer with NaN: an output entry the kernel does not write
    shows."""
    return torch.empty(*shape, **kwargs).fill_(float("nan"))


def _run(eigh_mod, a: torch.Tensor):
    return eigh_mod.jacobi_eigh(a)


# ------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("k,seeds", PLAN)
def test_matches_lapack(eigh_mod, device, k, seeds):
    mats = [case(kind, k, s) for s in range(seeds) for kind in KINDS]
    a = _to(device, mats)
    w, v = _run(eigh_mod, a)
    assert w.shape == (len(mats), k) and v.shape == (len(mats), k, k)
    assert w.dtype == v.dtype == torch.float64
    assert w.is_contiguous() and v.is_contiguous()
    check_decomposition(np.stack(mats), w, v)
    # The torch Jacobi method (parallel ordering, other sweeps) agrees on the eigenvalues.
    wt, _ = solvers_qp.jacobi_eigh(a.cpu())
    top = wt.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    assert ((w.cpu() - wt).abs() <= 1e-12 * top).all()


@pytest.mark.parametrize("order", ["cyclic", "parallel"])
def test_matches_lapack_k16(eigh_mod, device, order):
    mats = [case(kind, 16, 0) for kind in K16_KINDS]
    w, v = eigh_mod.jacobi_eigh(_to(device, mats), order=order)
    check_decomposition(np.stack(mats), w, v)
    wt, _ = solvers_qp.jacobi_eigh(_to("cpu", mats))
    assert ((w.cpu() - wt).abs() <= 1e-12 * wt.abs().amax(-1, keepdim=True)).all()


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_parallel_order_matches_lapack(eigh_mod, device, k):
    """order="parallel" (odd and even K: the circle method's bye; K = 1, 2: a padded tile)."""
    mats = [case(kind, k, 1) for kind in KINDS]
    w, v = eigh_mod.jacobi_eigh(_to(device, mats), order="parallel")
    check_decomposition(np.stack(mats), w, v)


@pytest.mark.parametrize("order", ["cyclic", "parallel"])
def test_same_rotations_as_its_torch_reference(eigh_mod, device, order):
    """The kernel runs the algorithm of eigh_reference (same rotations, same order)."""
    for mats in ([case("random", 5, 3), case("repeated", 5, 3)],
                 [case("random", 6, 1), case("graded", 6, 1)]):  # fmt: skip
        w, v = eigh_mod.jacobi_eigh(_to(device, mats), order=order)
        for b, m in enumerate(mats):
            wr, vr = eigh_mod.eigh_reference(torch.tensor(m), order=order)
            assert torch.allclose(w[b].cpu(), wr, rtol=0, atol=1e-14 * wr.abs().max())
            assert torch.allclose(v[b].cpu(), vr, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="order must be one of"):
        eigh_mod.jacobi_eigh(_to(device, mats), order="random")


@pytest.mark.parametrize("order", ["cyclic", "parallel"])
def test_leaving_at_convergence_changes_no_bit(eigh_mod, order):
    """The kernel leaves its sweeps once every off-diagonal entry is <= 2^-60, where each later
    rotation is the identity. On the algorithm's torch twin: the eigenpairs with that exit and
    with every sweep run are the same bits (torch.equal: -0.0 == 0.0), on every kind, with
    sweeps to spare (the exit saves some)."""
    saved = 0
    for kind in KINDS:
        m = torch.tensor(case(kind, 6, 2))
        w, v = eigh_mod.eigh_reference(m, order=order)
        w_all, v_all = eigh_mod.eigh_reference(m, order=order, converge=False)
        assert torch.equal(w, w_all) and torch.equal(v, v_all), kind
        for sweeps in range(eigh_mod.default_sweeps(6, order)):
            ws, vs = eigh_mod.eigh_reference(m, sweeps, order=order, converge=False)
            if torch.equal(ws, w_all) and torch.equal(vs, v_all):
                saved += eigh_mod.default_sweeps(6, order) - sweeps
                break
    assert saved > 0


def test_k1_and_empty_batch(eigh_mod, device):
    a = torch.tensor([[[-3.5]], [[0.0]]], dtype=torch.float64, device=device)
    w, v = eigh_mod.jacobi_eigh(a)
    assert w.tolist() == [[-3.5], [0.0]] and v.tolist() == [[[1.0]], [[1.0]]]
    w, v = eigh_mod.jacobi_eigh(torch.zeros(0, 3, 3, dtype=torch.float64, device=device))
    assert w.shape == (0, 3) and v.shape == (0, 3, 3)


def test_batch_dims_strides_and_float32(eigh_mod, device):
    """[..., K, K] input, a non-contiguous (transposed, strided) view and float32 input."""
    mats = np.stack([case(kind, 3, 7) for kind in KINDS[:6]]).reshape(2, 3, 3, 3)
    a = torch.tensor(mats, device=device)
    w, v = eigh_mod.jacobi_eigh(a)
    assert w.shape == (2, 3, 3) and v.shape == (2, 3, 3, 3)
    check_decomposition(mats.reshape(6, 3, 3), w.reshape(6, 3), v.reshape(6, 3, 3))
    # A strided, transposed view of a bigger buffer: the same matrices (they are symmetric).
    big = torch.zeros(6, 5, 7, dtype=torch.float64, device=device)
    big[:, 1:4, 2:5] = a.reshape(6, 3, 3)
    view = big[:, 1:4, 2:5].transpose(1, 2)
    w2, v2 = eigh_mod.jacobi_eigh(view)
    assert torch.equal(bits(w2), bits(w.reshape(6, 3))) and torch.equal(v2, v.reshape(6, 3, 3))
    # float32 input is read as float64 (the decomposition of the float32 values).
    a32 = a.reshape(6, 3, 3).float()
    w3, v3 = eigh_mod.jacobi_eigh(a32)
    assert w3.dtype == torch.float64
    check_decomposition(a32.double().cpu().numpy(), w3, v3)


def test_reads_the_symmetric_part_and_nonfinite_as_zero(eigh_mod, device):
    """Like solvers_qp._sym: (A + A^T) / 2 with inf/NaN read as 0."""
    m = case("random", 4, 1)
    skew = np.triu(np.ones((4, 4)), 1) * 0.25
    a = torch.tensor(np.stack([m + skew - skew.T]), device=device)
    bad = a.clone()
    bad[0, 0, 3] = float("nan")
    bad[0, 2, 1] = float("inf")
    w, v = eigh_mod.jacobi_eigh(a)
    check_decomposition(m[None], w, v)
    m_bad = m.copy()
    # The partner entries a[3, 0] = m[3, 0] - 0.25 and a[1, 2] = m[1, 2] + 0.25 are halved.
    m_bad[0, 3] = m_bad[3, 0] = 0.5 * (m[3, 0] - 0.25)
    m_bad[2, 1] = m_bad[1, 2] = 0.5 * (m[1, 2] + 0.25)
    wb, vb = eigh_mod.jacobi_eigh(bad)
    check_decomposition(m_bad[None], wb, vb)


def test_outputs_fully_written_and_deterministic(eigh_mod, device, monkeypatch):
    monkeypatch.setattr(eigh_mod, "_alloc", _nan_empty)
    a = _to(device, [case(kind, 5, 4) for kind in ("random", "zero", "repeated")])
    w1, v1 = eigh_mod.jacobi_eigh(a)
    w2, v2 = eigh_mod.jacobi_eigh(a)
    assert torch.isfinite(w1).all() and torch.isfinite(v1).all()
    assert torch.equal(bits(w1), bits(w2)) and torch.equal(bits(v1), bits(v2))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    k=st.integers(2, 5),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.integers(-30, 30),
)
def test_property_random_symmetric(eigh_mod, k, seed, log_scale):
    """Random symmetric matrices at any scale (the kernel scales by max|a| first)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, k))
    m = (x + x.T) * 10.0**log_scale
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w, v = eigh_mod.jacobi_eigh(torch.tensor(m[None], device=dev))
    check_decomposition(m[None], w, v)


# ------------------------------------------------------------------------------- errors


def test_argument_errors(eigh_mod, device):
    with pytest.raises(ValueError, match="K, K"):
        eigh_mod.jacobi_eigh(torch.zeros(3, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="K, K"):
        eigh_mod.jacobi_eigh(torch.zeros(2, 3, 4, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="K, K"):
        eigh_mod.jacobi_eigh([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"\[1, 32\]"):
        eigh_mod.jacobi_eigh(torch.zeros(33, 33, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"\[1, 32\]"):
        eigh_mod.jacobi_eigh(torch.zeros(0, 0, dtype=torch.float64, device=device))
    for dtype in (torch.float16, torch.bfloat16, torch.int64, torch.complex128):
        with pytest.raises(TypeError, match="dtype"):
            eigh_mod.jacobi_eigh(torch.zeros(3, 3, dtype=dtype, device=device))
    for sweeps in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="sweeps"):
            eigh_mod.jacobi_eigh(torch.eye(3, dtype=torch.float64, device=device), sweeps)


def test_needs_cuda_when_compiled(eigh_mod, monkeypatch):
    monkeypatch.setattr(eigh_mod, "INTERPRETED", False)
    with pytest.raises(ValueError, match="CUDA"):
        eigh_mod.jacobi_eigh(torch.eye(3, dtype=torch.float64))


def test_default_sweeps(eigh_mod):
    assert [eigh_mod.default_sweeps(k) for k in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == [
        1, 1, 5, 6, 9, 9, 11, 11, 14, 14,
    ]
    assert eigh_mod.default_sweeps(32, "parallel") == 15
    # sweeps=0: the diagonal, sorted, and V = I permuted accordingly.
    a = torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)).unsqueeze(0)
    w, v = eigh_mod.jacobi_eigh(a, sweeps=0)
    assert w.tolist() == [[-1.0, 2.0, 3.0]]
    assert v[0].tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


# ------------------------------------------------------------------------------- dispatch


def test_sym_eig_triton_method(eigh_mod, device):
    g = _to(device, [case("rank_deficient", 4, 2)])[0]
    w, v = solvers_qp.sym_eig(g, method="triton")
    assert torch.equal(w, eigh_mod.jacobi_eigh(g)[0])
    check_decomposition(g.cpu().numpy()[None], w[None], v[None])
    with pytest.raises(ValueError, match="'auto', 'eigh', 'jacobi' or 'triton'"):
        solvers_qp.sym_eig(g, method="cuda")


def test_sym_eig_auto_keeps_lapack_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the kernel ran on a CPU tensor")

    monkeypatch.setattr(_solver_kernels, "kernel_function", lambda name: boom)
    g = torch.tensor(case("random", 4, 0))
    w, v = solvers_qp.sym_eig(g)
    we, ve = torch.linalg.eigh(g)
    assert torch.equal(w, we) and torch.equal(v, ve)


def test_kernel_failure_falls_back_once(monkeypatch):
    """A kernel that fails (a GPU Triton cannot compile for): one warning, torch Jacobi."""
    calls = []

    def broken(a):
        calls.append(1)
        raise RuntimeError("no sm_xx support")

    monkeypatch.setattr(EIGH, "failed", False)
    monkeypatch.setattr(_solver_kernels, "kernel_function", lambda name: broken)
    monkeypatch.setattr(EIGH, "usable", lambda g: not EIGH.failed)
    g = torch.tensor(case("random", 4, 5), device="meta")  # not CPU: the Jacobi path
    with pytest.warns(RuntimeWarning, match="falling back to the torch Jacobi"):
        w, v = solvers_qp.sym_eig(g)
    assert w.shape == (4,) and v.shape == (4, 4) and EIGH.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solvers_qp.sym_eig(g)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="sm_xx"):
        solvers_qp.sym_eig(g, method="triton")  # forced: the error is the caller's


# ------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernel_no_sync_and_methods(eigh_mod):
    dev = torch.device("cuda")
    for k in (2, 4, 8, 16):
        mats = [case(kind, k, s) for s in range(2) for kind in KINDS]
        a = _to(dev, mats)
        w, v = eigh_mod.jacobi_eigh(a)
        we = torch.linalg.eigh(a)[0]
        top = we.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        assert ((w - we).abs() <= 1e-12 * top).all(), k
        check_decomposition(np.stack(mats), w, v)
    a = _to(dev, [case("random", 8, 0)])
    eigh_mod.jacobi_eigh(a)  # warm-up (compilation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eigh_mod.jacobi_eigh(a)
        solvers_qp.sym_eig(a[0])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for name in ("aligned_mtl", "imtl_g", "config"):
        for k in (3, 4, 8, 16):
            x = torch.tensor(np.random.default_rng(k).standard_normal((k, 3 * k)))
            gram = x @ x.T
            losses = torch.ones(k, dtype=torch.float64)
            cpu = gradbal.get_method(name).weights(gram, losses)
            gpu_w = gradbal.get_method(name).weights(gram.to(dev), losses.to(dev))
            scale = cpu.abs().max()
            assert ((gpu_w.cpu() - cpu).abs() <= 1e-9 * scale).all(), (name, k)
