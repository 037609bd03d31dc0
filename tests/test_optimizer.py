"""MultiObjectiveOptimizer: the store, the balanced gradient, torch.optim conventions."""

import copy

import pytest
import torch
from torch import nn

import gradbal
from gradbal.methods import Method

F = nn.functional


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batch(seed=0, dtype=torch.float64, n=32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=gen)
    teacher = torch.randn(n, 4, generator=gen, dtype=dtype)
    return x, y, teacher


def two_losses(model, x, y, teacher):
    out = model(x)
    ce = F.cross_entropy(out, y)
    kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True)
    return [ce, kl]


def per_task_grads(model, losses):
    params = [p for p in model.parameters()]
    rows = []
    for loss in losses:
        gs = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("method", ["sum", "mean", "mokd", "mgda", "pcgrad"])
def test_balanced_grad_matches_functional_form(method):
    model = make_model()
    x, y, t = batch()
    losses = two_losses(model, x, y, t)
    rows = per_task_grads(model, losses)
    loss_values = torch.stack([v.detach() for v in losses])
    expected = gradbal.aggregate(rows, method, losses=loss_values, generator=torch.Generator().manual_seed(3))
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, seed=3)
    opt.backward(losses)
    torch.testing.assert_close(flat_grad(model), expected, rtol=1e-12, atol=1e-14)
    stats = opt.last_stats
    torch.testing.assert_close(stats.gram, rows @ rows.T)
    torch.testing.assert_close(stats.norms, rows.norm(dim=1))
    cos = (rows[0] @ rows[1]) / (rows[0].norm() * rows[1].norm())
    torch.testing.assert_close(stats.cosines[0, 1], cos)
    torch.testing.assert_close(stats.losses, loss_values)
    assert stats.weights.shape == (2,) and not stats.nonfinite.any()


def test_grads_are_views_into_the_store_and_buffers_are_reused():
    model = make_model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), "mokd")
    ptrs = None
    for step in range(30):
        x, y, t = batch(step)
        opt.zero_grad()
        opt.backward(two_losses(model, x, y, t))
        group = opt._store.groups[0]
        out = group.out
        for p, (o, n) in zip(model.parameters(), zip(group.offsets, group.numels)):
            assert p.grad.data_ptr() == out[o : o + n].data_ptr()
        now = (group.out.data_ptr(), group.rows.data_ptr())
        assert ptrs is None or now == ptrs  # no reallocation, no growth
        ptrs = now
        opt.step()


def test_memory_stays_flat_over_many_steps():
    """The number of live tensors does not grow with the number of steps."""
    import gc
    import warnings

    model = make_model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), "pcgrad")
    x, y, t = batch()

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance() touches deprecated torch proxies
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []
    for step in range(60):
        opt.zero_grad()
        opt.backward(two_losses(model, x, y, t))
        opt.step()
        if step in (10, 59):
            counts.append(live_tensors())
    assert counts[1] <= counts[0]


