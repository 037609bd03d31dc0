"""Loss-based methods (one backward per step): FAMO, amortised MoKD, UW, DWA. The weight
updates follow the published rules, checked by hand on small examples and against the
reference implementations re-written with autograd and torch.optim.Adam."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import gradbal
from gradbal.methods import get_method

F64 = torch.float64
LOSS_METHODS = ["famo", "mokd_amortized", "uw", "dwa", "rlw"]


def t(*values):
    return torch.tensor(values, dtype=F64)


def test_loss_methods_are_registered_as_loss_based():
    for name in LOSS_METHODS:
        m = get_method(name)
        assert not m.requires_task_gradients
        assert m.weights(None, t(1.0, 2.0, 3.0), torch.Generator().manual_seed(0)).shape == (3,)


# ----------------------------------------------------------------------------- FAMO


def test_famo_hand_computed_two_steps():
    famo = get_method("famo")
    # Step 0: z = (1/2, 1/2), D = (1, 2), c = 1/2 + 1/4 = 3/4, w = z / (c D) = (2/3, 1/3).
    w0 = famo.weights(None, t(1.0, 2.0))
    assert torch.allclose(w0, t(2 / 3, 1 / 3), atol=1e-8)
    # Step 1 (next batch's losses 0.5, 1.8): delta = (log 2, log(2/1.8)); the softmax
    # gradient is z * (delta - z.delta) = +-0.146946; Adam's first step moves each logit by
    # lr * sign: xi = (-0.025, +0.025).
    w1 = famo.weights(None, t(0.5, 1.8))
    assert torch.allclose(famo.logits, t(-0.025, 0.025), atol=1e-9)
    z = torch.softmax(t(-0.025, 0.025), 0)  # (0.487503, 0.512497)
    c = z[0] / 0.5 + z[1] / 1.8
    assert torch.allclose(w1, t(z[0] / (c * 0.5), z[1] / (c * 1.8)), atol=1e-8)
    assert torch.allclose(w1, t(0.773982, 0.226018), atol=1e-6)


class OfficialFAMO:
    """The official FAMO update (Cranial-XIX/FAMO ``weight_methods.FAMO``), re-typed."""

    def __init__(self, k, w_lr, gamma):
        self.min_losses = torch.zeros(k, dtype=F64)
        self.w = torch.zeros(k, dtype=F64, requires_grad=True)
        self.w_opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)

    def weights(self, losses):
        # gradient of sum z log(D) / c with respect to the losses = the loss weights
        losses = losses.clone().requires_grad_(True)
        z = F.softmax(self.w, -1).detach()
        d = losses - self.min_losses + 1e-8
        c = (z / d).sum().detach()
        (grad,) = torch.autograd.grad((d.log() * z / c).sum(), losses)
        self.prev_loss = losses.detach()
        return grad

    def update(self, curr_loss):
        delta = (self.prev_loss - self.min_losses + 1e-8).log() - (curr_loss - self.min_losses + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.w_opt.zero_grad()
        self.w.grad = d
        self.w_opt.step()


def _loss_stream(steps, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(k, generator=gen, dtype=F64) + 0.5
    out = []
    for i in range(steps):
        base = base * (0.9 + 0.15 * torch.rand(k, generator=gen, dtype=F64))
        out.append(base.clone())
    return out


@pytest.mark.parametrize("name,gamma", [("famo", 1e-3), ("mokd_amortized", 1e-2)])
def test_famo_manual_update_matches_official_code(name, gamma):
    ours = get_method(name, update="manual")
    ref = OfficialFAMO(3, 0.025, gamma)
    stream = _loss_stream(12, 3)
    for before, after in itertools.pairwise(stream):
        assert torch.allclose(ours.weights(None, before), ref.weights(before), rtol=1e-10)
        ours.update(after * 0.97)  # re-evaluated on the same batch after the step
        ref.update(after * 0.97)
        assert torch.allclose(ours.logits, ref.w.detach(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name,gamma", [("famo", 1e-3), ("mokd_amortized", 1e-2)])
def test_famo_after_step_in_the_optimizer_matches_official_code(name, gamma):
    """opt.step() then opt.update_after_step(losses on the same batch): the official loop."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), name, update="after_step")
    ref = OfficialFAMO(3, 0.025, gamma)
    gen = torch.Generator().manual_seed(4)

    def losses(x):
        out = model(x)
        return [(out[:, k] - k).pow(2).mean() + 0.05 for k in range(3)]

    for _ in range(8):
        x = torch.randn(16, 4, generator=gen, dtype=F64)
        opt.zero_grad()
        current = losses(x)
        opt.backward(current)
        values = torch.stack([v.detach() for v in current])
        assert torch.allclose(opt.last_stats.weights, ref.weights(values), rtol=1e-10)
        opt.step()
        with torch.no_grad():
            after = losses(x)
            opt.update_after_step(after)
        ref.update(torch.stack(after))
        assert torch.allclose(opt.method.logits, ref.w.detach(), rtol=1e-10, atol=1e-14)


