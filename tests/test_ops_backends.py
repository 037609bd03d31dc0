"""The ops layer: backend selection, the Triton kernels behind the optimizer, fallback.

On a CPU-only machine the Triton kernels run under Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before any kernel module is imported)."""

import warnings

import pytest
import torch
from torch import nn

import gradbal
from gradbal import _ops

F = nn.functional


def train_twice(backend, method, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 5))
    opt = gradbal.MultiObjectiveOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), method, backend=backend, seed=1
    )
    gen = torch.Generator().manual_seed(0)
    grads, weights = [], []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 5, (16,), generator=gen)
        out = model(x)
        losses = [F.cross_entropy(out, y), out.pow(2).mean(), (out[:, :2] - 1).abs().mean()]
        opt.zero_grad()
        opt.backward(losses)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        weights.append(opt.last_stats.weights.clone())
        opt.step()
    return grads, weights


@pytest.mark.parametrize("method", ["mokd", "pcgrad", "mean"])
def test_optimizer_through_triton_kernels_matches_torch(method):
    g_t, w_t = train_twice("torch", method)
    g_k, w_k = train_twice("triton", method)
    for a, b in zip(w_t, w_k):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_t, g_k):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_backend_resolution(monkeypatch):
    rows = torch.ones(2, 3)
    assert _ops.resolve_backend(rows) == "torch"  # CPU tensors default to torch
    assert _ops.resolve_backend(rows, "triton") == "triton"
    monkeypatch.setenv("GRADBAL_BACKEND", "torch")
    assert _ops.resolve_backend(rows) == "torch"
    monkeypatch.setenv("GRADBAL_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="GRADBAL_BACKEND must be one of"):
        _ops.resolve_backend(rows)
    with pytest.raises(ValueError, match="backend must be one of"):
        _ops.resolve_backend(rows, "numpy")


def test_failing_kernels_fall_back_to_torch_with_one_warning(monkeypatch):
    """A kernel that fails to compile must never give silent wrong results."""

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(_ops, "_triton_ops", lambda: (broken, broken))
    monkeypatch.setattr(_ops, "resolve_backend", lambda rows, backend="auto": "triton")
    monkeypatch.setattr(_ops, "_triton_failed", False)
    rows = torch.randn(3, 10, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falling back to torch"):
        g = _ops.gram(rows)
    torch.testing.assert_close(g, rows @ rows.T)
    assert _ops._triton_failed
    # Asked for explicitly, the failure is an error, not a fallback.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="no kernel image"):
            _ops.gram(rows, backend="triton")
