"""Properties of the core methods (sum, mean, weighted, mokd, mgda, pcgrad) in fp64."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gradbal
from gradbal.methods import MoKD, PCGrad

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


def rows_strategy(k, n):
    return st.lists(st.lists(finite, min_size=n, max_size=n), min_size=k, max_size=k).map(
        lambda v: torch.tensor(v, dtype=torch.float64)
    )


def test_available_methods_lists_core():
    assert {"sum", "mean", "weighted", "mokd", "mgda", "pcgrad"} <= set(gradbal.available_methods())


def test_fixed_weightings():
    g = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(gradbal.aggregate(g, "sum"), g.sum(0))
    torch.testing.assert_close(gradbal.aggregate(g, "mean"), g.mean(0))
    torch.testing.assert_close(
        gradbal.aggregate(g, "weighted", weights=[0.5, 0.25, 2.0]),
        0.5 * g[0] + 0.25 * g[1] + 2.0 * g[2],
    )
    with pytest.raises(ValueError, match="one weight per loss"):
        gradbal.aggregate(g, "weighted", weights=[1.0, 2.0])


def test_method_object_and_unknown_name():
    g = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(gradbal.aggregate(g, PCGrad(reduction="mean"), generator=torch.Generator().manual_seed(0)),
                               gradbal.aggregate(g, "pcgrad", reduction="mean", generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="unknown method 'nope'.*available"):
        gradbal.aggregate(g, "nope")
    with pytest.raises(TypeError, match="bad options for method 'mgda'"):
        gradbal.aggregate(g, "mgda", bogus=1)


# ----------------------------------------------------------------------------- MoKD
def mokd_parts(rows, losses):
    h = rows / losses.unsqueeze(1)
    d = gradbal.aggregate(rows, MoKD(magnitude="faithful"), losses=losses)
    return h, d


@given(rows=rows_strategy(2, 6), losses=st.lists(st.floats(0.05, 20), min_size=2, max_size=2))
@settings(max_examples=80, deadline=None)
def test_mokd_k2_properties(rows, losses):
    losses = torch.tensor(losses, dtype=torch.float64)
    h, d = mokd_parts(rows, losses)
    n1, n2 = h.norm(dim=1)
    assume(n1 > 1e-3 and n2 > 1e-3)
    dd = d @ d
    # ||d|| <= min ||h_k|| (d is the min-norm point of a hull containing both h_k).
    assert d.norm() <= torch.minimum(n1, n2) * (1 + 1e-9) + 1e-12
    # No conflict: <d, h_k> >= ||d||^2 >= 0 for both objectives.
    dots = h @ d
    assert torch.all(dots >= dd - 1e-9 * (n1 * n2 + 1))
    # Interior case: equal contribution <d, h_1> = <d, h_2> = ||d||^2.
    pi1 = (h[1] @ (h[1] - h[0])) / ((h[0] - h[1]) @ (h[0] - h[1]))
    if 1e-6 < pi1 < 1 - 1e-6:
        torch.testing.assert_close(dots, torch.stack([dd, dd]), rtol=1e-7, atol=1e-9 * (n1 * n2 + 1))


def test_mokd_closed_form_k2_matches_formula():
    rows = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 1.0]], dtype=torch.float64)
    losses = torch.tensor([2.0, 0.5], dtype=torch.float64)
    h = rows / losses.unsqueeze(1)
    hh = h @ h.T
    pi1 = ((hh[1, 1] - hh[0, 1]) / (hh[0, 0] + hh[1, 1] - 2 * hh[0, 1])).clamp(0, 1)
    expected = pi1 * h[0] + (1 - pi1) * h[1]
    torch.testing.assert_close(mokd_parts(rows, losses)[1], expected)
    # Default magnitude rescales by the mean loss.
    torch.testing.assert_close(
        gradbal.aggregate(rows, "mokd", losses=losses), expected * losses.mean()
    )


def test_mokd_opposite_gradients_give_zero():
    rows = torch.tensor([[1.0, -2.0], [-1.0, 2.0]], dtype=torch.float64)
    losses = torch.tensor([1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(mokd_parts(rows, losses)[1], torch.zeros(2, dtype=torch.float64))


def test_mokd_equal_log_gradients_split_evenly():
    rows = torch.tensor([[2.0, 4.0], [1.0, 2.0]], dtype=torch.float64)
    losses = torch.tensor([2.0, 1.0], dtype=torch.float64)  # h_1 = h_2
    m = MoKD(magnitude="faithful")
    gram = rows @ rows.T
    torch.testing.assert_close(m.weights(gram, losses), torch.tensor([0.25, 0.5], dtype=torch.float64))


def test_mokd_zero_loss_stays_finite():
    """fp32 cross-entropy underflows to exactly 0 on a memorised batch: the gradient is 0 too."""
    rows = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.1, 0.2]], dtype=torch.float64)
    losses = torch.tensor([0.0, 0.7], dtype=torch.float64)
    for magnitude in ("faithful", "mean_loss"):
        d = gradbal.aggregate(rows, "mokd", losses=losses, magnitude=magnitude)
        assert torch.isfinite(d).all()
    # Both losses zero, both gradients zero: still finite.
    d = gradbal.aggregate(torch.zeros(2, 3), "mokd", losses=torch.zeros(2))
    assert torch.isfinite(d).all()


def test_mokd_max_norm_clips_through_weights():
    rows = torch.randn(3, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    losses = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    free = gradbal.aggregate(rows, "mokd", losses=losses, magnitude="faithful")
    clipped = gradbal.aggregate(rows, "mokd", losses=losses, magnitude="faithful", max_norm=1e-3)
    assert free.norm() > 1e-3
    torch.testing.assert_close(clipped.norm(), torch.tensor(1e-3, dtype=torch.float64))
    torch.testing.assert_close(clipped / clipped.norm(), free / free.norm())


def test_mokd_k3_min_norm_of_log_gradients():
    """K > 2 uses the device solver: d is the min-norm point of the hull of h_k (KKT)."""
    gen = torch.Generator().manual_seed(4)
    rows = torch.randn(3, 8, dtype=torch.float64, generator=gen)
    losses = torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64)
    h, d = mokd_parts(rows, losses)
    dots = h @ d
    assert torch.all(dots >= d @ d - 1e-9)


def test_mokd_rejects_negative_loss_in_aggregate():
    with pytest.raises(ValueError, match="needs losses >= 0"):
        gradbal.aggregate(torch.randn(2, 3), "mokd", losses=[-1.0, 1.0])
    # Without log scaling signed losses are fine and MoKD reduces to MGDA.
    g = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(
        gradbal.aggregate(g, "mokd", losses=[-1.0, 1.0], log_scale=False), gradbal.aggregate(g, "mgda")
    )


# ----------------------------------------------------------------------------- MGDA
@given(rows=rows_strategy(3, 5))
@settings(max_examples=60, deadline=None)
def test_mgda_kkt(rows):
    gram = rows @ rows.T
    w = gradbal.get_method("mgda").weights(gram, None)
    d = gradbal.aggregate(rows, "mgda")
    torch.testing.assert_close(d, w @ rows)
    scale = gram.diagonal().max() + 1e-30
    dots = rows @ d
    assert torch.all(w >= 0) and abs(w.sum() - 1) < 1e-9
    assert torch.all(dots >= d @ d - 1e-7 * scale)
    active = w > 1e-6
    assert torch.all((dots[active] - d @ d).abs() <= 1e-7 * scale)


# ----------------------------------------------------------------------------- PCGrad
def pcgrad_reference(rows, orders):
    """Yu et al. 2020, Algorithm 1, on explicit vectors (no Gram tricks)."""
    projected = []
    for i, order in enumerate(orders):
        gi = rows[i].clone()
        for j in order:
            dot = gi @ rows[j]
            if dot < 0:
                gi = gi - dot / (rows[j] @ rows[j]) * rows[j]
        projected.append(gi)
    return torch.stack(projected).sum(0)


@given(rows=rows_strategy(2, 4))
@settings(max_examples=80, deadline=None)
def test_pcgrad_k2_matches_paper(rows):
    assume(bool((rows.norm(dim=1) > 1e-3).all()))
    d = gradbal.aggregate(rows, "pcgrad", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d, pcgrad_reference(rows, [[1], [0]]), rtol=1e-9, atol=1e-9)


def test_pcgrad_k4_matches_reference_with_same_orders():
    rows = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(11)
    keys = torch.rand(4, 4, generator=gen, dtype=torch.float64)
    keys.fill_diagonal_(2.0)
    orders = keys.argsort(dim=1)[:, :3].tolist()
    d = gradbal.aggregate(rows, "pcgrad", generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(d, pcgrad_reference(rows, orders))


def test_pcgrad_order_follows_generator():
    rows = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = gradbal.aggregate(rows, "pcgrad", generator=torch.Generator().manual_seed(5))
    b = gradbal.aggregate(rows, "pcgrad", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["mokd", "pcgrad", "gradvac", "graddrop", "mean"])
def test_aggregate_out_writes_the_same_result(method):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 11, generator=gen)
    losses = [1.0, 0.5, 2.0]
    ref = gradbal.aggregate(g, method, losses=losses, generator=torch.Generator().manual_seed(1))
    buf = torch.full((4, 11), float("nan"))  # a spare row of a larger buffer is fine
    buf[:3] = g
    got = gradbal.aggregate(
        buf[:3], method, losses=losses, generator=torch.Generator().manual_seed(1), out=buf[3]
    )
    assert got.data_ptr() == buf[3].data_ptr()
    torch.testing.assert_close(buf[3], ref, rtol=0, atol=0)


def test_aggregate_bad_out_is_refused_and_changes_nothing():
    g = torch.randn(3, 5, dtype=torch.float64)
    method = gradbal.get_method("gradvac")  # stateful: its targets must not move
    gradbal.aggregate(g, method, generator=torch.Generator().manual_seed(0))
    state = method.state_dict()["target"].clone()
    bad = {
        "shape": torch.zeros(4, dtype=torch.float64),
        "dtype": torch.zeros(5, dtype=torch.float32),
        "contiguous": torch.zeros(10, dtype=torch.float64)[::2],
        "shares memory": g[1],
    }
    for problem, out in bad.items():
        before = out.clone()
        with pytest.raises(ValueError, match=problem.split()[0]):
            gradbal.aggregate(g, method, generator=torch.Generator().manual_seed(1), out=out)
        torch.testing.assert_close(out, before, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(method.state_dict()["target"], state, rtol=0, atol=0)
    with pytest.raises(TypeError, match="out must be a tensor"):
        gradbal.aggregate(g, "mean", out=[0.0] * 5)
