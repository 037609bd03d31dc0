"""Method hooks seen from the callers: aggregate skips the Gram pass for methods that do not
read it; a failure after ``weights()`` in the optimizer's Gram path changes nothing."""

from __future__ import annotations

import pytest
import torch

import gradbal
from gradbal import _ops
from gradbal.methods import get_method

F64 = torch.float64

GRAM_FREE = ["sum", "mean", "weighted", "rlw", "famo", "mokd_amortized", "uw", "dwa", "graddrop"]


def test_needs_gram_flags():
    for name in gradbal.available_methods():
        m = get_method(name, **({"weights": [1.0, 2.0]} if name == "weighted" else {}))
        assert m.needs_gram == (name not in GRAM_FREE), name
        if not m.requires_task_gradients:
            assert not m.needs_gram, name


@pytest.mark.parametrize("name", GRAM_FREE)
def test_aggregate_skips_the_gram_pass(name, monkeypatch):
    grads = torch.randn(2, 50, generator=torch.Generator().manual_seed(0), dtype=F64)
    options = {"weights": [0.25, 2.0]} if name == "weighted" else {}
    needs_losses = get_method(name, **options).requires_losses
    losses = torch.tensor([0.5, 2.0], dtype=F64) if needs_losses else None
    expected = gradbal.aggregate(grads, name, losses=losses, generator=torch.Generator().manual_seed(1), **options)

    def no_gram(*args, **kwargs):
        raise AssertionError("the Gram pass ran")

    monkeypatch.setattr(_ops, "gram", no_gram)
    got = gradbal.aggregate(grads, name, losses=losses, generator=torch.Generator().manual_seed(1), **options)
    torch.testing.assert_close(got, expected)
    if name in ("sum", "mean", "weighted"):
        w = {"sum": [1.0, 1.0], "mean": [0.5, 0.5], "weighted": [0.25, 2.0]}[name]
        torch.testing.assert_close(got, torch.tensor(w, dtype=F64) @ grads)


def _setup(method, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), method)
    return model, opt


def _losses(model, seed):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    out = model(x)
    return [out[:, 0].pow(2).mean(), (out[:, 1] - 1).pow(2).mean(), out[:, 2].exp().mean()]


@pytest.mark.parametrize("method", ["gradvac", "nash_mtl", "pcgrad", "graddrop"])
def test_failure_after_weights_in_the_gram_path_changes_nothing(method, monkeypatch):
    model, opt = _setup(method)
    for seed in range(2):  # state, momentum and live .grad views
        opt.backward(_losses(model, seed))
        opt.step()
    before = (
        [p.detach().clone() for p in model.parameters()],
        [(p.grad.data_ptr(), p.grad.clone()) for p in model.parameters()],
        repr(opt.method.state_dict()),
        opt.generator.get_state().clone(),
    )

    def broken(*args, **kwargs):
        raise RuntimeError("combine failed")

    if method == "graddrop":
        monkeypatch.setattr(type(opt.method), "combine", broken)
    else:
        monkeypatch.setattr(_ops, "combine", broken)
    with pytest.raises(RuntimeError, match="combine failed"):
        opt.backward(_losses(model, 5))
    after = (
        [p.detach().clone() for p in model.parameters()],
        [(p.grad.data_ptr(), p.grad.clone()) for p in model.parameters()],
        repr(opt.method.state_dict()),
        opt.generator.get_state().clone(),
    )
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert [ptr for ptr, _ in before[1]] == [ptr for ptr, _ in after[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before[1], after[1]))
    assert before[2] == after[2]
    assert torch.equal(before[3], after[3])
    monkeypatch.undo()
    opt.backward(_losses(model, 5))  # works again
    opt.step()
