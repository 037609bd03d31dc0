"""Loss-based methods (one backward per step): FAMO, amortised MoKD, UW, DWA. The weight
updates follow the published rules, checked by hand on small examples and against the
reference implementations re-written with autograd and torch.optim.Adam."""

from __future__ import annotations

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
        get_method("famo", update="manual").update(t(1.0, 2.0))


# ------------------------------------------------------------------------------- UW


def test_uw_weights_and_first_step():
    uw = get_method("uw")
    w = uw.weights(None, t(1.0, 2.0))
    assert torch.allclose(w, torch.full((2,), math.exp(0.5) / 2, dtype=F64))
    # dJ/ds = (1 - L e^{-s}) / 2 < 0 for both: Adam's first step adds lr to each s.
    assert torch.allclose(uw.log_variances, t(-0.499, -0.499), atol=1e-12)


def test_uw_matches_libmtl_objective_with_adam():
    lr = 0.01
    uw = get_method("uw", lr=lr)
    s = torch.full((3,), -0.5, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=lr)
    for losses in _loss_stream(15, 3, seed=2):
        # LibMTL: loss = (losses / (2 exp(s)) + s / 2).sum(); model weights = 1 / (2 exp(s))
        expected = (1 / (2 * s.exp())).detach().clone()
        assert torch.allclose(uw.weights(None, losses), expected, rtol=1e-12)
        opt.zero_grad()
        (losses / (2 * s.exp()) + s / 2).sum().backward()
        opt.step()
        assert torch.allclose(uw.log_variances, s.detach(), rtol=1e-10, atol=1e-14)


def test_uw_settles_at_log_loss():
    uw = get_method("uw", lr=0.05)
    losses = t(0.2, 3.0)
    for _ in range(1500):
        w = uw.weights(None, losses)
    assert torch.allclose(uw.log_variances, losses.log(), atol=1e-3)
    assert torch.allclose(w, 1 / (2 * losses), rtol=1e-3)


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


@pytest.mark.parametrize("name", ["famo", "mokd_amortized", "uw", "dwa"])
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
