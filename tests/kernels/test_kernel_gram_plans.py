"""Non-default Gram plans (gram.plan_gram overrides, GRADBAL_GRAM_PLAN, explicit GramPlan).

Every plan a tuning run may choose must give the same guarantees as the default one: each
entry within gram_error_bound of the float64 reference (the bound of *that* plan: its fp32
chain is min(ceil(N / (U B P)) U, ceil(N / B)) for fma, B for dot), G exactly symmetric, exact
inf/NaN counts, the same bits on every run. Buffers start as NaN/garbage (``poison``). The
parsing of the environment variable and the errors for bad keys and values are checked here
too. Sizes are small: the kernels run under Triton's interpreter on CPU machines.
"""

from __future__ import annotations

import pytest
import torch

KS = (2, 3, 8, 16)
NS = (1, 7, 4097, 20011)
DTYPES = (torch.float32, torch.bfloat16)
# unroll 1/2/4, programs_per_sm 1/4, fma_lanes 4096/16384, tl.dot forced on (small K pads
# to 16) and off (bf16 K = 16 then takes the fma path), num_warps.
OVERRIDES = (
    {"unroll": 2},
    {"unroll": 4, "programs_per_sm": 1},
    {"unroll": 4, "programs_per_sm": 4, "fma_lanes": 4096},
    {"unroll": 1, "programs_per_sm": 4, "fma_lanes": 16384, "num_warps": 4},
    {"use_dot": True, "unroll": 2},
    {"use_dot": False, "unroll": 4, "programs_per_sm": 1},
)
ENV = "GRADBAL_GRAM_PLAN"


def _spec(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items())


@pytest.fixture(autouse=True)
def _no_env_plan(monkeypatch):
    """A GRADBAL_GRAM_PLAN in the caller's environment must not change these tests."""
    monkeypatch.delenv(ENV, raising=False)


