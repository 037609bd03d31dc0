"""No host synchronisation inside ``Method.weights``: every registered method runs with
``Tensor.item/.cpu/.tolist/.numpy`` and the implicit conversions (``bool``, ``int``,
``float``, ``index``) made to raise. (On a GPU, ``torch.cuda.set_sync_debug_mode("error")``
checks the same thing for device syncs; see test_no_sync_cuda below.)"""

from __future__ import annotations

import importlib

import pytest
import torch

import gradbal

from ._grams import F64, degenerate, well_conditioned

FORBIDDEN = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostSync(AssertionError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} called inside weights()")

        return raiser

    def install():
        for name in FORBIDDEN:
            monkeypatch.setattr(torch.Tensor, name, forbid(name))

    return install


def _options(name, k=4):
    return {"weighted": {"weights": [1.0] * k}}.get(name, {})


def _losses(k):
    return torch.linspace(0.5, 2.0, k, dtype=F64)


@pytest.mark.parametrize("name", gradbal.available_methods())
@pytest.mark.parametrize("k", [2, 4, 12])
def test_weights_make_no_host_sync(name, k, no_host_sync, monkeypatch):
    m = gradbal.get_method(name, **_options(name, k))
    gram = well_conditioned(k, seed=k)
    gen = torch.Generator().manual_seed(0)
    losses = _losses(k)
    gram_arg = gram if m.requires_task_gradients else None
    # Warm caches (lru_cache'd index tensors) and state outside the patch first, then
    # check both a fresh and a stateful call.
    m.weights(gram_arg, losses, gen)
    fresh = gradbal.get_method(name, **_options(name, k))
    no_host_sync()
    w1 = fresh.weights(gram_arg, losses, gen)
    w2 = m.weights(gram_arg, losses, gen)
    w3 = m.weights(gram_arg, losses * 0.9, gen)
    monkeypatch.undo()
    for w in (w1, w2, w3):
        assert w.shape == (k,) and torch.isfinite(w).all()


@pytest.mark.parametrize("name", [n for n in gradbal.available_methods() if n != "weighted"])
@pytest.mark.parametrize("case", ["rank_deficient", "zero_row", "opposite_rows", "k16_mixed_scales"])
def test_degenerate_inputs_make_no_host_sync(name, case, no_host_sync, monkeypatch):
    gram = degenerate()[case]
    k = gram.shape[0]
    m = gradbal.get_method(name)
    gram_arg = gram if m.requires_task_gradients else None
    gen = torch.Generator().manual_seed(0)
    m.weights(gram_arg, _losses(k), gen)  # warm caches
    no_host_sync()
    w = gradbal.get_method(name).weights(gram_arg, _losses(k), gen)
    monkeypatch.undo()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("name,module", [("imtl_g", "imtl"), ("aligned_mtl", "aligned_mtl"), ("config", "config")])
def test_jacobi_path_makes_no_host_sync(name, module, no_host_sync, monkeypatch):
    # The eigensolver used on CUDA (torch.linalg.eigh syncs there), exercised on the CPU.
    import gradbal.solvers_qp as sq

    mod = importlib.import_module(f"gradbal.methods.{module}")
    original = sq.sym_eig
    jacobi = lambda a: original(a, "jacobi")
    monkeypatch.setattr(sq, "sym_eig", jacobi)  # through unit_gram_pinv (imtl_g, config)
    if hasattr(mod, "sym_eig"):
        monkeypatch.setattr(mod, "sym_eig", jacobi)
    gram = well_conditioned(7, seed=1)
    m = gradbal.get_method(name)
    m.weights(gram, None)
    no_host_sync()
    w = m.weights(gram, None)
    monkeypatch.undo()
    assert torch.isfinite(w).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", gradbal.available_methods())
def test_no_sync_cuda(name):
    m = gradbal.get_method(name, **_options(name))
    k = 4
    gram = well_conditioned(k, seed=3).cuda()
    losses = _losses(k).cuda()
    gram_arg = gram if m.requires_task_gradients else None
    gen = torch.Generator().manual_seed(0)
    m.weights(gram_arg, losses, gen)  # warm caches (index tensors are built once per device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            w = m.weights(gram_arg, losses, gen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(w).all()


def _cuda_step_losses(model, x, y):
    out = model(x)
    return [torch.nn.functional.cross_entropy(out, y), out.pow(2).mean()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "name, options",
    [("pcgrad", {}), ("upgrad", {}), ("mgda", {}), ("mokd", {"log_scale": False})],
    ids=["pcgrad", "upgrad", "mgda", "mokd-nolog"],
)
def test_optimizer_step_makes_no_host_sync_on_cuda(name, options):
    """A whole step (K backward passes into the store, Gram, weights, combine, the wrapped
    SGD step) under ``set_sync_debug_mode("error")``, with the two documented host reads off:
    ``nonfinite="ignore"`` (the non-finite check in ``step``) and MoKD without log scaling
    (the loss-sign check in ``backward``). The plain ``(l1 + l2).backward(); sgd.step()``
    loop runs first under the same mode, so a sync inside torch itself fails it there."""
    torch.manual_seed(0)
    x = torch.randn(16, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")

    def model_and_sgd():
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        ).cuda()
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    plain_model, plain_sgd = model_and_sgd()
    model, sgd = model_and_sgd()
    opt = gradbal.MultiObjectiveOptimizer(sgd, name, nonfinite="ignore", seed=0, **options)

    def plain_step():
        plain_sgd.zero_grad()
        sum(_cuda_step_losses(plain_model, x, y)).backward()
        plain_sgd.step()

    def balanced_step():
        opt.zero_grad()
        opt.backward(_cuda_step_losses(model, x, y))
        opt.step()

    for step in (plain_step, balanced_step):
        step()  # warm-up: caches, cuBLAS handles, the store's allocation
        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any((p - q).abs().max() > 0 for p, q in zip(model.parameters(), plain_model.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_negative_loss_on_cuda_is_refused_after_the_backward_passes_with_nothing_changed():
    """On CUDA MoKD reads the loss signs after queueing the backward passes (no stall before
    them); a negative loss is still refused, and the passes' writes are undone."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).cuda()
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mokd", seed=0)
    x = torch.randn(4, 8, device="cuda")
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = [p.detach().clone() for p in model.parameters()]
    gen_state = opt.generator.get_state()
    out = model(x)
    with pytest.raises(ValueError, match="loss 1 is negative"):
        opt.backward([out.pow(2).mean(), -out.abs().mean() - 1.0])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert torch.equal(opt.generator.get_state(), gen_state)
    out = model(x)
    opt.backward([out.pow(2).mean(), out.abs().mean()])  # a good step still works after
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