def test_unshared_and_unreached_parameters():
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4).double()
    head_a = nn.Linear(4, 1).double()  # only objective 0 reaches it
    head_b = nn.Linear(4, 1).double()  # only objective 1
    unused = nn.Linear(2, 2).double()  # no objective reaches it
    x = torch.randn(8, 3, dtype=torch.float64)
    params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters(), *unused.parameters()]
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(params, lr=0.1), "mgda", gram_params="shared")
    z = torch.tanh(trunk(x))
    losses = [head_a(z).pow(2).mean(), (head_b(z) - 1).pow(2).mean()]
    shared = list(trunk.parameters())
    g = [torch.cat([v.reshape(-1) for v in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    gs = torch.stack(g)
    own_a = torch.autograd.grad(losses[0], list(head_a.parameters()), retain_graph=True)
    own_b = torch.autograd.grad(losses[1], list(head_b.parameters()), retain_graph=True)
    opt.backward(losses)
    w = opt.last_stats.weights
    # The Gram matrix (and so the weights) covers the shared parameters only.
    torch.testing.assert_close(opt.last_stats.gram, gs @ gs.T)
    torch.testing.assert_close(w, gradbal.get_method("mgda").weights(gs @ gs.T, None))
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), w @ gs)
    for p, ref in zip(head_a.parameters(), own_a):
        torch.testing.assert_close(p.grad, w[0] * ref)
    for p, ref in zip(head_b.parameters(), own_b):
        torch.testing.assert_close(p.grad, w[1] * ref)
    assert all(p.grad is None for p in unused.parameters())


def test_gram_params_all_is_default_and_includes_unshared():
    torch.manual_seed(0)
    trunk, head = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
    opt = gradbal.MultiObjectiveOptimizer(
        torch.optim.SGD([*trunk.parameters(), *head.parameters()], lr=0.1), "sum"
    )
    z = trunk(torch.randn(5, 3, dtype=torch.float64))
    losses = [head(z).sum(), z.pow(2).sum()]
    rows = torch.stack([
        torch.cat([v.reshape(-1) for v in torch.autograd.grad(l, [*trunk.parameters(), *head.parameters()], retain_graph=True, allow_unused=True, materialize_grads=True)])
        for l in losses
    ])
    opt.backward(losses)
    torch.testing.assert_close(opt.last_stats.gram, rows @ rows.T)


def test_backward_accumulates_like_tensor_backward():
    model = make_model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mean")
    x, y, t = batch(1)
    x2, y2, t2 = batch(2)
    opt.backward(two_losses(model, x, y, t))
    first = flat_grad(model).clone()
    opt.backward(two_losses(model, x2, y2, t2))
    rows = per_task_grads(model, two_losses(model, x2, y2, t2))
    torch.testing.assert_close(flat_grad(model), first + rows.mean(0))
    # A gradient the user computed outside gradbal is kept and added to.
    opt.zero_grad()
    sum(two_losses(model, x, y, t)).backward()
    outside = flat_grad(model).clone()
    opt.backward(two_losses(model, x2, y2, t2))
    torch.testing.assert_close(flat_grad(model), outside + rows.mean(0))


def test_two_objectives_train():
    model = make_model(dtype=torch.float32)
    x, y, t = batch(0, torch.float32, n=64)
    t = 3 * F.one_hot(y, 4).float() + 0.5 * t  # a teacher that agrees with the labels
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9), "mokd")
    start = [v.item() for v in two_losses(model, x, y, t)]
    for _ in range(100):
        opt.zero_grad()
        opt.backward(two_losses(model, x, y, t))
        opt.step()
    end = [v.item() for v in two_losses(model, x, y, t)]
    assert end[0] < 0.6 * start[0] and end[1] < 0.6 * start[1], (start, end)


def run_steps(model, opt, steps, start):
    for step in range(start, start + steps):
        x, y, t = batch(step)
        opt.zero_grad()
        opt.backward(two_losses(model, x, y, t))
        opt.step()