def test_famo_update_after_step_rules():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(2, dtype=F64))
    x = torch.tensor([1.0, 2.0], dtype=F64)

    def losses():
        return [(w[0] * x[0]) ** 2, (w[1] * x[1]) ** 2]

    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD([w], lr=0.1), "famo", update="after_step", nonfinite="skip")
    with pytest.raises(RuntimeError, match="must follow backward"):
        opt.update_after_step(losses())
    opt.backward(losses())
    opt.step()
    with pytest.raises(ValueError, match="expects the 2 losses"):
        opt.update_after_step([1.0, 2.0, 3.0])
    opt.update_after_step(torch.stack(losses()).detach())  # a [K] tensor works too
    with pytest.raises(RuntimeError, match="once per step"):
        opt.update_after_step(losses())
    # A skipped step (a non-finite loss): the update is a no-op.
    opt.zero_grad()
    l0, l1 = losses()
    opt.backward([l0, l1 * float("nan")])
    state = opt.method.state_dict()
    opt.step()
    assert opt.skipped_steps == 1
    opt.update_after_step(losses())
    for key, value in opt.method.state_dict().items():
        if key != "prev_losses":
            assert torch.equal(value, state[key]), key
    # The default (next batch) refuses the hook.
    plain = gradbal.MultiObjectiveOptimizer(torch.optim.SGD([w], lr=0.1), "famo")
    plain.zero_grad()  # the skipped step left NaN in w.grad
    plain.backward(losses())
    plain.step()
    with pytest.raises(RuntimeError, match="update='after_step'"):
        plain.update_after_step(losses())


def test_famo_next_batch_update_uses_the_next_losses():
    ours = get_method("famo")
    ref = OfficialFAMO(3, 0.025, 1e-3)
    stream = _loss_stream(10, 3, seed=1)
    ref.weights(stream[0])
    ours.weights(None, stream[0])
    for losses in stream[1:]:
        ref.update(losses)  # "after" of the previous step = this batch's losses
        assert torch.allclose(ours.weights(None, losses), ref.weights(losses), rtol=1e-10)


def test_famo_nonfinite_losses_leave_state_unchanged():
    famo = get_method("famo")
    famo.weights(None, t(1.0, 2.0))
    famo.weights(None, t(0.5, 1.5))
    before = famo.state_dict()
    famo.weights(None, t(float("nan"), 1.0))
    after = famo.state_dict()
    for key in ("logits", "m", "v", "t", "prev_losses"):
        assert torch.equal(before[key], after[key]), key
    w = famo.weights(None, t(0.4, 1.2))
    assert torch.isfinite(w).all()


def test_famo_zero_and_below_minimum_losses_are_finite():
    famo = get_method("famo", min_losses=[0.1, 0.0])
    for losses in (t(0.0, 0.0), t(0.05, 1.0), t(0.2, 0.0)):
        assert torch.isfinite(famo.weights(None, losses)).all()


def test_mokd_amortized_defaults_and_log_loss_scaling():
    m = get_method("mokd_amortized")
    assert (m.lr, m.weight_decay) == (0.025, 0.01)
    w = m.weights(None, t(0.5, 2.0, 1.0))
    # pi uniform: w_k = pi_k / (c L_k), c = sum pi / L, so w is proportional to 1 / L and
    # sums to 1.
    inv = 1 / t(0.5, 2.0, 1.0)
    assert torch.allclose(w, inv / inv.sum())
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=F64))


def test_famo_update_mode_errors():
    with pytest.raises(RuntimeError):
        get_method("famo").update(t(1.0, 2.0))
    with pytest.raises(RuntimeError):
        get_method("famo", update="after_step").update(t(1.0, 2.0))
    assert get_method("famo", update="manual").update_mode == "after_step"  # alias
    with pytest.raises(ValueError):
        get_method("famo", update="later")


