"""K = 2 closed forms of PCGrad, GradVac and Nash-MTL: against the general path (the K - 1
rounds, forced to K = 2: the same bits) and against the papers' formulas written plainly in
numpy on the Gram entries (1e-12 relative), over the stress pairs of ``_grams.stress_pairs``
as fp64 Gram matrices and as fp32 ones (which may miss PSD)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradbal.methods import get_method
from gradbal.methods.gradvac import GradVac
from gradbal.methods.pcgrad import PCGrad
from gradbal.solvers_qp import fair_weights

from ._grams import F64, PAIR_KINDS, stress_pairs

#: The only order at K = 2: each objective has one other.
ORDER = torch.tensor([[1], [0]])
PAIRS = stress_pairs(400)
GRAMS = [j @ j.T for j in PAIRS] + [(j @ j.T).float().double() for j in PAIRS[::4]]
NONFINITE = [
    torch.full((2, 2), float("nan"), dtype=F64),
    torch.tensor([[float("inf"), 1.0], [1.0, 2.0]], dtype=F64),  # a squared norm overflowed
    torch.tensor([[1.0, -2.0], [-2.0, float("inf")]], dtype=F64),
    torch.tensor([[1.0, float("-inf")], [float("-inf"), 2.0]], dtype=F64),
    torch.tensor([[1.0, float("nan")], [0.5, 2.0]], dtype=F64),
]


def _sqrt(x: float) -> float:
    """torch's fp64 sqrt on the CPU (the methods' own): it is not always correctly rounded
    (about 1% of arguments are 0.5+ ulp off, unlike math.sqrt), and nearly opposite pairs
    amplify an ulp in a norm by up to ~1e6 through ``1 - cos^2``."""
    return torch.tensor(x, dtype=F64).sqrt().item()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _after_draws(seed: int, count: int = 1) -> torch.Tensor:
    """The generator's state after ``count`` draws of the K = 2 orders' keys."""
    gen = _gen(seed)
    for _ in range(count):
        torch.rand(2, 2, generator=gen, dtype=F64)
    return gen.get_state()


def test_stress_pairs_cover_the_kinds():
    assert len(PAIRS) == 400 and len(PAIR_KINDS) == 10
    norms = torch.stack([j.norm(dim=1) for j in PAIRS])
    cos = torch.stack([(j[0] @ j[1]) / (j[0].norm() * j[1].norm()) for j in PAIRS]).view(40, 10)
    for kind, want in (("parallel", 1.0), ("opposite", -1.0), ("nearly_opposite", -1.0),
                       ("orthogonal", 0.0), ("nearly_parallel", 1.0)):
        got = cos[:, PAIR_KINDS.index(kind)]
        assert torch.allclose(got, torch.full_like(got, want), atol=1e-7), kind
    assert (cos[:, 3] > -1).any()  # nearly, not exactly, opposite
    assert (norms[4::10, 0] == 0).all() and (norms[5::10] == 0).all()
    assert ((norms[6::10, 1] / norms[6::10, 0]).log10() < -9).all()
    assert ((norms[7::10, 0] / norms[7::10, 1]).log10() < -9).all()


# ---------------------------------------------------------------------------- PCGrad


def _pcgrad_rounds(monkeypatch):
    monkeypatch.setattr(PCGrad, "_pair", staticmethod(lambda gram, inv: PCGrad._rounds(gram, inv, ORDER)))


def pcgrad_numpy(g: np.ndarray) -> np.ndarray:
    """Yu et al. 2020, Alg. 1 at K = 2 on the Gram entries: ``g_i' = g_i - min(0, <g_i, g_j>)
    / ||g_j||^2 g_j`` (no projection on a zero g_j); ``w`` = column sums of the coefficients."""
    coef = np.eye(2)
    for i, j in ((0, 1), (1, 0)):
        if g[i, j] < 0 and g[j, j] > 0:
            coef[i, j] -= g[i, j] / g[j, j]
    return coef.sum(0)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pcgrad_k2_closed_form_is_the_rounds(dtype, reduction, monkeypatch):
    m = get_method("pcgrad", reduction=reduction)
    closed = [m.weights(g.to(dtype), None, _gen(s)) for s, g in enumerate(GRAMS)]
    _pcgrad_rounds(monkeypatch)
    for s, (g, w) in enumerate(zip(GRAMS, closed)):
        gen = _gen(s)
        ref = m.weights(g.to(dtype), None, gen)
        assert w.dtype == ref.dtype and torch.equal(w, ref), (s, w, ref)
        # The forced order is still drawn: the generator advances as at every K.
        assert torch.equal(gen.get_state(), _after_draws(s))


def test_pcgrad_k2_matches_the_paper():
    m = get_method("pcgrad")
    for s, j in enumerate(PAIRS):
        g = j @ j.T
        w = m.weights(g, None, _gen(s))
        np.testing.assert_allclose(w.numpy(), pcgrad_numpy(g.numpy()), rtol=1e-12, atol=0)
        # On the vectors: the projected gradients' sum.
        rows = j.numpy()
        d = rows.sum(0)
        for i, k in ((0, 1), (1, 0)):
            dot = rows[i] @ rows[k]
            if dot < 0 and rows[k] @ rows[k] > 0:
                d = d - dot / (rows[k] @ rows[k]) * rows[k]
        scale = 1e-12 * (w.abs().numpy() @ np.linalg.norm(rows, axis=1))
        assert np.abs((w @ j).numpy() - d).max() <= scale, s


def _orders(gen: torch.Generator, k: int) -> np.ndarray:
    """The orders the methods draw (without advancing ``gen``)."""
    state = gen.get_state()
    keys = torch.rand(k, k, generator=gen, dtype=F64)
    gen.set_state(state)
    keys.fill_diagonal_(2.0)
    return keys.argsort(dim=1)[:, : k - 1].numpy()


def _rows(k: int, seed: int) -> torch.Tensor:
    """Random rows; for seed % 3 == 1 row 2 is -row 1 / 2, for 2 norms 12 decades apart."""
    rows = torch.randn(k, k + 3, generator=_gen(seed), dtype=F64)
    if seed % 3 == 1:
        rows[1] = -rows[0] * 0.5
    elif seed % 3 == 2:
        rows = rows * torch.logspace(-6, 6, k, dtype=F64).unsqueeze(1)
    return rows


@pytest.mark.parametrize("k", [3, 4, 5])
def test_pcgrad_rounds_match_the_paper(k):
    """The general path (K >= 3) against Alg. 1 written plainly, one objective at a time in the
    order drawn from the same generator, on coefficient rows."""
    for seed in range(9):
        g = _rows(k, seed) @ _rows(k, seed).T
        gen = _gen(seed)
        orders = _orders(gen, k)
        w = get_method("pcgrad").weights(g, None, gen).numpy()
        gn, coef = g.numpy(), np.eye(k)
        for i in range(k):
            for j in orders[i]:
                dot = (coef[i] @ gn)[j]
                if dot < 0 and gn[j, j] > 0:
                    coef[i, j] -= dot / gn[j, j]
        np.testing.assert_allclose(w, coef.sum(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_pcgrad_subnormal_norm_is_not_projected_on(k):
    """A gradient whose squared norm is subnormal (||g|| < 1.5e-154) counts as zero: its
    reciprocal overflows, and w was inf (w_1 = 1 + 1e-160 / 1e-320). The weights stay
    finite and the other gradients are left as they are, as for a zero gradient."""
    g = torch.eye(k, dtype=F64)
    g[0, 0], g[0, 1], g[1, 0] = 1e-320, -1e-160, -1e-160
    w = get_method("pcgrad").weights(g, None, _gen(1))
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.ones(k, dtype=F64), rtol=0, atol=0)  # no pair conflicts above 0


# ---------------------------------------------------------------------------- GradVac


def _gradvac_rounds(monkeypatch):
    monkeypatch.setattr(
        GradVac, "_pair", lambda self, g, target, norms, finite: self._rounds(g, target, norms, finite, ORDER)
    )


def gradvac_numpy(g: np.ndarray, target: np.ndarray, beta: float, eps: float, on_conflict: bool):
    """Wang et al. 2021, Alg. 1 at K = 2 on the Gram entries, one step: weights and targets."""
    w, new = np.ones(2), target.copy()
    for i, j in ((0, 1), (1, 0)):
        n_i, n_j = _sqrt(max(g[i, i], 0.0)), _sqrt(max(g[j, j], 0.0))
        phi, hat = g[i, j] / (n_i * n_j + eps), target[i, j]
        sqrt_phi, sqrt_hat = _sqrt(max(1 - phi * phi, 0.0)), _sqrt(max(1 - hat * hat, 0.0))
        if phi < hat:  # g_i' = g_i + step g_j: weight of g_j
            w[j] += n_i * (hat * sqrt_phi - phi * sqrt_hat) / (n_j * sqrt_hat + eps)
        ema = (1 - beta) * hat + beta * phi
        # A NaN cosine (eps = 0 and a zero gradient) leaves the target.
        if (not on_conflict or phi < hat) and math.isfinite(ema):
            new[i, j] = ema
    return w, new


GRADVAC_OPTIONS = [
    {},
    {"ema_update": "on_conflict"},
    {"beta": 0.1, "eps": 0.0},
    {"beta": 1.0, "eps": 1e-3},
]


def _sequences(steps: int = 8):
    """Consecutive steps over the stress pairs, a non-finite Gram matrix inside some."""
    grams = list(GRAMS)
    for s, bad in enumerate(NONFINITE):
        grams.insert(8 * (3 * s + 1) + 3, bad)
    return [grams[i : i + steps] for i in range(0, len(grams), steps)]


@pytest.mark.parametrize("options", GRADVAC_OPTIONS)
def test_gradvac_k2_closed_form_is_the_rounds(options, monkeypatch):
    def run():
        out = []
        for s, seq in enumerate(_sequences()):
            m, gen = get_method("gradvac", **options), _gen(s)
            for g in seq:
                out.append((m.weights(g, None, gen), m.state_dict()["target"], gen.get_state()))
        return out

    closed = run()
    _gradvac_rounds(monkeypatch)
    for n, (a, b) in enumerate(zip(closed, run(), strict=True)):
        assert torch.equal(a[0], b[0]), (n, a[0], b[0])
        assert torch.equal(a[1], b[1]), (n, a[1], b[1])
        assert torch.equal(a[2], b[2])


@pytest.mark.parametrize("options", GRADVAC_OPTIONS)
def test_gradvac_k2_matches_the_paper(options):
    beta, eps = options.get("beta", 0.5), options.get("eps", 1e-8)
    on_conflict = options.get("ema_update") == "on_conflict"
    for s, seq in enumerate(_sequences()):
        m, gen, target = get_method("gradvac", **options), _gen(s), np.zeros((2, 2))
        for g in seq:
            w = m.weights(g, None, gen)
            if not torch.isfinite(g).all():
                assert torch.equal(w, torch.ones(2, dtype=F64))  # nothing conflicts
                assert np.array_equal(m.state_dict()["target"].numpy(), target)
                continue
            with np.errstate(invalid="ignore"):  # eps = 0 and a zero gradient: 0 / 0
                w_ref, target = gradvac_numpy(g.numpy(), target, beta, eps, on_conflict)
            np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-12, atol=0)
            np.testing.assert_allclose(m.state_dict()["target"].numpy(), target, rtol=1e-12, atol=0)
        assert m.state_dict()["target"].diagonal().eq(0).all()


def test_gradvac_k2_nonfinite_gram_leaves_the_targets():
    # An infinite squared norm next to a finite inner product gives a finite cosine (0): the
    # targets must not move all the same.
    g = PAIRS[0] @ PAIRS[0].T
    for bad in NONFINITE:
        m, gen = get_method("gradvac"), _gen(0)
        m.weights(g, None, gen)
        before = m.state_dict()["target"]
        assert torch.equal(m.weights(bad, None, gen), torch.ones(2, dtype=F64))
        assert torch.equal(m.state_dict()["target"], before)
        assert torch.equal(gen.get_state(), _after_draws(0, 2))


@pytest.mark.parametrize("k", [3, 4, 5])
def test_gradvac_rounds_match_the_paper(k):
    """The general path (K >= 3) against Alg. 1 written plainly, one objective at a time in the
    order drawn from the same generator, on coefficient rows, over consecutive steps."""
    for seed in range(6):
        rows = _rows(k, seed)
        m, gen, target = get_method("gradvac", beta=0.3), _gen(seed), np.zeros((k, k))
        for step in range(4):
            g = (rows * (1 + 0.3 * step * torch.arange(k, dtype=F64)).unsqueeze(1)) @ rows.T
            orders = _orders(gen, k)
            w = m.weights(g, None, gen).numpy()
            gn, coef, new = g.numpy(), np.eye(k), target.copy()
            norms = [_sqrt(max(x, 0.0)) for x in np.diag(gn)]
            for i in range(k):
                for j in orders[i]:
                    c = coef[i]
                    n_i = _sqrt(max(c @ gn @ c, 0.0))
                    phi, hat = (c @ gn)[j] / (n_i * norms[j] + 1e-8), target[i, j]
                    s_phi, s_hat = _sqrt(max(1 - phi * phi, 0.0)), _sqrt(max(1 - hat * hat, 0.0))
                    if phi < hat:
                        coef[i, j] += n_i * (hat * s_phi - phi * s_hat) / (norms[j] * s_hat + 1e-8)
                    new[i, j] = (1 - 0.3) * hat + 0.3 * phi
            target = new
            np.testing.assert_allclose(w, coef.sum(0), rtol=1e-12, atol=0)
            # With g_2 = -g_1 / 2, g_1' = c g_1 with c from cancelling terms: its cosines carry
            # ~1e-8 of that (C G in another summation order), not the method's error. The
            # reference goes on from the method's targets.
            got = m.state_dict()["target"].numpy()
            np.testing.assert_allclose(got, target, rtol=1e-12, atol=1e-7 if seed % 3 == 1 else 0)
            target = got


# --------------------------------------------------------------------------- Nash-MTL


def nash_numpy(g: np.ndarray, ridge: float = 1e-8) -> np.ndarray:
    """Navon et al. 2022's ``G a = 1 / a`` at K = 2 with gradbal's normalisation and ridge
    (:func:`gradbal.solvers_qp.fair_weights`): ``G_r = sym(G) / s + ridge I``, ``s = tr(G) / 2``
    (1 for a zero matrix), ``a = s^(-1/2) / (n_i sqrt(max(1 + cos, ridge)))`` with ``n_i`` and
    ``cos`` those of ``G_r``."""
    g = np.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    tr = g[0, 0] + g[1, 1]
    s = tr / 2 if tr > 0 else 1.0
    gr = 0.5 * ((g + g.T) / s) + ridge * np.eye(2)
    n = np.array([_sqrt(gr[0, 0]), _sqrt(gr[1, 1])])
    cos = gr[0, 1] / (n[0] * n[1])
    return 1 / _sqrt(s) / (n * _sqrt(max(1 + cos, ridge)))


def test_nash_k2_closed_form_matches_numpy_and_solves_the_equation():
    for s, g in enumerate(GRAMS):
        a = fair_weights(g, 1.0)
        np.testing.assert_allclose(a.numpy(), nash_numpy(g.numpy()), rtol=1e-12, atol=0)
        w = get_method("nash_mtl", max_norm=0.0).weights(g, None, None)
        assert torch.equal(w, a)
        cos = g[0, 1] / (g[0, 0] * g[1, 1]).sqrt()
        if s < len(PAIRS) and PAIR_KINDS[s % len(PAIR_KINDS)] in ("random", "orthogonal") and cos.abs() < 0.9:
            # The defining equation a_i ((G + ridge s I) a)_i = 1 (well conditioned here).
            shifted = g + 1e-8 * torch.trace(g) / 2 * torch.eye(2, dtype=F64)
            assert (a * (shifted @ a) - 1).abs().max() <= 1e-12, s


def _clip_as_written(alpha: torch.Tensor, q: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Official code: ``alpha * min(1, max_norm / ||d||)``, ``||d|| = sqrt(alpha^T G alpha)``."""
    norm = torch.sqrt(q.clamp_min(0))
    return alpha * torch.clamp(max_norm / norm.clamp_min(1e-300), max=1.0)