@pytest.mark.parametrize("overrides", OVERRIDES, ids=_spec)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
def test_plan_matches_reference(
    k, dtype, overrides, device, poison, gram_mod, rows_of, bits_of, monkeypatch
):
    for n in NS:
        rows = rows_of(k, n, dtype, device)
        plan = gram_mod.plan_gram(k, n, dtype, rows, **overrides)
        assert plan.unroll == overrides.get("unroll", 1)
        if "use_dot" in overrides:
            assert plan.use_dot == overrides["use_dot"]
            assert plan.k_pad == (max(16, k) if plan.use_dot else max(2, 1 << (k - 1).bit_length()))
        g, counts = gram_mod.gram_with_nonfinite(rows, plan=plan)
        assert g.shape == (k, k) and g.dtype == torch.float64
        assert torch.isfinite(g).all()
        err = (g - gram_mod.gram_reference(rows)).abs()
        bound = gram_mod.gram_error_bound(rows, plan)
        assert (err <= bound).all(), f"N={n}: max err/bound {(err / bound).max():.3g}"
        assert torch.equal(g, g.T), "G must be exactly symmetric"
        assert counts.tolist() == [0] * k
        # Without the count, and on a second run: the same bits.
        assert torch.equal(bits_of(gram_mod.gram(rows, plan=plan)), bits_of(g))
        if n == NS[-1]:
            g2, c2 = gram_mod.gram_with_nonfinite(rows, plan=plan)
            assert torch.equal(bits_of(g2), bits_of(g)) and torch.equal(c2, counts)
            # The same plan through the environment variable: the same bits.
            monkeypatch.setenv(ENV, _spec(overrides))
            assert gram_mod.plan_gram(k, n, dtype, rows) == plan
            assert torch.equal(bits_of(gram_mod.gram(rows)), bits_of(g))
            monkeypatch.delenv(ENV)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(
    "k,n,dtype,overrides",
    [
        (3, 4097, torch.float32, {"unroll": 4, "programs_per_sm": 1}),
        (8, 20011, torch.bfloat16, {"unroll": 2, "fma_lanes": 4096}),
        (2, 7, torch.float32, {"use_dot": True, "unroll": 4}),
        (16, 20011, torch.bfloat16, {"use_dot": False, "unroll": 4}),
    ],
    ids=str,
)
def test_plan_nonfinite_counts(k, n, dtype, overrides, device, poison, gram_mod, rows_of):
    rows = rows_of(k, n, dtype, device)
    # First and last columns (the masked tail of the last super-block), and one mid column.
    planted = {0: [(0, float("nan"))], k - 1: [(n - 1, float("inf")), (0, float("-inf"))]}
    if k > 2:
        planted[1] = [(n // 2, float("nan")), (n - 1, float("nan")), (1, float("inf"))]
    for r, entries in planted.items():
        for c, v in entries:
            rows[r, c] = v
    plan = gram_mod.plan_gram(k, n, dtype, rows, **overrides)
    g, counts = gram_mod.gram_with_nonfinite(rows, plan=plan)
    assert torch.equal(counts, gram_mod.nonfinite_reference(rows))
    bad = counts > 0
    assert torch.equal(~torch.isfinite(g), bad[:, None] | bad[None, :])
    clean = (~bad).nonzero().flatten()
    if clean.numel():
        sub = rows[clean]
        sub_plan = gram_mod.plan_gram(sub.shape[0], n, dtype, sub, **overrides)
        assert (
            (g[clean][:, clean] - gram_mod.gram_reference(sub)).abs()
            <= gram_mod.gram_error_bound(sub, sub_plan)
        ).all()


def test_defaults_follow_the_tuned_table(gram_mod):
    """No override = the GPU sweep's plan for (path, KP, element size), written out here by
    hand from benchmarks/RESULTS.md (H200 tune_gram table), and the untuned fallback
    (U = 1, 2 programs per SM, 16K lanes) for what the sweep did not cover."""
    expected = {  # (K, dtype) -> (use_dot, unroll, block, same plan as programs_per_sm=...)
        (2, torch.float32): (False, 4, 8192 // 4, 2),
        (3, torch.float32): (False, 8, 8192 // 16, 2),
        (8, torch.float32): (False, 8, 8192 // 64, 2),
        (16, torch.float32): (False, 8, 16384 // 256, 1),
        (2, torch.bfloat16): (False, 4, 4096 // 4, 4),
        (2, torch.float16): (False, 4, 4096 // 4, 4),
        (5, torch.bfloat16): (False, 8, 8192 // 64, 2),
        (16, torch.bfloat16): (True, 8, 2048 // 16, 2),
        (32, torch.float32): (True, 1, 2048 // 32, 2),  # not swept: the fallback
    }
    for (k, dtype), (use_dot, unroll, block, per_sm) in expected.items():
        plan = gram_mod.plan_gram(k, 10**7, dtype)
        assert (plan.use_dot, plan.unroll, plan.block) == (use_dot, unroll, block), (k, dtype)
        assert plan == gram_mod.plan_gram(k, 10**7, dtype, programs_per_sm=per_sm)
        assert plan.num_warps == (4 if use_dot else 8)
    # An override still wins over the table.
    assert gram_mod.plan_gram(2, 10**7, torch.float32, unroll=1).unroll == 1
    # The positional constructor of before still works (unroll defaults to 1).
    assert gram_mod.GramPlan(2, 4096, 8, False, 8).unroll == 1


def test_accumulation_depth(gram_mod):
    plan = gram_mod.GramPlan(
        k_pad=2, block=16, num_programs=2, use_dot=False, num_warps=8, unroll=4
    )
    # N = 200: 13 blocks, 4 super-blocks; program 0 sees super-blocks 0 and 2: 8 blocks.
    assert plan.num_super_blocks(200) == 4
    assert plan.accumulation_depth(200) == 8
    # N = 20: 2 blocks in all, so no lane sees more than 2 even though U = 4.
    assert plan.accumulation_depth(20) == 2
    assert plan.accumulation_depth(0) == 1
    dot = gram_mod.GramPlan(16, 128, 2, True, 4, unroll=4)
    assert dot.accumulation_depth(10**6) == 128
    # unroll 1: the formula of the unrolled-less kernel, ceil(N / (B P)).
    assert gram_mod.GramPlan(2, 16, 3, False, 8).accumulation_depth(1000) == 21


def test_env_parsing(gram_mod, monkeypatch):
    parse = gram_mod.parse_plan_spec
    assert parse("") == ()
    assert parse(" unroll = 4 , programs_per_sm=4,, fma_lanes=8192 ") == (
        ("unroll", 4),
        ("programs_per_sm", 4),
        ("fma_lanes", 8192),
    )
    for text, value in [("1", True), ("On", True), ("yes", True), ("0", False), ("false", False)]:
        assert parse(f"use_dot={text}") == (("use_dot", value),)
    spec = {"unroll": 4, "programs_per_sm": 4, "fma_lanes": 8192, "use_dot": True}
    assert dict(parse(gram_mod.format_plan_spec(spec))) == spec

    monkeypatch.setenv(ENV, "unroll=4,programs_per_sm=1,fma_lanes=4096")
    plan = gram_mod.plan_gram(2, 10**5, torch.float32)
    assert (plan.unroll, plan.block, plan.num_programs) == (4, 1024, 4)
    # Keyword overrides apply on top of the environment.
    plan = gram_mod.plan_gram(2, 10**5, torch.float32, unroll=2, use_dot=True)
    assert (plan.unroll, plan.use_dot, plan.k_pad, plan.num_programs) == (2, True, 16, 4)
    monkeypatch.setenv(ENV, "  ")  # blank: the tuned default (U = 4 for K = 2 fp32)
    assert gram_mod.plan_gram(2, 10**5, torch.float32) == gram_mod.plan_gram(
        2, 10**5, torch.float32, unroll=4
    )


@pytest.mark.parametrize(
    "spec,match",
    [
        ("unrol=4", r"unknown gram plan key 'unrol'; allowed keys: programs_per_sm, fma_lanes"),
        ("unroll=3", r"bad value '3' for 'unroll'; unroll must be a power of two in \[1, 16\]"),
        ("unroll=32", r"'unroll'"),
        ("fma_lanes=1000", r"'fma_lanes'; fma_lanes must be a power of two in \[1024, 65536\]"),
        ("programs_per_sm=0", r"'programs_per_sm'"),
        ("programs_per_sm=two", r"bad value 'two' for 'programs_per_sm'"),
        ("num_warps=3", r"'num_warps'"),
        ("use_dot=maybe", r"bad value 'maybe' for 'use_dot'; use_dot must be a boolean"),
        ("unroll", r"'unroll' is not key=value; allowed keys"),
        ("unroll=2,unroll=4", r"key 'unroll' given twice"),
    ],
)
def test_bad_env_raises_before_anything_runs(spec, match, gram_mod, device, rows_of, monkeypatch):
    def no_alloc(*args, **kwargs):
        raise AssertionError("allocated a buffer despite a bad GRADBAL_GRAM_PLAN")

    monkeypatch.setattr(gram_mod, "_alloc", no_alloc)
    monkeypatch.setenv(ENV, spec)
    rows = rows_of(2, 7, torch.float32, device)
    for call in (gram_mod.gram, gram_mod.gram_with_nonfinite, gram_mod.gram_error_bound):
        with pytest.raises(ValueError, match=match):
            call(rows)
    with pytest.raises(ValueError, match="GRADBAL_GRAM_PLAN"):
        gram_mod.plan_gram(2, 7, torch.float32)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"unrol": 2}, "unknown gram plan key 'unrol'"),
        ({"unroll": 6}, "bad value 6 for 'unroll'"),
        ({"unroll": True}, "bad value True for 'unroll'"),
        ({"fma_lanes": 2.0**13}, "bad value 8192.0 for 'fma_lanes'"),
        ({"num_warps": 32}, "bad value 32 for 'num_warps'"),
        ({"use_dot": 2}, "bad value 2 for 'use_dot'"),
    ],
)
def test_bad_overrides(overrides, match, gram_mod):
    with pytest.raises(ValueError, match=match):
        gram_mod.plan_gram(4, 100, torch.float32, **overrides)


def test_fma_refused_above_k16(gram_mod):
    with pytest.raises(ValueError, match="use_dot=False needs K <= 16"):
        gram_mod.plan_gram(17, 100, torch.float32, use_dot=False)


def test_explicit_plan_is_checked(gram_mod, device, rows_of):
    rows = rows_of(5, 100, torch.float32, device)
    good = gram_mod.plan_gram(5, 100, torch.float32, rows)
    bad_plans = {
        "k_pad must be >=": {"k_pad": 4},
        "block must be a power of two": {"block": 100},
        "unroll must be a power of two": {"unroll": 3},
        "unroll must be <= 16": {"unroll": 32},
        "num_programs must be a positive int": {"num_programs": 0},
        "the fma path needs k_pad <= 16": {"k_pad": 32},
        "the dot path needs 16 <= k_pad": {"use_dot": True},
        "use_dot must be a bool": {"use_dot": 1},
        "num_warps must be <= 16": {"num_warps": 32},
    }
    for match, changes in bad_plans.items():
        plan = gram_mod.GramPlan(**{**good.__dict__, **changes})
        with pytest.raises(ValueError, match=match):
            gram_mod.gram(rows, plan=plan)
    with pytest.raises(ValueError, match="the dot path needs block >= 16"):
        gram_mod.gram(rows, plan=gram_mod.GramPlan(16, 8, 2, True, 4))
    with pytest.raises(TypeError, match="GramPlan"):
        gram_mod.gram(rows, plan={"unroll": 2})
    # More programs than super-blocks is allowed: the spare programs write zero partials.
    plan = gram_mod.GramPlan(8, 16, 64, False, 8, unroll=2)
    g = gram_mod.gram(rows, plan=plan)
    err = (g - gram_mod.gram_reference(rows)).abs()
    assert (err <= gram_mod.gram_error_bound(rows, plan)).all()