# ------------------------------------------------------------------------------- UW


def _uw_setup(seed=0, lr=0.01, **options):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    ref_model = copy.deepcopy(model)
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.Adam(model.parameters(), lr=lr), "uw", **options)
    return model, ref_model, opt


def _uw_losses(model, x):
    out = model(x)
    return [out[:, k].pow(2).mean() + 0.1 * (k + 1) for k in range(3)]


def test_uw_weights_outside_an_optimizer():
    uw = get_method("uw")
    w = uw.weights(None, t(1.0, 2.0))
    assert torch.allclose(w, torch.full((2,), math.exp(0.5) / 2, dtype=F64))
    assert uw.log_variances is None and uw.parameters() == [] and uw.state_dict() == {}


def test_uw_log_variances_are_a_param_group_of_the_wrapped_optimizer():
    model, _, opt = _uw_setup()
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == []
    assert opt.param_groups[1]["lr"] == 0.01  # the wrapped optimizer's defaults
    x = torch.randn(16, 4, dtype=F64)
    opt.backward(_uw_losses(model, x))
    s = opt.method.log_variances
    assert isinstance(s, torch.nn.Parameter) and s.shape == (3,) and s.dtype == F64
    assert opt.param_groups[1]["params"] == [s] and s.grad is not None
    opt.step()
    assert not torch.equal(s.detach(), torch.full((3,), -0.5, dtype=F64))
    _, _, opt2 = _uw_setup(lr=0.01, weight_decay=0.0)
    assert opt2.param_groups[1]["weight_decay"] == 0.0


def test_uw_group_options_and_scheduler():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradbal.get_method("uw", lr=0.5))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(8, 4, dtype=F64)
    opt.backward(_uw_losses(model, x))
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.25]


def test_uw_matches_libmtl_with_one_adam():
    """LibMTL: s is an nn.Parameter of the model's optimizer and the loss is
    ``(losses / (2 exp(s)) + s / 2).sum()``; the same run, step for step."""
    lr = 0.01
    model, ref_model, opt = _uw_setup(lr=lr)
    s = torch.nn.Parameter(torch.full((3,), -0.5, dtype=F64))
    ref_opt = torch.optim.Adam([*ref_model.parameters(), s], lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        x = torch.randn(16, 4, generator=gen, dtype=F64)
        opt.zero_grad()
        opt.backward(_uw_losses(model, x))
        expected_w = (1 / (2 * s.exp())).detach()
        assert torch.allclose(opt.last_stats.weights, expected_w, rtol=1e-12)
        opt.step()
        ref_opt.zero_grad()
        losses = torch.stack(_uw_losses(ref_model, x))
        (losses / (2 * s.exp()) + s / 2).sum().backward()
        ref_opt.step()
        assert torch.allclose(opt.method.log_variances, s, rtol=1e-10, atol=1e-14)
        for a, b in zip(model.parameters(), ref_model.parameters()):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_uw_settles_at_log_loss():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.Adam([w], lr=0.05), "uw")
    target = t(0.2, 3.0)
    for _ in range(600):
        opt.zero_grad()
        opt.backward([target[0] + 0 * w.sum(), target[1] + 0 * w.sum()])  # fixed losses
        opt.step()
    assert torch.allclose(opt.method.log_variances.detach(), target.log(), atol=1e-2)
    assert torch.allclose(opt.last_stats.weights, 1 / (2 * target), rtol=2e-2)