@pytest.mark.parametrize("max_norm", [1.0, 0.5, 3.0, 49.0])
def test_nash_clip_is_the_official_one(max_norm):
    for s, g in enumerate(GRAMS):
        alpha = fair_weights(g, 1.0)
        q = float(alpha @ g @ alpha)
        fresh = get_method("nash_mtl", max_norm=max_norm).weights(g, None, None)
        assert torch.equal(fresh, _clip_as_written(alpha, alpha @ g @ alpha, max_norm)), s
        # Reused alpha (update_weights_every) on multiples of G: ||d||^2 from 0 to 1e100,
        # at and around max_norm^2.
        for c in (0.0, 1e-300, 1e-8, 0.3, 1.0, 7.0, 1e8, 1e100) + (
            (max_norm**2 / q, max_norm**2 / q * (1 + 2**-52), max_norm**2 / q * (1 - 2**-52)) if q > 0 else ()
        ):
            m = get_method("nash_mtl", max_norm=max_norm, update_weights_every=2)
            m.load_state_dict({"step": 1, "alpha": alpha})
            gc = g * c
            w = m.weights(gc, None, None)
            assert torch.equal(w, _clip_as_written(alpha, alpha @ gc @ alpha, max_norm)), (s, c)


def test_nash_k2_nonfinite_gram_keeps_alpha():
    g = PAIRS[0] @ PAIRS[0].T
    for bad in NONFINITE:
        m = get_method("nash_mtl")
        m.weights(g, None, None)
        before = m.state_dict()
        m.weights(bad, None, None)
        after = m.state_dict()
        assert torch.equal(after["alpha"], before["alpha"]) and after["step"] == before["step"] + 1
        assert torch.equal(m.weights(g, None, None), get_method("nash_mtl").weights(g, None, None))
