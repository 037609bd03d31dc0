"""gradbal.graph_method: the K x K stage replayed from a CUDA graph. On CPU tensors it is the
wrapped method itself (checked here); the CUDA behaviour (weights equal to eager, no host
sync on replay, outputs that survive the next replay) is checked by the gpu-marked tests.

Also ``Method.draws_random``, the flag that decides which methods can be replayed: a method
that says False must give weights independent of the generator and leave it untouched."""

from __future__ import annotations

import warnings

import pytest
import torch

import gradbal
from gradbal import GraphedMethod, graph_method

from .methods._grams import degenerate, well_conditioned

F64 = torch.float64
REPLAYABLE = ["mokd", "mgda", "mgda_gn", "upgrad", "dualproj", "imtl_g", "aligned_mtl", "config", "cagrad", "fairgrad", "mean"]


def _options(name, k):
    return {"weighted": {"weights": [1.0] * k}}.get(name, {})


@pytest.mark.parametrize("name", gradbal.available_methods())
def test_draws_random_says_whether_the_generator_is_read(name):
    k = 4
    gram = well_conditioned(k, seed=1)
    losses = torch.linspace(0.5, 2.0, k, dtype=F64)
    results, advanced = [], []
    for seed in (0, 1):
        m = gradbal.get_method(name, **_options(name, k))
        m.check_num_objectives(k)
        gen = torch.Generator().manual_seed(seed)
        before = gen.get_state()
        w = m.weights(gram if m.needs_gram else None, losses, gen)
        results.append(w)
        advanced.append(not torch.equal(gen.get_state(), before))
    if gradbal.get_method(name, **_options(name, k)).draws_random:
        # GradDrop's draws are in its own pass (combine), not in weights.
        assert all(advanced) or gradbal.get_method(name).elementwise
    else:
        assert not any(advanced)
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "rlw", "graddrop", "nash_mtl", "famo", "dwa", "uw"])
def test_stateful_random_and_elementwise_methods_are_refused(name):
    with pytest.raises(ValueError, match=rf"{name}.*compile_method"):
        graph_method(name)


def test_wrapping_twice_or_wrapping_a_compiled_method_is_refused():
    with pytest.raises(TypeError, match="already wrapped"):
        GraphedMethod(graph_method("mokd"))
    with pytest.raises(TypeError, match="already wrapped"):
        GraphedMethod(gradbal.compile_method("mokd"))


def test_flags_options_and_repr_are_the_wrapped_methods():
    m = graph_method("cagrad", c=0.25)
    assert m.name == "cagrad" and m.c == 0.25 and m.needs_gram and not m.stateful
    assert repr(m).startswith("graph_method(CAGrad(")
    mk = graph_method("mokd")
    assert mk.requires_losses and mk.requires_nonnegative_losses


@pytest.mark.parametrize("name", REPLAYABLE)
def test_on_cpu_it_is_the_wrapped_method(name):
    k = 5
    eager, graphed = gradbal.get_method(name), graph_method(name)
    losses = torch.linspace(0.5, 2.0, k, dtype=F64)
    grams = [well_conditioned(k, seed=s) for s in range(2)] + list(degenerate(k, seed=1).values())[:3]
    for gram in grams:
        gram = gram[:k, :k]
        torch.testing.assert_close(graphed.weights(gram, losses), eager.weights(gram, losses), rtol=0, atol=0)


def test_a_bad_k_gives_the_eager_error():
    m = graph_method("upgrad", pref_vector=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="pref_vector of 3 entries but 5"):
        m.weights(well_conditioned(5, seed=0), None)


def test_a_cpu_training_step_equals_the_plain_methods():
    def run(method):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, seed=0)
        x = torch.randn(8, 6)
        for _ in range(3):
            out = model(x)
            opt.zero_grad()
            opt.backward([out.pow(2).mean(), (out - 1).abs().mean()])
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(graph_method("upgrad")), run("upgrad")):
        assert torch.equal(a, b)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", REPLAYABLE)
def test_cuda_replay_equals_eager_without_host_sync(name):
    for k in (2, 4, 16):
        eager, graphed = gradbal.get_method(name), graph_method(name)
        losses = (torch.rand(k, dtype=F64, generator=torch.Generator().manual_seed(k)) + 0.5).cuda()
        grams = [well_conditioned(k, seed=s).cuda() for s in range(4)]
        expected = [eager.weights(g, losses) for g in grams]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
            torch.testing.assert_close(graphed.weights(grams[0], losses), expected[0], rtol=1e-12, atol=1e-14)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                w1 = graphed.weights(grams[1], losses)
                w2 = graphed.weights(grams[2], losses)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(w2, expected[2], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(w1, expected[1], rtol=1e-12, atol=1e-14)  # survived a replay
        bad = torch.full((k, k), float("nan"), dtype=F64, device="cuda")
        torch.testing.assert_close(graphed.weights(bad, losses), eager.weights(bad, losses), equal_nan=True)


@pytest.mark.gpu
@needs_cuda
def test_cuda_training_steps_equal_the_plain_methods():
    def run(method):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
        opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, seed=0)
        x = torch.randn(8, 16, device="cuda")
        for _ in range(4):
            out = model(x)
            opt.zero_grad()
            opt.backward([out.pow(2).mean(), (out - 1).abs().mean(), out.sum(-1).pow(2).mean()])
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for name in ("mokd", "upgrad", "aligned_mtl"):
        for a, b in zip(run(graph_method(name)), run(name)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