def test_uw_checkpoint_resume_is_bit_identical():
    model, _, opt = _uw_setup()
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(16, 4, generator=gen, dtype=F64) for _ in range(6)]

    def run(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            opt.backward(_uw_losses(model, x))
            opt.step()

    run(model, opt, xs[:3])
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, _, opt2 = _uw_setup(seed=5)  # a fresh optimizer: its UW group is still empty
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[1]["params"] == [opt2.method.log_variances]
    run(model, opt, xs[3:])
    run(model2, opt2, xs[3:])
    assert torch.equal(opt.method.log_variances, opt2.method.log_variances)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_uw_failed_first_backward_changes_nothing():
    model, _, opt = _uw_setup()
    x = torch.randn(16, 4, dtype=F64)
    losses = _uw_losses(model, x)
    losses[0].backward()  # frees the model's graph: the optimizer's backward will fail
    model.zero_grad()
    with pytest.raises(RuntimeError, match="second time"):
        opt.backward(losses)
    assert opt.method.log_variances is None and opt.param_groups[1]["params"] == []
    assert all(p.grad is None for p in model.parameters())
    opt.backward(_uw_losses(model, x))  # still works
    assert opt.param_groups[1]["params"] == [opt.method.log_variances]


def test_uw_skipped_step_leaves_log_variances():
    model, _, opt = _uw_setup()
    x = torch.randn(16, 4, dtype=F64)
    opt.backward(_uw_losses(model, x))
    opt.step()
    before = opt.method.log_variances.detach().clone()
    opt.nonfinite = "skip"
    opt.zero_grad()
    losses = _uw_losses(model, x)
    opt.backward([losses[0], losses[1] * float("nan"), losses[2]])
    opt.step()
    assert torch.equal(opt.method.log_variances.detach(), before) and opt.skipped_steps == 1


# ------------------------------------------------------------------------------ DWA


def test_dwa_hand_computed_with_epochs():
    dwa = get_method("dwa")  # epochs closed by end_epoch(), T = 2
    for losses in (t(1.0, 2.0), t(3.0, 2.0)):  # epoch 0: averages (2, 2)
        assert torch.equal(dwa.weights(None, losses), t(1.0, 1.0))
    dwa.end_epoch()
    for losses in (t(1.0, 1.0), t(1.0, 3.0)):  # epoch 1: averages (1, 2)
        assert torch.equal(dwa.weights(None, losses), t(1.0, 1.0))
    dwa.end_epoch()
    # r = (1/2, 2/2); w = 2 softmax(r / 2) = 2 (e^0.25, e^0.5) / (e^0.25 + e^0.5)
    e = t(math.exp(0.25), math.exp(0.5))
    expected = 2 * e / e.sum()
    assert torch.allclose(dwa.weights(None, t(5.0, 5.0)), expected)
    assert torch.allclose(dwa.weights(None, t(0.1, 9.0)), expected)  # fixed within the epoch


def test_dwa_period_and_zero_average():
    dwa = get_method("dwa", period=1, temperature=1.0)
    dwa.weights(None, t(0.0, 1.0))
    dwa.weights(None, t(1.0, 2.0))
    w = dwa.weights(None, t(1.0, 1.0))  # ratio of a zero average counts as 1
    e = t(math.exp(1.0), math.exp(2.0))
    assert torch.allclose(w, 2 * e / e.sum())


# ------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["famo", "mokd_amortized", "dwa"])
def test_state_dict_roundtrip(name):
    options = {"dwa": {"period": 2}}.get(name, {})
    a = get_method(name, **options)
    stream = _loss_stream(9, 3, seed=3)
    for losses in stream[:5]:
        a.weights(None, losses)
    b = get_method(name, **options)
    b.load_state_dict(a.state_dict())
    for losses in stream[5:]:
        assert torch.equal(a.weights(None, losses), b.weights(None, losses))


def test_loss_methods_in_the_optimizer_run_one_backward():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="famo")
    x = torch.randn(16, 3)
    def losses():
        out = model(x)
        return [out[:, 0].pow(2).mean() + 0.01, (out[:, 1] - 1).pow(2).mean() + 0.01]

    for _ in range(3):
        opt.zero_grad()
        opt.backward(losses())
        w = opt.last_stats.weights
        # the balanced gradient is the gradient of sum_k w_k L_k
        again = losses()
        ref = torch.autograd.grad(sum(wk * lk for wk, lk in zip(w.float(), again)), list(model.parameters()))
        for p, g in zip(model.parameters(), ref):
            assert torch.allclose(p.grad, g, atol=1e-6)
        opt.step()


def test_dwa_skips_nonfinite_losses():
    dwa = get_method("dwa", period=2)
    for losses in (t(1.0, 2.0), t(float("nan"), 2.0), t(1.0, 1.0), t(0.5, 1.0)):
        dwa.weights(None, losses)
    w = dwa.weights(None, t(1.0, 1.0))
    # epoch averages (1, 2) [the NaN skipped] then (0.75, 1): r = (0.75, 0.5)
    e = t(math.exp(0.375), math.exp(0.25))
    assert torch.allclose(w, 2 * e / e.sum())
