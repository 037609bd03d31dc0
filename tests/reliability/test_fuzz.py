"""Fuzz the optimizer: every ``backward`` + ``step`` either takes the correct balanced step or
raises a clear error (ValueError / TypeError / FloatingPointError) that leaves the parameters,
``.grad`` (values and objects), the wrapped optimizer's state, the method's state and the
generator as they were.

Each example draws a small problem: P parameters of random shapes and dtypes (float32,
float64 or both, so the store has one or two groups), K objectives each reaching a random
subset of them (shared and unshared parameters, parameters nobody reaches, frozen ones),
planted trouble (NaN/Inf gradients with finite loss values, NaN/Inf loss values with finite
gradients, exact zero gradients, zero and negative loss values, an objective that reaches no
parameter of the optimizer, K changing under a stateful method), a method among
``gradbal.available_methods()``, ``nonfinite`` raise/skip, ``gram_params`` all/shared, SGD
with momentum or Adam, warm-up steps, and what ``.grad`` holds before the call (nothing,
zeros in the store, the previous balanced gradient to accumulate into, or tensors the user
set).

The reference is computed independently: per-objective gradients from
``torch.autograd.grad``, the Gram matrix from them (restricted to the shared columns for
``gram_params="shared"``), the weights from a copy of the method and the generator, the
combination as a plain matrix product; ``gradbal.aggregate`` must agree where it applies
(one dtype, ``gram_params="all"``). The applied step is checked against a twin of the wrapped
optimizer fed the same ``.grad``.

Examples: ``GRADBAL_FUZZ_EXAMPLES`` (default 100, a few seconds on CPU); ``GRADBAL_FUZZ_RANDOM=1`` draws
new examples instead of the fixed, derandomised sequence CI runs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

import gradbal
from gradbal import _ops

from ._checks import differences, same, snapshot

F64 = torch.float64
METHODS = gradbal.available_methods()
SHAPES = [(), (1,), (3,), (2, 3), (4, 1)]
KINDS = ["normal"] * 8 + ["zero_grad", "zero_loss", "negative", "nan_grad", "inf_grad",
                          "nan_loss", "inf_loss", "unreached"]
EXAMPLES = int(os.environ.get("GRADBAL_FUZZ_EXAMPLES", "100"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CLEAR_ERRORS = (ValueError, TypeError)

# Behaviour that contradicts the contract, reported to the optimizer/method owners, each with
# a strict-xfail minimal repro in test_known_issues.py. The fuzz test records these events
# (hypothesis' statistics) instead of failing on them; everything else it checks strictly.
# Remove an entry when its repro starts passing.
KNOWN: set[str] = set()  # every contract violation found so far is fixed


class Plant(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``value`` (NaN, Inf) backward."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


@dataclass
class Scenario:
    method: str
    params: list  # (shape, dtype, frozen)
    k: int
    warm_k: int
    reach: list  # per objective: indices of parameters
    kinds: list  # per objective
    scales: list
    warmup: int
    prev: str  # none | zeros | accumulate | foreign
    nonfinite: str
    gram_params: str
    inner: str
    two_groups: bool
    weights: list  # for the "weighted" method
    seed: int
    device: str = "cpu"


@st.composite
def scenarios(draw):
    method = draw(st.sampled_from(METHODS))
    mode = draw(st.sampled_from(["float32", "float64", "mixed"]))
    n = draw(st.integers(1, 4))
    params = []
    for _ in range(n):
        shape = draw(st.sampled_from(SHAPES))
        dtype = {"float32": torch.float32, "float64": F64}.get(mode) or draw(
            st.sampled_from([torch.float32, F64]))
        params.append((shape, dtype, False))
    if draw(st.integers(0, 4)) == 0:
        params.append(((2,), params[0][1], True))  # a frozen parameter in the optimizer
    k = draw(st.integers(2, 4))
    warm_k = k
    if method != "weighted" and draw(st.integers(0, 7)) == 0:
        warm_k = draw(st.integers(2, 4))
    reach = [draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)) for _ in range(k)]
    kinds = [draw(st.sampled_from(KINDS)) for _ in range(k)]
    scales = [10.0 ** draw(st.integers(-3, 2)) for _ in range(k)]
    return Scenario(
        method=method, params=params, k=k, warm_k=warm_k, reach=reach, kinds=kinds,
        scales=scales, warmup=draw(st.integers(0, 2)),
        prev=draw(st.sampled_from(["none", "zeros", "accumulate", "foreign"])),
        nonfinite=draw(st.sampled_from(["raise", "skip"])),
        gram_params=draw(st.sampled_from(["all", "shared"])),
        inner=draw(st.sampled_from(["sgd", "adam"])), two_groups=draw(st.booleans()),
        weights=[draw(st.sampled_from([0.25, 0.5, 1.0, 2.0])) for _ in range(k)],
        seed=draw(st.integers(0, 2**16)), device=draw(st.sampled_from(DEVICES)),
    )


# --------------------------------------------------------------------------- the problem
class Problem:
    def __init__(self, sc: Scenario):
        self.sc = sc
        gen = torch.Generator().manual_seed(sc.seed)
        self.all_params = [
            torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64).to(sc.device, dtype),
                               requires_grad=not frozen)
            for shape, dtype, frozen in sc.params
        ]
        self.params = [p for p in self.all_params if p.requires_grad]  # the optimizer's order
        self.stranger = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=F64).to(sc.device))
        if sc.two_groups and len(self.all_params) > 1:
            groups = [{"params": self.all_params[:1]}, {"params": self.all_params[1:], "lr": 3e-4}]
        else:
            groups = [{"params": self.all_params}]
        if sc.inner == "sgd":
            self.inner = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
        else:
            self.inner = torch.optim.Adam(groups, lr=1e-3)
        method = gradbal.get_method("weighted", weights=sc.weights) if sc.method == "weighted" else sc.method
        self.opt = gradbal.MultiObjectiveOptimizer(
            self.inner, method, nonfinite=sc.nonfinite, gram_params=sc.gram_params, seed=sc.seed
        )

    def losses(self, step: int, kinds: list[str]) -> list[torch.Tensor]:
        sc = self.sc
        out = []
        for k, kind in enumerate(kinds):
            gen = torch.Generator().manual_seed(sc.seed * 1000 + step * 10 + k)
            reach = sc.reach[k % len(sc.reach)]
            s = 0
            for i in reach:
                p = self.all_params[i]
                a = torch.randn(p.shape, generator=gen, dtype=F64).to(p.device, p.dtype)
                s = s + (a * torch.tanh(p)).sum() + 0.1 * (p * p).sum()
            b = float(torch.randn((), generator=gen))
            if kind == "unreached":
                s = (self.stranger * self.stranger).sum()
            elif kind in ("nan_grad", "inf_grad"):
                s = Plant.apply(s, float("nan") if kind == "nan_grad" else float("inf"))
            loss = sc.scales[k % len(sc.scales)] * ((s - b) ** 2 + 0.01)
            if kind == "zero_grad":
                loss = 0 * s + 0.5  # reaches its parameters, gradient exactly zero
            elif kind == "zero_loss":
                loss = 0 * s  # value and gradient exactly zero
            elif kind == "negative":
                loss = -loss
            elif kind == "nan_loss":
                loss = loss + float("nan")
            elif kind == "inf_loss":
                loss = loss + float("inf")
            out.append(loss)
        return out

    def set_prev(self, mode: str) -> None:
        if mode == "none":
            self.opt.zero_grad(set_to_none=True)
        elif mode == "zeros":
            self.opt.zero_grad(set_to_none=False)
        elif mode == "foreign":
            self.opt.zero_grad(set_to_none=True)  # (a method's own parameters too, e.g. UW's)
            gen = torch.Generator().manual_seed(self.sc.seed + 7)
            for p in self.params:
                if torch.randint(0, 3, (), generator=gen) > 0:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=F64).to(p.device, p.dtype)
                else:
                    p.grad = None
        # "accumulate": keep whatever the previous step left (the store's balanced gradient)


# --------------------------------------------------------------------------- the reference
def reference(prob: Problem, losses: list[torch.Tensor]) -> dict:
    params = prob.params
    per_task = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    values = torch.stack([loss.detach().reshape(()) for loss in losses]).to(F64)
    counts = [sum(g[i] is not None for g in per_task) for i in range(len(params))]
    kinds: dict = {}
    for i, p in enumerate(params):
        kinds.setdefault((p.device, p.dtype), []).append(i)
    groups = []
    for idx in kinds.values():
        rows = torch.stack([
            torch.cat([(g[i] if g[i] is not None else torch.zeros_like(params[i])).reshape(-1) for i in idx])
            for g in per_task
        ])
        shared = torch.cat([torch.full((params[i].numel(),), counts[i] > 1, device=params[i].device) for i in idx])
        groups.append((idx, rows, shared))
    gram = sum(_ops.gram(rows) for _, rows, _ in groups)
    gram_shared = sum(_ops.gram(rows[:, shared].contiguous()) for _, rows, shared in groups)
    bad_grad = [any(not bool(torch.isfinite(g[i]).all()) for i in range(len(params)) if g[i] is not None)
                for g in per_task]
    return {"per_task": per_task, "values": values, "counts": counts, "groups": groups,
            "gram": gram, "gram_shared": gram_shared, "bad_grad": bad_grad,
            "bad_loss": [not bool(torch.isfinite(v)) for v in values],
            "reached": [any(x is not None for x in g) for g in per_task]}


def expected_outcome(prob: Problem, ref: dict, k: int) -> tuple[str, str | None]:
    """("value", why) | ("nonfinite", known-issue or None) | ("step", None)."""
    m = prob.opt.method
    if m.stateful and prob.opt.num_objectives not in (None, k):
        return "value", "K changed under a stateful method"
    if m.requires_nonnegative_losses and bool((ref["values"] < 0).any()):
        return "value", "negative loss"
    if m.requires_task_gradients:
        if not all(ref["reached"]):
            return "value", "objective reaches no parameter"
        if any(ref["bad_grad"]) or any(ref["bad_loss"]):
            return "nonfinite", None
        return "step", None
    if not any(ref["reached"]):
        return "value", "no objective reaches any parameter"
    if any(ref["bad_loss"]):
        return "nonfinite", None
    if any(bad and reached for bad, reached in zip(ref["bad_grad"], ref["reached"])):
        return "nonfinite", None
    return "step", None


# --------------------------------------------------------------------------- one checked call
def tolerance(dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 1e-11


def check_step(prob: Problem, losses, ref, twins, before) -> None:
    """The call succeeded: .grad is prev + sum_k w_k g_k, and the step is the wrapped one's."""
    opt, params = prob.opt, prob.params
    stats = opt.last_stats
    m = opt.method
    if m.requires_task_gradients:
        gram_used = ref["gram_shared"] if prob.sc.gram_params == "shared" else ref["gram"]
        tol = max(tolerance(p.dtype) for p in params)
        scale = float(ref["gram"].diagonal().abs().max()) + 1e-300
        torch.testing.assert_close(stats.gram, gram_used, rtol=tol, atol=tol * scale)
        # Same Gram matrix in, same weights out: the method copy and the generator copy must
        # reproduce the optimizer's weights bit for bit (state and draws plumbed correctly).
        twin_method, twin_gen = twins[0]
        w_twin = twin_method.weights(stats.gram, ref["values"], twin_gen)
        assert torch.equal(w_twin, stats.weights), (w_twin, stats.weights)
        w = stats.weights
        exact_gram = len(ref["groups"]) == 1 and prob.sc.gram_params == "all"
        if exact_gram:
            assert torch.equal(stats.gram, ref["gram"])
        elementwise = getattr(m, "elementwise", False)  # not a weighted sum (graddrop)
        if elementwise and len(ref["groups"]) > 1:
            event("elementwise method, two groups: direction not checked")
            return
        for idx, rows, _ in ref["groups"]:
            tol = tolerance(rows.dtype)
            if elementwise:
                agg_method, agg_gen = twins[1]
                d = gradbal.aggregate(rows, agg_method, ref["values"], generator=agg_gen, validate=False)
                atol = tol * (float(rows.abs().sum(0).max()) + 1.0)
            else:
                d = w.to(rows.dtype) @ rows
                atol = tol * (float((w.abs().to(rows.dtype) @ rows.abs()).max()) + 1.0)
            o = 0
            for i in idx:
                p, n = params[i], params[i].numel()
                prev = before["grads"][i]
                if ref["counts"][i] == 0:
                    assert (p.grad is None) == (prev is None), i
                    if prev is not None:
                        assert torch.equal(p.grad, prev), i
                else:
                    want = d[o:o + n].view(p.shape) + (0 if prev is None else prev)
                    torch.testing.assert_close(p.grad, want, rtol=tol, atol=atol)
                o += n
        if exact_gram and not elementwise:
            # The public functional form on the same rows gives the same direction.
            (_, rows, _), = ref["groups"]
            agg_method, agg_gen = twins[1]
            d = gradbal.aggregate(rows, agg_method, ref["values"], generator=agg_gen, validate=False)
            tol = tolerance(rows.dtype)
            torch.testing.assert_close(d, w.to(rows.dtype) @ rows, rtol=tol,
                                       atol=tol * (float((w.abs().to(rows.dtype) @ rows.abs()).max()) + 1.0))
    else:
        w_twin, grads = ref["loss_based"]
        assert torch.equal(w_twin, stats.weights), (w_twin, stats.weights)
        for i, (p, g) in enumerate(zip(params, grads)):
            prev = before["grads"][i]
            if g is None:
                assert (p.grad is None) == (prev is None) and (prev is None or torch.equal(p.grad, prev))
            else:
                want = g + (0 if prev is None else prev)
                # The weights meet the losses' dtypes (float32 if any is): allow that rounding.
                tol = max(tolerance(p.dtype), *(tolerance(loss.dtype) for loss in losses))
                torch.testing.assert_close(p.grad, want, rtol=tol, atol=tol * (float(want.abs().max()) + 1))
    for p in params:
        if p.grad is not None:
            assert bool(torch.isfinite(p.grad).all()), "a finite problem gave a non-finite .grad"


