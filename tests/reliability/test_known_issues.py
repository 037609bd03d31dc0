"""Minimal repros of contract violations the fuzz test found, now fixed (kept as regression tests).

The contract (MultiObjectiveOptimizer's docstring and the reliability issue): with
``nonfinite="raise"`` a step whose balanced gradient is not finite raises
``FloatingPointError`` and updates nothing; after an error, parameters, ``.grad`` and all
state (wrapped optimizer, method, generator) are unchanged.
"""

import copy

import pytest
import torch

import gradbal


def scalar_problem(method, **kw):
    p = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD([p], lr=0.1), method, seed=0, **kw)
    return p, opt


class NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss value with a NaN gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")



@pytest.mark.parametrize("method", ["uw", "famo", "dwa", "mokd_amortized", "rlw"])
def test_loss_based_method_refuses_a_nan_gradient(method):
    p, opt = scalar_problem(method)
    opt.backward([(p - 2) ** 2, NaNGrad.apply((p + 1) ** 2)])  # finite loss values
    with pytest.raises(FloatingPointError):
        opt.step()
    assert p.item() == 1.0



@pytest.mark.parametrize("method", ["mokd", "mgda_loss"])
def test_loss_reading_gram_method_refuses_an_infinite_loss_value(method):
    p, opt = scalar_problem(method)
    opt.backward([(p - 2) ** 2, (p + 1) ** 2 + float("inf")])  # finite gradients
    with pytest.raises(FloatingPointError):
        opt.step()  # today: mokd writes NaN into p, mgda_loss silently takes a zero step
    assert p.item() == 1.0



@pytest.mark.parametrize("method", ["fairgrad", "nash_mtl"])
def test_antiparallel_rank_one_gradients_give_no_nan_step(method):
    p = torch.nn.Parameter(torch.tensor(1.0))  # float32: gradients 0.15 and -0.45
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD([p], lr=0.1), method)
    opt.backward([0.15 * p, -0.45 * p + 1])
    try:
        opt.step()
    except FloatingPointError:
        pass  # refusing the step is acceptable, applying NaN is not
    assert torch.isfinite(p).all(), (opt.last_stats.gram, opt.last_stats.weights)



@pytest.mark.parametrize("method", ["pcgrad", "gradvac", "nash_mtl"])
def test_refused_step_leaves_method_state_and_generator(method):
    p, opt = scalar_problem(method)
    q = torch.nn.Parameter(torch.tensor([0.5, -0.5], dtype=torch.float64))
    opt.optimizer.add_param_group({"params": [q]})
    for _ in range(2):
        opt.zero_grad()
        opt.backward([(p - 2) ** 2 + q.sum() ** 2, (p + 1) ** 2 + (q * q).sum()])
        opt.step()
    method_state = copy.deepcopy(opt.method.state_dict())
    generator = opt.generator.get_state().clone()
    opt.zero_grad()
    opt.backward([(p - 2) ** 2, NaNGrad.apply((p + 1) ** 2 + q.sum())])
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(opt.generator.get_state(), generator)
    assert str(opt.method.state_dict()) == str(method_state)



@pytest.mark.parametrize("method", ["dwa", "famo", "rlw", "mokd_amortized"])
def test_loss_based_backward_reaching_no_parameter_is_a_clear_error_that_changes_nothing(method):
    _, opt = scalar_problem(method)
    q = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))  # not in the optimizer
    method_state = copy.deepcopy(opt.method.state_dict())
    generator = opt.generator.get_state().clone()
    with pytest.raises(ValueError):
        opt.backward([q ** 2, (q - 1) ** 2])
    assert torch.equal(opt.generator.get_state(), generator)
    assert str(opt.method.state_dict()) == str(method_state)
