"""gradbal.kernels.gram against its float64 reference (Triton's interpreter on CPU machines).

Tolerance: the kernel's own worst-case bound (gram.gram_error_bound): fp32 accumulation along
the plan's chain length times sum_c |x_i[c] x_j[c]|, nothing loosened. Every K in {2, 3, 5, 8,
16} meets every N in {1, 7, 4097, 100003} and every dtype; all buffers start as NaN/garbage.
"""

from __future__ import annotations

import pytest
import torch

KS = (2, 3, 5, 8, 16)
NS = (1, 7, 4097, 100003)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_gram(gram_mod, rows, g):
    k = rows.shape[0]
    assert g.shape == (k, k) and g.dtype == torch.float64 and g.device == rows.device
    ref = gram_mod.gram_reference(rows)
    bound = gram_mod.gram_error_bound(rows)
    err = (g - ref).abs()
    assert torch.isfinite(g).all()
    assert (err <= bound).all(), f"max err/bound {(err / bound.clamp_min(1e-300)).max():.3g}"
    assert torch.equal(g, g.T), "G must be exactly symmetric"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
def test_gram_matches_reference(k, n, dtype, device, poison, gram_mod, rows_of, bits_of):
    rows = rows_of(k, n, dtype, device)
    g, counts = gram_mod.gram_with_nonfinite(rows)
    _check_gram(gram_mod, rows, g)
    assert counts.dtype == torch.int64 and counts.tolist() == [0] * k
    # The folded count changes nothing, and a second run gives the same bits.
    assert torch.equal(bits_of(gram_mod.gram(rows)), bits_of(g))
    if n <= 4097 or k in (2, 16):
        g2, c2 = gram_mod.gram_with_nonfinite(rows)
        assert torch.equal(bits_of(g2), bits_of(g)) and torch.equal(c2, counts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bound_would_see_a_dropped_tail(dtype, gram_mod, rows_of, device):
    """The tolerance is tight: losing the last (masked, partial) column of a block would
    exceed it, so the reference comparison really checks the tail handling."""
    rows = rows_of(5, 100003, dtype, device)
    last = rows[:, -1:].double()
    assert ((last @ last.T).diagonal() > 10 * gram_mod.gram_error_bound(rows).diagonal()).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("k,n", [(2, 4097), (5, 100003), (16, 7), (3, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_counts(k, n, dtype, device, poison, gram_mod, rows_of):
    rows = rows_of(k, n, dtype, device)
    planted = {0: [(0, float("nan"))], k - 1: [(n - 1, float("inf")), (0, float("-inf"))]}
    if n > 2 and k > 2:
        planted[1] = [(n // 2, float("nan")), (n - 1, float("nan")), (1, float("inf"))]
    for r, entries in planted.items():
        for c, v in entries:
            rows[r, c] = v
    g, counts = gram_mod.gram_with_nonfinite(rows)
    assert torch.equal(counts, gram_mod.nonfinite_reference(rows))
    bad = counts > 0
    # An entry touching a poisoned row is non-finite; the clean block is still accurate.
    assert torch.equal(~torch.isfinite(g), bad[:, None] | bad[None, :])
    clean = (~bad).nonzero().flatten()
    if clean.numel():
        sub = rows[clean]
        assert (
            (g[clean][:, clean] - gram_mod.gram_reference(sub)).abs()
            <= gram_mod.gram_error_bound(sub)
        ).all()


@pytest.mark.parametrize(
    "k,dtype",
    [(1, torch.float32), (17, torch.float32), (33, torch.bfloat16), (9, torch.float16)],
    ids=str,
)
def test_other_k_and_dot_path(k, dtype, device, poison, gram_mod, rows_of):
    """K = 1, K above the fma limit (tl.dot path, fp32 and 16-bit) and K > 16."""
    rows = rows_of(k, 4097, dtype, device)
    plan = gram_mod.plan_gram(k, 4097, dtype, rows)
    assert plan.use_dot == (k > (16 if dtype == torch.float32 else 8))
    _check_gram(gram_mod, rows, gram_mod.gram(rows))


def test_empty_and_strided_rows(device, poison, gram_mod, rows_of):
    g = gram_mod.gram(torch.zeros(3, 0, device=device))
    assert torch.equal(g, torch.zeros(3, 3, dtype=torch.float64, device=device))
    # Rows of a wider store (row stride > N): only the first N columns count.
    store = rows_of(4, 5000, torch.bfloat16, device)
    view = store[:, :4097]
    assert view.stride(0) == 5000
    _check_gram(gram_mod, view, gram_mod.gram(view))


def test_rejects_bad_input(device, gram_mod):
    with pytest.raises(ValueError):
        gram_mod.gram(torch.zeros(2, 8, device=device)[:, ::2])
    with pytest.raises(TypeError):
        gram_mod.gram(torch.zeros(2, 8, dtype=torch.float64, device=device))
    with pytest.raises(ValueError):
        gram_mod.gram(torch.zeros(8, device=device))
    with pytest.raises(ValueError):
        gram_mod.gram(torch.zeros(gram_mod.MAX_K + 1, 8, device=device))
