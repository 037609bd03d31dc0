"""gradbal.compile_method: the compiled K x K stage gives the eager method's weights, state and
random draws; compilation failures fall back to eager with one warning; bad input raises as
the eager method does.

torch.compile reorders floating-point arithmetic (fused kernels, reassociated reductions), so
compiled weights are compared with the eager ones to 1e-9 relative: rounding differences of
fixed-step float64 solvers stay ~1e-12 here, and a wrong program differs at O(1).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradbal
from gradbal import CompiledMethod, compile_method

from .methods._grams import degenerate, well_conditioned

F64 = torch.float64


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * float(b.abs().max()) + 1e-300)


@pytest.mark.parametrize(
    ("name", "k"),
    [("mokd", 2), ("mgda", 3), ("upgrad", 4), ("mgda", 9)],  # mgda K = 9: the interior point
)
def test_compiled_weights_equal_eager(name, k):
    eager = gradbal.get_method(name)
    compiled = compile_method(name)
    losses = torch.rand(k, generator=torch.Generator().manual_seed(k), dtype=F64) + 0.5
    grams = [well_conditioned(k, seed=s) for s in range(3)]
    grams += [g[:k, :k] for c, g in degenerate(max(k, 4), seed=1).items() if c != "k16_mixed_scales"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
        for gram in grams:  # one compilation, then replays on new values
            w = compiled.weights(gram, losses)
            assert torch.isfinite(w).all()
            _close(w, eager.weights(gram, losses))
    assert not compiled._failed and compiled._working  # it ran compiled


def test_compiled_stateful_and_random_methods_follow_eager_over_steps():
    """GradVac (state: EMA targets) and PCGrad (random orders from the caller's generator):
    the same weights, the same state and the same generator stream as the eager method."""
    k = 3
    for name in ("gradvac", "pcgrad"):
        eager, compiled = gradbal.get_method(name), compile_method(name)
        ge, gc = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        for step in range(4):
            j = torch.randn(k, 6, generator=torch.Generator().manual_seed(step), dtype=F64)
            gram = j @ j.T
            _close(compiled.weights(gram, None, gc), eager.weights(gram, None, ge))
        assert torch.equal(ge.get_state(), gc.get_state())
        for (ka, a), (kb, b) in zip(sorted(eager.state_dict().items()), sorted(compiled.state_dict().items())):
            assert ka == kb
            if isinstance(a, torch.Tensor):
                _close(b, a)
            else:
                assert a == b


def test_compiled_method_trains_as_eager_in_the_optimizer():
    """Three lines as usual, with compile_method in place of the name; a checkpoint of the
    compiled run loads into an eager one (same method name and state)."""

    def run(method):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3, dtype=F64)
        opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method=method, seed=1)
        x = torch.randn(16, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
        for _ in range(3):
            out = model(x)
            opt.zero_grad()
            opt.backward([out[:, 0].pow(2).mean(), (out[:, 1] - 1).pow(2).mean(), out[:, 2].abs().mean()])
            opt.step()
        return model, opt

    m_eager, _ = run("gradvac")
    m_comp, opt_comp = run(compile_method("gradvac"))
    for a, b in zip(m_eager.parameters(), m_comp.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert opt_comp.method.name == "gradvac" and opt_comp.method.stateful
    _, opt_eager = run("gradvac")
    opt_eager.load_state_dict(opt_comp.state_dict())  # same name, same state layout


def test_failed_compilation_warns_once_and_runs_eagerly(monkeypatch):
    """A compiler failure (here torch.compile's product raising, as inductor does without a
    C++ compiler) must not change results, state or the generator stream."""
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(1)
            torch.rand(3, generator=args[2])  # a partial run that drew before failing
            raise RuntimeError("backend compiler failed: no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager, compiled = gradbal.get_method("pcgrad"), compile_method("pcgrad")
    ge, gc = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    gram = well_conditioned(4, seed=2)
    with pytest.warns(RuntimeWarning, match="torch.compile of method 'pcgrad' failed"):
        w = compiled.weights(gram, None, gc)
    assert torch.equal(w, eager.weights(gram, None, ge))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        assert torch.equal(compiled.weights(gram, None, gc), eager.weights(gram, None, ge))
    assert calls == [1]


def test_failure_on_a_later_call_restores_state_and_generator():
    """A recompilation can fail at any call (a new value of a Python-int state): the part that
    ran before the failure (here: a whole eager step of GradVac, which moves its EMA targets,
    and a draw from the generator) is undone before the eager retry."""
    k = 3
    eager, compiled = gradbal.get_method("gradvac"), compile_method("gradvac")
    ge, gc = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    grams = [well_conditioned(k, seed=s) for s in range(3)]
    _close(compiled.weights(grams[0], None, gc), eager.weights(grams[0], None, ge))

    def fails_half_way(gram, losses, generator):
        compiled.method.weights(gram, losses, generator)  # state and generator move...
        raise RuntimeError("recompilation failed")  # ...then the compiler gives up

    compiled._compiled = {mode: fails_half_way for mode in compiled._compiled}
    with pytest.warns(RuntimeWarning, match="failed"):
        w = compiled.weights(grams[1], None, gc)
    _close(w, eager.weights(grams[1], None, ge))
    _close(compiled.weights(grams[2], None, gc), eager.weights(grams[2], None, ge))  # eager now
    assert torch.equal(gc.get_state(), ge.get_state())
    _close(compiled.state_dict()["target"], eager.state_dict()["target"])


def test_bad_input_raises_the_eager_error_and_keeps_compiling():
    compiled = compile_method("upgrad", pref_vector=[0.5, 0.5])
    with pytest.raises(ValueError, match="pref_vector"):
        compiled.weights(well_conditioned(3), None)  # K = 3 for a 2-entry preference
    assert not compiled._failed
    _close(compiled.weights(well_conditioned(2), None), gradbal.get_method("upgrad").weights(well_conditioned(2), None))


def test_compiled_method_is_the_wrapped_method_otherwise():
    c = compile_method("cagrad", c=0.3)
    assert isinstance(c, gradbal.Method) and isinstance(c, CompiledMethod)
    assert c.name == "cagrad" and c.c == 0.3 and c.needs_gram and not c.stateful
    assert gradbal.get_method(c) is c
    assert "CAGrad(c=0.3" in repr(c)
    with pytest.raises(TypeError, match="already compiled"):
        CompiledMethod(c)
    famo = compile_method("famo", update="after_step")
    assert famo.uses_losses_after_step and not famo.requires_task_gradients
    assert not compile_method("famo").uses_losses_after_step  # the wrapped method's answer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mokd", "upgrad", "dualproj", "gradvac", "pcgrad"])
def test_compiled_on_cuda_matches_eager_without_host_sync(name):
    """On CUDA a stateless method replays as a CUDA graph ("reduce-overhead"), a stateful one
    compiles without graphs; either way the weights equal the eager ones, later replays make
    no host synchronisation, and the returned weights survive the next replay."""
    k = 4
    eager, compiled = gradbal.get_method(name), compile_method(name)
    # One seed for both: GradVac draws its pair orders from the generator.
    gen_eager, gen_compiled = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    losses = (torch.rand(k, dtype=F64, generator=torch.Generator().manual_seed(6)) + 0.5).cuda()
    grams = [well_conditioned(k, seed=s).cuda() for s in range(4)]
    expected = [eager.weights(gram, losses, gen_eager) for gram in grams]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
        for i in range(2):  # compile and record
            _close(compiled.weights(grams[i], losses, gen_compiled), expected[i])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            w2 = compiled.weights(grams[2], losses, gen_compiled)
            w3 = compiled.weights(grams[3], losses, gen_compiled)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    _close(w3, expected[3])
    _close(w2, expected[2])  # still intact after the next replay


def _top_level_aten_ops(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def test_methods_sharing_a_class_all_stay_compiled():
    """Dynamo keeps at most 8 programs per code object and then runs the frame eagerly
    without a word. The four mgda_* normalisations are one class: at K = 2 and 3 they are 8
    programs of MGDANormalized.weights, and a ninth would have fallen back to eager. Each
    compiled method must still dispatch far fewer top-level ops than the eager one (fused
    kernels instead of one op per tensor operation)."""
    names = ["mgda_gn", "mgda_l2", "mgda_loss", "mgda_loss+"]
    shapes = [2, 3, 4]  # 12 programs of one class
    for k in shapes:
        gram, losses = well_conditioned(k, seed=k), torch.rand(k, dtype=F64) + 0.5
        for name in names:
            eager, compiled = gradbal.get_method(name), compile_method(name)
            _close(compiled.weights(gram, losses), eager.weights(gram, losses))
            n_eager = _top_level_aten_ops(lambda m=eager, g=gram, lo=losses: m.weights(g, lo))
            n_compiled = _top_level_aten_ops(lambda m=compiled, g=gram, lo=losses: m.weights(g, lo))
            assert n_compiled <= n_eager // 2, (name, k, n_compiled, n_eager)
