"""GradDrop (Chen et al., NeurIPS 2020): the elementwise hook, against a direct transcription
of the paper's Algorithm 1 with the same random numbers, and its properties."""

from __future__ import annotations

import copy

import pytest
import torch

import gradbal
from gradbal.methods import get_method
from gradbal.methods._common import draw_seed

F64 = torch.float64


def reference(grads: torch.Tensor, noise: torch.Tensor, leak=None) -> torch.Tensor:
    """Algorithm 1, written out: P = 1/2 (1 + sum g / sum |g|), M = [P > U][g > 0] +
    [P < U][g < 0], M <- l + (1 - l) M, d = sum M g."""
    p = 0.5 * (1 + grads.sum(0) / grads.abs().sum(0))
    mask = ((p > noise) & (grads > 0)) | ((p < noise) & (grads < 0))
    mask = mask.to(grads.dtype)
    if leak is not None:
        leak = torch.as_tensor(leak, dtype=grads.dtype).unsqueeze(1)
        mask = leak + (1 - leak) * mask
    return (mask * grads).sum(0)


def conflicting(k, n, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, n, generator=gen, dtype=dtype)
    g[:, : n // 10] = 0  # some all-zero coordinates
    g[0, n // 10 : n // 5] = 0  # and some zeros in one row
    return g


@pytest.mark.parametrize("k,n", [(2, 1000), (4, 3 * 65536 + 123), (7, 5000)])
@pytest.mark.parametrize("leak", [None, "half"])
def test_matches_the_paper_with_the_same_noise(k, n, leak):
    grads = conflicting(k, n, seed=k)
    leak = None if leak is None else [0.5] * (k - 1) + [0.0]
    m = get_method("graddrop", leak=leak)
    out = torch.empty(n, dtype=F64)
    m.combine(grads, out, False, torch.Generator().manual_seed(3))
    noise = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(out, reference(grads, noise, leak), rtol=1e-12, atol=1e-12)


def test_aggregate_seeds_the_noise_from_the_generator():
    grads = conflicting(3, 4000)
    d = gradbal.aggregate(grads, "graddrop", generator=torch.Generator().manual_seed(11))
    seed = draw_seed(torch.Generator().manual_seed(11))
    noise = torch.rand(4000, generator=torch.Generator().manual_seed(seed), dtype=F64)
    torch.testing.assert_close(d, reference(grads, noise))
    again = gradbal.aggregate(grads, "graddrop", generator=torch.Generator().manual_seed(11))
    assert torch.equal(d, again)
    other = gradbal.aggregate(grads, "graddrop", generator=torch.Generator().manual_seed(12))
    assert not torch.equal(d, other)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_agreeing_signs_drop_nothing(dtype):
    gen = torch.Generator().manual_seed(0)
    k, n = 5, 20000
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
    grads = torch.rand(k, n, generator=gen, dtype=dtype) * sign
    grads[1, ::3] = 0  # zeros do not count as a conflict
    grads[:, 7] = 1e-30 * sign[7]  # tiny gradients neither
    for seed in range(3):
        d = gradbal.aggregate(grads, "graddrop", generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(d, grads.sum(0))


def test_each_coordinate_keeps_one_sign_and_full_leak_is_the_sum():
    grads = conflicting(4, 10000, seed=1)
    d = gradbal.aggregate(grads, "graddrop", generator=torch.Generator().manual_seed(0))
    pos = grads.clamp_min(0).sum(0)
    neg = grads.clamp_max(0).sum(0)
    assert bool(((d == pos) | (d == neg)).all())
    assert bool((d == pos).any() and (d == neg).any())
    full = gradbal.aggregate(grads, "graddrop", leak=[1.0] * 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(full, grads.sum(0))


def test_expectation_is_the_sign_purity_mixture():
    # g1 = 1, g2 = -1/3 everywhere: P = 3/4, E[d] = 3/4 * 1 + 1/4 * (-1/3) = 2/3.
    n = 200000
    grads = torch.stack([torch.ones(n, dtype=F64), torch.full((n,), -1 / 3, dtype=F64)])
    d = gradbal.aggregate(grads, "graddrop", generator=torch.Generator().manual_seed(0))
    assert abs(float(d.mean()) - 2 / 3) < 5e-3
    assert abs(float((d == 1).double().mean()) - 0.75) < 5e-3


def test_accumulate_and_half_precision():
    grads = conflicting(3, 3000, dtype=torch.float32)
    m = get_method("graddrop")
    base = torch.randn(3000)
    out = base.clone()
    m.combine(grads, out, True, torch.Generator().manual_seed(5))
    fresh = torch.empty(3000)
    m.combine(grads, fresh, False, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, base + fresh)
    half = grads.to(torch.bfloat16)
    out16 = torch.empty(3000, dtype=torch.bfloat16)
    m.combine(half, out16, False, torch.Generator().manual_seed(5))
    noise = torch.rand(3000, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out16, reference(half.float(), noise).to(torch.bfloat16))


def test_options_and_errors():
    with pytest.raises(ValueError, match="leak must be in"):
        get_method("graddrop", leak=[0.5, 1.5])
    m = get_method("graddrop", leak=[0.0, 0.0])
    with pytest.raises(ValueError, match="2 leak values but 3"):
        gradbal.aggregate(torch.ones(3, 4), m)
    assert get_method("graddrop").elementwise and not get_method("graddrop").needs_gram


# ---------------------------------------------------------------------- optimizer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _losses(model, x):
    out = model(x)
    return [out[:, 0].pow(2).mean(), (out[:, 1] - 1).pow(2).mean(), out[:, 2].mean()]


def test_optimizer_gradient_is_graddrop_of_the_task_gradients():
    model = _model()
    x = torch.randn(16, 5, dtype=F64)
    params = list(model.parameters())
    rows = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for loss in _losses(model, x)
    ])
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(params, lr=0.1), "graddrop", seed=9)
    seed = draw_seed(torch.Generator().manual_seed(9))
    opt.backward(_losses(model, x))
    noise = torch.rand(rows.shape[1], generator=torch.Generator().manual_seed(seed), dtype=F64)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(flat, reference(rows, noise), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.last_stats.gram, rows @ rows.T)
    assert torch.equal(opt.last_stats.weights, torch.ones(3, dtype=F64))


def test_optimizer_resume_is_bit_identical_and_no_host_sync(monkeypatch):
    from tests.test_optimizer import SyncTrap

    model = _model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "graddrop", seed=1)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 5, generator=gen, dtype=F64) for _ in range(4)]

    def run(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            opt.backward(_losses(model, x))
            opt.step()

    run(model, opt, xs[:2])
    model2 = copy.deepcopy(model)
    opt2 = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9), "graddrop", seed=2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(model, opt, xs[2:])
    run(model2, opt2, xs[2:])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # No host sync from the first backward to step().
    trap = SyncTrap(monkeypatch)
    opt.zero_grad()
    opt.backward(_losses(model, xs[0]))
    trap.armed = False
    opt.step()