def twin_inner(prob: Problem):
    """A copy of the wrapped optimizer on cloned parameters carrying the current .grad."""
    originals = [p for g in prob.inner.param_groups for p in g["params"]]  # method params too
    clones = {}
    for p in originals:
        c = p.detach().clone().requires_grad_(p.requires_grad)
        c.grad = None if p.grad is None else p.grad.detach().clone()
        clones[id(p)] = c
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [clones[id(p)] for p in g["params"]]}
              for g in prob.inner.param_groups]
    twin = type(prob.inner)(groups)
    twin.load_state_dict(copy.deepcopy(prob.inner.state_dict()))
    return twin, [clones[id(p)] for p in prob.all_params]


def checked_call(prob: Problem, step: int, kinds: list[str]) -> str:
    """Run one backward + step on losses of ``kinds``; check the outcome. Returns it."""
    opt, sc = prob.opt, prob.sc
    losses = prob.losses(step, kinds)
    ref = reference(prob, losses)
    want, why = expected_outcome(prob, ref, len(kinds))
    note(f"step {step}: kinds={kinds} expected={want} ({why})")
    twins = [(copy.deepcopy(opt.method), torch.Generator().set_state(opt.generator.get_state()))
             for _ in range(2)]
    if sc.method in ("weighted",) and len(kinds) != len(sc.weights):
        want, why = "value", "weighted: wrong number of weights"
    if want == "step" and not opt.method.requires_task_gradients:
        # Loss-based: the gradient of sum_k w_k L_k, with the weights of the method's copy.
        w = twins[0][0].weights(None, ref["values"], twins[0][1])
        total = sum(wk * loss for wk, loss in zip(w.to(losses[0].dtype).unbind(), losses))
        ref["loss_based"] = (w, torch.autograd.grad(total, prob.params, retain_graph=True, allow_unused=True))
    before = snapshot(prob.all_params, opt)
    try:
        opt.backward(losses)
    except CLEAR_ERRORS as err:
        note(f"backward raised {type(err).__name__}: {err}")
        assert want == "value", f"unexpected {type(err).__name__} ({err}); expected {want}"
        assert str(err), "an error without a message"
        assert differences(before, snapshot(prob.all_params, opt)) == []
        event(f"backward: {why}")
        return "value"
    assert want != "value", f"expected a ValueError ({why}), backward succeeded"
    after_backward = snapshot(prob.all_params, opt)
    # backward never steps (it may register a method's own parameters in a param group).
    assert differences(before, after_backward, ["params"]) == []
    assert same(before["inner"]["state"], after_backward["inner"]["state"])
    if want == "step" and not bool(torch.isfinite(opt.last_stats.weights).all()):
        # A solver gave non-finite weights on finite input: the step must be refused.
        want, why = "nonfinite", None
        event("non-finite weights from a finite Gram matrix")
    if want == "step":
        check_step(prob, losses, ref, twins, before)
        twin, clones = twin_inner(prob)
        opt.step()
        twin.step()
        for p, c in zip(prob.all_params, clones):
            assert torch.equal(p, c.detach())
        event("correct step")
        return "step"
    # Non-finite: raise -> FloatingPointError, skip -> no update; nothing else may move.
    skipped = opt.skipped_steps
    try:
        opt.step()
    except FloatingPointError as err:
        raised = True
        assert "finite" in str(err), err  # names the non-finite objective(s) or direction
    else:
        raised = False
    after = snapshot(prob.all_params, opt)
    moved = differences(before, after, ["params"])
    if not same(before["inner"]["state"], after["inner"]["state"]):
        moved.append("inner")
    if why is not None and (moved or not raised and sc.nonfinite == "raise"):
        event(f"KNOWN: {why}")
        assert why in KNOWN
        return "known"
    assert moved == [], f"a non-finite step changed {moved}"
    assert differences(after_backward, after, ["grads", "grad_objects"]) == []
    if sc.nonfinite == "raise":
        assert raised, "non-finite gradients were not refused"
    else:
        assert not raised and opt.skipped_steps == skipped + 1
    drift = differences(before, after, ["method", "generator"])
    if drift:
        event("KNOWN: refused step advanced method state or generator")
        assert "refused step advanced method state or generator" in KNOWN
    event(f"refused: {sc.nonfinite}")
    return "nonfinite"


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("GRADBAL_FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)
@given(scenarios())
# Pinned cases, so the short CI run always covers these branches:
@example(Scenario("mokd", [((3,), F64, False), ((2,), torch.float32, False)], 2, 2, [[0, 1], [0]],
                  ["normal", "negative"], [1.0, 1.0], 1, "accumulate", "raise", "all", "sgd", True, [1, 1], 1))
@example(Scenario("gradvac", [((2, 3), F64, False)], 2, 3, [[0], [0]], ["normal", "normal"], [1.0, 1.0],
                  2, "foreign", "raise", "all", "adam", False, [1, 1], 2))
@example(Scenario("nash_mtl", [((3,), torch.float32, False), ((), F64, False)], 3, 3, [[0], [0, 1], [1]],
                  ["normal", "inf_grad", "zero_grad"], [0.01, 1.0, 100.0], 2, "zeros", "skip", "shared",
                  "sgd", False, [1, 1, 1], 3))
@example(Scenario("upgrad", [((4, 1), torch.float32, False), ((3,), F64, False), ((2,), F64, True)], 3, 3,
                  [[0, 1], [1], [0]], ["zero_loss", "normal", "nan_loss"], [1.0, 0.1, 10.0], 1, "foreign", "raise",
                  "shared", "adam", True, [1, 1, 1], 4))
def test_every_call_steps_correctly_or_raises_and_changes_nothing(sc):
    prob = Problem(sc)
    for step in range(sc.warmup):
        prob.opt.zero_grad()
        prob.opt.backward(prob.losses(100 + step, ["normal"] * sc.warm_k))
        prob.opt.step()
    prob.set_prev(sc.prev)
    outcome = checked_call(prob, 0, sc.kinds)
    # Whatever happened, the optimizer keeps working: a clean step right after is correct.
    if outcome != "known":
        prob.set_prev("none" if outcome == "step" else sc.prev if sc.prev != "accumulate" else "zeros")
        k = prob.opt.num_objectives or sc.k
        if sc.method == "weighted":
            k = sc.k
        assert checked_call(prob, 1, ["normal"] * k) in ("step", "known")