@pytest.mark.parametrize("method", ["pcgrad", "mokd"])
def test_state_dict_resume_is_bit_identical(method):
    model = make_model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), method, seed=7)
    run_steps(model, opt, 5, 0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run_steps(model, opt, 5, 5)
    reference = [p.detach().clone() for p in model.parameters()]

    model2 = make_model(seed=123)
    model2.load_state_dict(saved_model)
    opt2 = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9), method, seed=99)
    opt2.load_state_dict(saved_opt)
    run_steps(model2, opt2, 5, 5)
    for a, b in zip(reference, model2.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_errors():
    model = make_model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mokd")
    with pytest.raises(ValueError, match="opt.optimizer.load_state_dict"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    other = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad")
    with pytest.raises(ValueError, match="saved with method 'pcgrad'"):
        opt.load_state_dict(other.state_dict())


def test_lr_scheduler_and_shared_param_groups():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = gradbal.MultiObjectiveOptimizer(inner, "mean")
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    lrs = []
    for step in range(5):
        run_steps(model, opt, 1, step)
        sched.step()
        lrs.append(inner.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


def test_closure_is_called_and_returned():
    model = make_model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    before = [p.detach().clone() for p in model.parameters()]
    x, y, t = batch()

    def closure():
        opt.zero_grad()
        losses = two_losses(model, x, y, t)
        opt.backward(losses)
        return sum(losses)

    value = opt.step(closure)
    assert torch.is_tensor(value) and value.requires_grad
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_grad_scaler_on_cpu():
    model = make_model(dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y, t = batch(0, torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mokd")
    ref = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), "mokd")
    opt.backward(two_losses(model, x, y, t), scaler=scaler)
    ref.backward(two_losses(twin, x, y, t))
    # Weights from the unscaled Gram; .grad carries the scale.
    torch.testing.assert_close(opt.last_stats.weights, ref.last_stats.weights, rtol=1e-5, atol=0)
    torch.testing.assert_close(opt.last_stats.gram, ref.last_stats.gram, rtol=1e-5, atol=0)
    torch.testing.assert_close(flat_grad(model), 1024.0 * flat_grad(twin), rtol=1e-5, atol=1e-6)
    scaler.step(opt)
    scaler.update()
    ref.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Non-finite gradients under a scaler: left to the scaler (the step is skipped, scale drops).
    p0 = [p.detach().clone() for p in model.parameters()]
    losses = two_losses(model, x, y, t)
    opt.zero_grad()
    opt.backward([losses[0], losses[1] * float("inf")], scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 1024.0
    assert all(torch.equal(a, b) for a, b in zip(p0, model.parameters()))


# ----------------------------------------------------------------------------- zero losses
def test_zero_loss_gives_a_finite_step():
    """fp32 cross-entropy underflows to exactly 0.0 on a memorised batch: the step stays finite."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([200.0, 0.0, 0.0]))
    x = torch.randn(6, 4)
    y = torch.zeros(6, dtype=torch.long)
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mokd")
    out = model(x)
    ce = F.cross_entropy(out, y)
    assert ce.item() == 0.0  # the situation: an exact zero loss with a zero gradient
    kl = (out - 1).pow(2).mean()
    opt.backward([ce, kl])
    opt.step()
    assert torch.isfinite(opt.last_stats.weights).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def digits_memorisation_run(seed, loss_floor, steps=80):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:100], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:100])
    teacher = 20 * F.one_hot(y, 10).float()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = gradbal.MultiObjectiveOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01), "mokd",
        magnitude="faithful", loss_floor=loss_floor, nonfinite="ignore",
    )
    saw_zero = False
    for _ in range(steps):
        out = model(x)
        ce = F.cross_entropy(out, y)
        kl = F.kl_div(F.log_softmax(out, -1), F.softmax(teacher, -1), reduction="batchmean")
        saw_zero |= ce.item() == 0.0
        opt.zero_grad()
        opt.backward([ce, kl])
        opt.step()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return saw_zero, finite


@pytest.mark.parametrize("seed", range(4))
def test_memorised_digits_stay_finite(seed):
    """The issue's scenario: MoKD on 100 digits images until fp32 CE underflows to 0.0.

    With the default floor every run stays finite; with a floor too small to matter (1e-300)
    the same run divides 0 by ~0 and goes NaN, which shows the situation is reproduced."""
    saw_zero, finite = digits_memorisation_run(seed, loss_floor=1e-6)
    assert saw_zero and finite
    saw_zero, finite = digits_memorisation_run(seed, loss_floor=1e-300)
    assert saw_zero and not finite


# ----------------------------------------------------------------------------- host syncs
class SyncTrap:
    """Make host-synchronising tensor calls raise while armed."""

    names = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.armed = False
        for name in self.names:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))
        original_backward = torch.autograd.backward

        def backward(*args, **kwargs):
            self.armed = True  # from the first backward on
            return original_backward(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "backward", backward)

    def _wrap(self, name, original):
        trap = self

        def wrapped(self, *args, **kwargs):
            if trap.armed:
                raise AssertionError(f"host sync: Tensor.{name} called during the step")
            return original(self, *args, **kwargs)

        return wrapped


@pytest.mark.parametrize("method", ["sum", "mean", "mokd", "mgda", "pcgrad"])
def test_no_host_sync_between_first_backward_and_step(monkeypatch, method):
    model = make_model()
    x, y, t = batch()
    losses = two_losses(model, x, y, t)
    losses.append(model(x).pow(2).mean())  # K = 3 exercises the device solver
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method)
    trap = SyncTrap(monkeypatch)
    opt.backward(losses)
    _ = opt.last_stats
    trap.armed = False
    opt.step()


# ----------------------------------------------------------------------------- bad input
class CountingMethod(Method):
    """A stateful test method: counts steps, keeps K."""

    stateful = True

    def __init__(self):
        self.steps = torch.zeros(())

    def weights(self, gram, losses, generator=None):
        self.steps += 1
        return torch.ones(gram.shape[0], dtype=gram.dtype)

    def state_dict(self):
        return {"steps": self.steps.clone()}


def snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.data_ptr() for p in model.parameters()],
        copy.deepcopy(opt.optimizer.state_dict()),
        copy.deepcopy(opt.method.state_dict()),
        opt.generator.get_state().clone(),
    )


def assert_same(a, b):
    params_a, grads_a, ptrs_a, inner_a, method_a, gen_a = a
    params_b, grads_b, ptrs_b, inner_b, method_b, gen_b = b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b))
    assert ptrs_a == ptrs_b
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(grads_a, grads_b))
    assert str(inner_a) == str(inner_b)
    assert str(method_a) == str(method_b)
    assert torch.equal(gen_a, gen_b)


def primed(method="mokd"):
    """A model and optimizer after two real steps (momentum state, live .grad views)."""
    model = make_model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), method)
    run_steps(model, opt, 2, 0)
    return model, opt


def bad_cases(model):
    x, y, t = batch(5)
    other = nn.Linear(5, 1).double()
    good = lambda: two_losses(model, x, y, t)
    return {
        "empty": (list, ValueError, "at least 2 losses"),
        "one": (lambda: good()[:1], ValueError, "at least 2 losses"),
        "single tensor": (lambda: torch.stack(good()), TypeError, "list of scalar losses"),
        "not a tensor": (lambda: [good()[0], 1.0], TypeError, "loss 1 is a float"),
        "non-scalar": (lambda: [good()[0], model(x).sum(0)], ValueError, "loss 1 has shape"),
        "no grad": (lambda: [good()[0], good()[1].detach()], ValueError, "loss 1 does not require grad"),
        "unreachable": (lambda: [good()[0], other(x).pow(2).sum()], ValueError, "loss 1 does not depend on any parameter"),
        "devices": (lambda: [good()[0], torch.zeros((), device="meta", requires_grad=True) * 2], ValueError, "loss 1 is on meta"),
        "negative": (lambda: [good()[0], -good()[1]], ValueError, "loss 1 is negative.*log_scale=False"),
    }


@pytest.mark.parametrize("case", ["empty", "one", "single tensor", "not a tensor", "non-scalar", "no grad", "unreachable", "devices", "negative"])
def test_bad_input_raises_and_changes_nothing(case):
    model, opt = primed()
    make_losses, error, message = bad_cases(model)[case]
    losses = make_losses()
    before = snapshot(model, opt)
    with pytest.raises(error, match=message):
        opt.backward(losses)
    assert_same(before, snapshot(model, opt))
    # The optimizer still works afterwards.
    run_steps(model, opt, 1, 9)


def test_sparse_gradient_of_an_optimizer_parameter_is_refused():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    head = nn.Linear(3, 1)
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1), "sum")
    z = emb(torch.tensor([1, 2, 3]))
    before = [p.detach().clone() for p in [*emb.parameters(), *head.parameters()]]
    with pytest.raises(ValueError, match="sparse=False"):
        opt.backward([head(z).sum(), z.pow(2).sum()])
    assert all(p.grad is None for p in [*emb.parameters(), *head.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(before, [*emb.parameters(), *head.parameters()]))


def test_changing_k_with_a_stateful_method():
    model = make_model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), CountingMethod())
    x, y, t = batch()
    opt.backward(two_losses(model, x, y, t))
    opt.step()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="keeps state for 2 objectives but 3 losses"):
        opt.backward([*two_losses(model, x, y, t), model(x).pow(2).mean()])
    assert_same(before, snapshot(model, opt))


def test_stateless_method_may_change_k():
    model = make_model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    x, y, t = batch()
    opt.backward(two_losses(model, x, y, t))
    opt.backward([*two_losses(model, x, y, t), model(x).pow(2).mean()])
    assert opt.last_stats.weights.shape == (3,)


def nan_losses(model, x, y, t):
    ce, kl = two_losses(model, x, y, t)
    # Finite loss value (0) with NaN gradients: d sqrt(|u|)/du at u = 0 is inf, times 0.
    bad = torch.sqrt((model(x) * 0).sum().abs())
    return [ce, kl + bad]


def test_nonfinite_raise_names_objective_and_changes_nothing():
    model, opt = primed()
    x, y, t = batch(3)
    params = [p.detach().clone() for p in model.parameters()]
    inner = copy.deepcopy(opt.optimizer.state_dict())
    opt.zero_grad()
    opt.backward(nan_losses(model, x, y, t))
    assert opt.last_stats.nonfinite.tolist() == [False, True]
    with pytest.raises(FloatingPointError, match=r"objective\(s\) \[1\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert str(inner) == str(opt.optimizer.state_dict())


def test_nonfinite_skip_counts_and_skips():
    model = make_model()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "pcgrad", nonfinite="skip")
    run_steps(model, opt, 2, 0)
    params = [p.detach().clone() for p in model.parameters()]
    x, y, t = batch(3)
    opt.zero_grad()
    opt.backward(nan_losses(model, x, y, t))
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert opt.last_stats.skipped_steps == 1 and opt.skipped_steps == 1
    run_steps(model, opt, 1, 4)
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_constructor_errors():
    model = make_model()
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        gradbal.MultiObjectiveOptimizer(list(model.parameters()))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        gradbal.MultiObjectiveOptimizer(sgd, nonfinite="warn")
    with pytest.raises(ValueError, match="unknown method"):
        gradbal.MultiObjectiveOptimizer(sgd, "foo")
    with pytest.raises(ValueError, match="magnitude must be one of"):
        gradbal.MultiObjectiveOptimizer(sgd, "mokd", magnitude="huge")
    with pytest.raises(TypeError, match="wrap it once"):
        gradbal.MultiObjectiveOptimizer(gradbal.MultiObjectiveOptimizer(sgd))
