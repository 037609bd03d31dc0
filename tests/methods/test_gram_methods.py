"""Gram-based methods: each paper's defining property, scale and permutation behaviour, the
degenerate Gram matrices, TorchJD's documented examples, state and checkpoints."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

import gradbal
from gradbal.methods import get_method

from ._grams import F64, degenerate, k2_pairs, opposite_pair, rand_jacobian, well_conditioned

#: Every Gram-based method of the zoo (and the existing ones), with options for the tests.
GRAM_METHODS = [
    "upgrad", "dualproj", "cagrad", "imtl_g", "aligned_mtl", "nash_mtl", "fairgrad",
    "gradvac", "config", "mgda_gn", "mgda_l2", "mgda_loss", "mgda_loss+", "mgda", "mokd",
    "pcgrad", "mean", "sum",
]
RANDOM = {"gradvac", "pcgrad"}
NEEDS_LOSSES = {"mgda_loss", "mgda_loss+", "mokd"}
KS = [2, 3, 5, 8, 12, 16]


def weights(name, gram, losses=None, seed=0, **options):
    m = get_method(name, **options)
    if losses is None and name in NEEDS_LOSSES:
        losses = torch.linspace(0.5, 2.0, gram.shape[0], dtype=F64)
    return m.weights(gram, losses, torch.Generator().manual_seed(seed))


def test_all_zoo_methods_are_registered():
    names = set(gradbal.available_methods())
    assert set(GRAM_METHODS) <= names
    assert {"rlw"} <= names


# ------------------------------------------------------------- defining properties


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_do_not_conflict(name, k):
    j = rand_jacobian(k, max(2, k // 2), seed=k)  # rank-deficient: strong conflicts
    g = j @ j.T
    w = weights(name, g, reg_eps=0.0)
    d = w @ j
    # Relative to the size of the combination without cancellation (d may be ~0: with more
    # gradients than dimensions the dual cone can be {0}).
    scale = j.norm(dim=1) * (w.abs() @ j.norm(dim=1))
    assert (j @ d >= -1e-8 * scale).all()
    # With TorchJD's ridge the conflict is bounded by reg_eps * trace(G) * sum(v).
    w = weights(name, g)
    assert (g @ w >= -1e-4 * torch.trace(g) * w.abs().sum() * 1.01).all()


def test_upgrad_is_the_mean_of_the_projections():
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    w = weights("upgrad", j @ j.T, reg_eps=0.0)
    # pi(g1) = (0.5, 0.5), pi(g2) = (0, 1)
    assert torch.allclose(w @ j, torch.tensor([0.25, 0.75], dtype=F64), atol=1e-12)


def test_dual_cone_methods_keep_nonconflicting_means():
    j = torch.tensor([[1.0, 0.2], [0.3, 1.0]], dtype=F64)  # no conflict: projections are identities
    for name in ("upgrad", "dualproj"):
        w = weights(name, j @ j.T, reg_eps=0.0)
        assert torch.allclose(w, torch.full((2,), 0.5, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("k", KS)
def test_cagrad_is_the_mean_for_c_zero(k):
    g = well_conditioned(k, seed=k)
    assert torch.allclose(weights("cagrad", g, c=0.0), torch.full((k,), 1.0 / k, dtype=F64))


@pytest.mark.parametrize("k", KS)
def test_cagrad_direction_solves_its_primal(k):
    # d (before rescaling) lies on the ball ||d - g0|| = c ||g0|| and maximises
    # min_i <g_i, d> there: no point of the ball improves every objective more.
    c = 0.5
    j = rand_jacobian(k, k + 3, seed=k)
    g = j @ j.T
    w = weights("cagrad", g, c=c, rescale=0)
    d = w @ j
    g0 = j.mean(0)
    assert torch.isclose((d - g0).norm(), c * g0.norm(), rtol=1e-8)
    worst = (j @ d).min()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        e = torch.randn(j.shape[1], generator=gen, dtype=F64)
        other = g0 + c * g0.norm() * e / e.norm()
        assert (j @ other).min() <= worst + 1e-9 * worst.abs()


def test_cagrad_rescale_modes():
    g = well_conditioned(4, seed=1)
    base = weights("cagrad", g, rescale=0)
    assert torch.allclose(weights("cagrad", g, rescale=1), base / 1.25)
    assert torch.allclose(weights("cagrad", g, rescale=2), base / 1.5)


@pytest.mark.parametrize("k", KS)
def test_imtl_g_equal_projections_on_unit_gradients(k):
    g = well_conditioned(k, seed=k)
    w = weights("imtl_g", g)
    proj = (g @ w) / g.diagonal().sqrt()  # <d, g_k / ||g_k||>
    assert torch.allclose(proj, proj.mean().expand(k), rtol=1e-8)
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=F64))


def test_imtl_g_k2_closed_form_matches_the_eigendecomposition():
    from gradbal.methods.imtl import _imtl_g, _imtl_g_2

    for _, g in k2_pairs(520):
        torch.testing.assert_close(_imtl_g_2(g), _imtl_g(g), rtol=0, atol=1e-9)
        w = _imtl_g_2(g)
        n = g.diagonal().sqrt()
        if (n > 0).all() and w.abs().sum() > 0:  # the paper's formula: w ~ 1 / ||g_k||
            torch.testing.assert_close(w, n.flip(0) / n.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["imtl_g_general", "config"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_nearly_opposite_gradients_give_no_noise_weights(name, k, seed):
    """g_2 = -2 g_1 + 1e-5 noise: the rank cut drops the unit Gram matrix's eigenvector of
    that pair's common direction, so the answer must be that of exactly opposite gradients
    (K = 2: weights 0). The rounding noise of C^+ p used to be normalised into weights:
    IMTL-G gave w = (2, -1), a step of 4 g_1; ConFIG w = (-0.5, 0.25), a step of -g_1."""
    from gradbal.methods.imtl import _imtl_g

    solve = _imtl_g if name == "imtl_g_general" else (lambda g: weights("config", g))
    gen = torch.Generator().manual_seed(10 * k + seed)
    j = torch.randn(k, 6, generator=gen, dtype=F64)
    exact = j.clone()
    exact[1] = -2 * exact[0]
    j[1] = exact[1] + 1e-5 * torch.randn(6, generator=gen, dtype=F64)
    w, w_exact = solve(j @ j.T), solve(exact @ exact.T)
    # the 1e-5 noise moves the answer by O(1e-5) of its size
    torch.testing.assert_close(w, w_exact, rtol=0, atol=1e-4 * max(1.0, w_exact.abs().max().item()))
    if k == 2:
        assert torch.equal(w, torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_aligned_mtl_system_is_orthogonal_with_equal_singular_values(k, mode):
    from gradbal.methods.aligned_mtl import AlignedMTL

    g = well_conditioned(k, seed=k)
    m = AlignedMTL(scale_mode=mode)
    b = m.balance_matrix(g)
    aligned = b @ g @ b  # Gram matrix of the aligned gradients J^T B
    evals = torch.linalg.eigvalsh(g)
    s = {"min": evals[0], "median": evals[(k - 1) // 2], "rmse": evals.mean()}[mode]
    assert torch.allclose(aligned, s * torch.eye(k, dtype=F64), atol=1e-9 * s)
    assert torch.allclose(m.weights(g, None), b.sum(0))


def test_aligned_mtl_rank_deficient_aligns_the_range():
    j = rand_jacobian(5, 2, seed=0)
    g = j @ j.T
    b = get_method("aligned_mtl").balance_matrix(g)
    evals = torch.linalg.eigvalsh(g)[-2:]
    aligned = b @ g @ b
    sv = torch.linalg.eigvalsh(aligned)
    assert torch.allclose(sv[-2:], evals[0].expand(2), rtol=1e-8)
    assert sv[:-2].abs().max() <= 1e-9 * evals[0]


@pytest.mark.parametrize("k", KS)
def test_nash_mtl_bargaining_solution(k):
    g = well_conditioned(k, seed=k)
    alpha = weights("nash_mtl", g, max_norm=0.0)
    assert (alpha > 0).all()
    assert torch.allclose(g @ alpha, 1 / alpha, rtol=1e-6)
    # default max_norm = 1 clips ||d|| (= sqrt(K) at the solution) to 1
    clipped = weights("nash_mtl", g)
    assert torch.isclose(clipped @ g @ clipped, torch.tensor(1.0, dtype=F64))


def test_nash_mtl_update_weights_every_reuses_alpha():
    m = get_method("nash_mtl", max_norm=0.0, update_weights_every=3)
    g1 = well_conditioned(3, seed=1)
    g2 = well_conditioned(3, seed=2)
    a1 = m.weights(g1, None)
    assert torch.equal(m.weights(g2, None), a1)  # step 1: reused
    assert torch.equal(m.weights(g2, None), a1)  # step 2: reused
    a3 = m.weights(g2, None)  # step 3: recomputed
    assert torch.allclose(g2 @ a3, 1 / a3, rtol=1e-6)
    state = m.state_dict()
    m2 = get_method("nash_mtl", max_norm=0.0, update_weights_every=3)
    m2.load_state_dict(state)
    assert torch.equal(m2.weights(g1, None), m.weights(g1, None))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_optimality_condition(alpha):
    g = well_conditioned(4, seed=3)
    w = weights("fairgrad", g, alpha=alpha)
    assert torch.allclose(g @ w, w ** (-1 / alpha), rtol=1e-6)


def test_fairgrad_alpha_one_is_nash_without_clipping():
    g = well_conditioned(5, seed=4)
    assert torch.allclose(weights("fairgrad", g), weights("nash_mtl", g, max_norm=0.0))


@pytest.mark.parametrize("k", [2, 3, 6])
def test_config_equal_angles_and_projection_length(k):
    j = rand_jacobian(k, k + 4, seed=k)
    w = weights("config", j @ j.T)
    d = w @ j
    units = j / j.norm(dim=1, keepdim=True)
    cos = units @ d / d.norm()
    assert torch.allclose(cos, cos.mean().expand(k), rtol=1e-8)
    assert torch.isclose(d.norm(), (j @ (d / d.norm())).sum(), rtol=1e-10)


def test_gradvac_first_step_is_pcgrad_and_reaches_the_target():
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    g = j @ j.T
    gv = get_method("gradvac", beta=0.5)
    gen = torch.Generator().manual_seed(0)
    pc = get_method("pcgrad").weights(g, None, torch.Generator().manual_seed(0))
    assert torch.allclose(gv.weights(g, None, gen), pc)
    # EMA after one step: 0.5 * cos(g1, g2) = -0.5 / sqrt(2) for both pairs.
    cos = -1 / 2**0.5
    target = gv.state_dict()["target"]
    assert torch.allclose(target, torch.tensor([[0.0, 0.5 * cos], [0.5 * cos, 0.0]], dtype=F64))
    # Second step on gradients less similar than the target: each g_i' gets exactly the
    # target cosine with g_j (the vaccine's closed form), then the EMA moves again.
    j2 = torch.tensor([[1.0, 0.0], [-1.0, 0.2]], dtype=F64)
    g2 = j2 @ j2.T
    w = gv.weights(g2, None, gen)
    d = w @ j2
    g1p = d - j2[1] * 1.0 - (w[0] - 1.0) * 0  # rows: g1' = g1 + a g2, g2' = g2 + b g1
    assert g1p is not None
    coef_a = w[1] - 1.0  # weight of g2 in g1' (g2' contributes exactly 1 * g2)
    g1_new = j2[0] + coef_a * j2[1]
    cos_new = g1_new @ j2[1] / (g1_new.norm() * j2[1].norm())
    assert torch.isclose(cos_new, torch.tensor(0.5 * cos, dtype=F64), atol=1e-7)


def test_gradvac_libmtl_ema_mode():
    j = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=F64)  # cos 0.6 > 0: no conflict
    gv = get_method("gradvac", ema_update="on_conflict")
    gv.weights(j @ j.T, None, torch.Generator().manual_seed(0))
    assert torch.equal(gv.state_dict()["target"], torch.zeros(2, 2, dtype=F64))
    gv = get_method("gradvac")
    gv.weights(j @ j.T, None, torch.Generator().manual_seed(0))
    assert torch.allclose(gv.state_dict()["target"], torch.tensor([[0, 0.3], [0.3, 0]], dtype=F64))


@pytest.mark.parametrize("name", ["mgda_l2", "mgda_loss", "mgda_loss+"])
def test_mgda_normalized_kkt(name):
    j = rand_jacobian(4, 6, seed=1)
    losses = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64)
    w = weights(name, j @ j.T, losses)
    n = {"mgda_l2": j.norm(dim=1), "mgda_loss": losses, "mgda_loss+": losses * j.norm(dim=1)}[name]
    d = w @ j  # min-norm point of the normalised gradients
    dots = (j / n.unsqueeze(1)) @ d
    assert (dots >= d @ d * (1 - 1e-8)).all()
    pi = w * n
    assert torch.isclose(pi.sum(), torch.tensor(1.0, dtype=F64))
    assert torch.allclose(dots[pi > 1e-9], (d @ d).expand(int((pi > 1e-9).sum())), rtol=1e-8)
    raw = weights(name, j @ j.T, losses, apply_to="raw")
    assert torch.allclose(raw, pi)


# ---------------------------------------------------- TorchJD's documented examples


@pytest.mark.parametrize(
    "name,options,expected",
    [
        ("upgrad", {}, [0.2929, 1.9004, 1.9004]),
        ("dualproj", {}, [0.5563, 1.1109, 1.1109]),
        ("cagrad", {"c": 0.5, "rescale": 0}, [0.1835, 1.2041, 1.2041]),
        ("imtl_g", {}, [0.0767, 1.0000, 1.0000]),
        ("aligned_mtl", {"pref_vector": [0.5, 0.5]}, [0.2133, 0.9673, 0.9673]),
        ("config", {}, [0.1588, 2.0706, 2.0706]),
        ("nash_mtl", {}, [0.0542, 0.7061, 0.7061]),
        ("gradvac", {}, [0.5848, 3.8012, 3.8012]),
    ],
)
def test_torchjd_documented_examples(name, options, expected):
    j = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    d = gradbal.aggregate(j, method=name, **options)
    assert torch.allclose(d, torch.tensor(expected), atol=1e-4)


# ------------------------------------------------------- scale and permutations


SCALE_INVARIANT = [
    "upgrad", "dualproj", "cagrad", "imtl_g", "aligned_mtl", "config", "mgda", "pcgrad",
    "mean", "sum",
]


@pytest.mark.parametrize("name", SCALE_INVARIANT)
def test_weights_are_invariant_to_a_global_scale(name):
    g = well_conditioned(5, seed=2)
    w = weights(name, g)
    for s in (1e-6, 1e6):
        assert torch.allclose(weights(name, s * g), w, rtol=1e-7, atol=1e-12)


def test_mgda_l2_direction_is_scale_free():
    g = well_conditioned(5, seed=2)
    w = weights("mgda_l2", g)  # w = pi / ||g||: d = sum pi_k g_k / ||g_k|| does not change
    assert torch.allclose(weights("mgda_l2", 1e6 * g), w / 1e3, rtol=1e-7)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_fair_weights_scaling_law(alpha):
    g = well_conditioned(5, seed=2)
    w = weights("fairgrad", g, alpha=alpha)
    assert torch.allclose(weights("fairgrad", 1e4 * g, alpha=alpha), w * 1e4 ** (-alpha / (1 + alpha)), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(set(GRAM_METHODS) - RANDOM))
def test_permutation_equivariance(name):
    g = well_conditioned(6, seed=5)
    losses = torch.linspace(0.5, 2.0, 6, dtype=F64)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    w = weights(name, g, losses)
    wp = weights(name, g[perm][:, perm], losses[perm])
    assert torch.allclose(wp, w[perm], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", ["imtl_g", "mgda_l2", "config"])
def test_direction_invariant_to_each_objective_scale(name):
    # IMTL-G and MGDA-l2 (and ConFIG's unit vectors) do not depend on the scale of each loss.
    j = rand_jacobian(4, 7, seed=6)
    c = torch.tensor([1e-4, 1.0, 50.0, 2.0], dtype=F64)
    d1 = weights(name, j @ j.T) @ j
    jc = j * c.unsqueeze(1)
    d2 = weights(name, jc @ jc.T) @ jc
    cos = d1 @ d2 / (d1.norm() * d2.norm())
    # Same line; IMTL-G's normalisation sum(w) = 1 may flip its sign (the common projection
    # c of the paper can be negative).
    assert torch.isclose(cos.abs(), torch.tensor(1.0, dtype=F64), atol=1e-10)
    if name != "imtl_g":
        assert cos > 0


# -------------------------------------------------------------------- degenerate


DEGENERATE = degenerate()


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name", GRAM_METHODS)
def test_degenerate_grams_give_finite_weights(name, case):
    gram = DEGENERATE[case]
    w = weights(name, gram)
    assert w.shape == (gram.shape[0],)
    assert torch.isfinite(w).all(), (name, case, w)


@pytest.mark.parametrize("name", sorted(set(GRAM_METHODS) - {"sum", "mean"}))
def test_opposite_gradients_give_a_zero_direction(name):
    # g2 = -g1: no direction improves both; every method documents d = 0.
    g = opposite_pair()
    w = weights(name, g)
    assert torch.isfinite(w).all()
    assert w @ g @ w <= 1e-12 * torch.trace(g)


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "imtl_g", "aligned_mtl", "config"])
def test_equal_rows_get_equal_weights(name):
    # (gradbal.solvers.min_norm_simplex, under "mgda", splits equal rows equally only to
    # ~1e-5: its ridge is 1e-10; the direction is the same either way.)
    g = DEGENERATE["equal_rows"]  # rows 0 and 2 equal
    w = weights(name, g)
    assert torch.isclose(w[0], w[2], rtol=1e-6, atol=1e-9)


def test_zero_gradient_documented_results():
    g = DEGENERATE["zero_row"]  # row 1 is zero
    w = weights("imtl_g", g)  # weight 0; the others solve IMTL-G among themselves
    assert w[1] == 0 and torch.isclose(w.sum(), torch.tensor(1.0, dtype=F64))
    proj = (g @ w)[[0, 2, 3]] / g.diagonal()[[0, 2, 3]].sqrt()
    assert torch.allclose(proj, proj.mean().expand(3))
    assert weights("mgda_l2", g).abs().sum() <= 1e-9  # the hull of the unit gradients holds 0
    d_norm = weights("upgrad", g) @ g @ weights("upgrad", g)
    assert torch.isfinite(d_norm)


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_nan_gram_never_raises(name):
    g = torch.full((3, 3), float("nan"), dtype=F64)
    weights(name, g)  # output may be anything; the optimizer reports non-finite gradients


@pytest.mark.parametrize("name", ["upgrad", "cagrad", "imtl_g", "aligned_mtl", "config", "nash_mtl"])
def test_mixed_scales_k16_documented(name):
    g = DEGENERATE["k16_mixed_scales"]
    w = weights(name, g)
    assert torch.isfinite(w).all()
    if name == "upgrad":
        w0 = weights(name, g, reg_eps=0.0)
        assert (g @ w0 >= -1e-9 * torch.trace(g) * w0.abs().sum()).all()


# ------------------------------------------------------- jacobi path (non-CPU devices)


@pytest.mark.parametrize("name", ["imtl_g", "aligned_mtl", "config"])
def test_jacobi_path_matches_lapack_path(name, monkeypatch):
    g = well_conditioned(7, seed=9)
    ref = weights(name, g)
    import gradbal.solvers_qp as sq

    module = importlib.import_module(f"gradbal.methods.{ {'imtl_g': 'imtl', 'aligned_mtl': 'aligned_mtl', 'config': 'config'}[name] }")
    original = sq.sym_eig
    jacobi = lambda a: original(a, "jacobi")
    monkeypatch.setattr(sq, "sym_eig", jacobi)  # through unit_gram_pinv (imtl_g, config)
    if hasattr(module, "sym_eig"):
        monkeypatch.setattr(module, "sym_eig", jacobi)
    assert torch.allclose(weights(name, g), ref, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------- doctests


@pytest.mark.parametrize(
    "module",
    ["dual_cone", "cagrad", "imtl", "aligned_mtl", "config", "nash_mtl", "fairgrad",
     "gradvac", "random_weighting", "mgda_normalized", "famo", "uw", "dwa", "graddrop",
     "fixed", "pcgrad"],
)
def test_docstring_examples(module):
    mod = importlib.import_module(f"gradbal.methods.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- the optimizer


@pytest.mark.parametrize("name", sorted(set(GRAM_METHODS) | {"rlw", "famo", "mokd_amortized", "uw", "dwa", "graddrop"}))
def test_optimizer_steps_and_checkpoint_roundtrip(name):
    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), method=name, seed=1)
        return model, opt

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def step(model, opt):
        out = model(x)
        losses = [out[:, 0].pow(2).mean() + 0.1, (out[:, 1] - 1).pow(2).mean() + 0.1, out[:, 2].abs().mean() + 0.1]
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
        return opt.last_stats.weights.clone()

    model, opt = build()
    for _ in range(3):
        step(model, opt)
    state = opt.state_dict()
    params = [p.detach().clone() for p in model.parameters()]
    after = [step(model, opt) for _ in range(2)]

    model2, opt2 = build()
    with torch.no_grad():
        for p, q in zip(model2.parameters(), params):
            p.copy_(q)
    opt2.load_state_dict(state)
    again = [step(model2, opt2) for _ in range(2)]
    for a, b in zip(after, again):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["gradvac", "nash_mtl"])
def test_nonfinite_gram_does_not_poison_state(name):
    m = get_method(name, **({"update_weights_every": 1} if name == "nash_mtl" else {}))
    g = well_conditioned(3, seed=1)
    gen = torch.Generator().manual_seed(0)
    m.weights(g, None, gen)
    before = m.state_dict()
    m.weights(torch.full((3, 3), float("nan"), dtype=F64), None, gen)
    after = m.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
    assert torch.isfinite(m.weights(g, None, gen)).all()
