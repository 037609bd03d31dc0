"""gradbal.kernels.combine against its float64 reference (Triton's interpreter on CPU machines).

Tolerance: the kernel's worst-case bound (combine.combine_error_bound): fp32 arithmetic over
the K terms, scale and accumulate, plus one rounding to the output dtype. Outputs are NaN
before every run that overwrites them.
"""

from __future__ import annotations

import pytest
import torch

KS = (2, 3, 5, 8, 16)
NS = (1, 7, 4097, 100003)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _weights(k, device, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed + k)
    return torch.randn(k, generator=g, dtype=torch.float64).to(dtype).to(device)


def _check(combine_mod, rows, w, out, out_before=None, accumulate=False, scale=None):
    ref = combine_mod.combine_reference(rows, w, out_before, accumulate, scale)
    bound = combine_mod.combine_error_bound(rows, w, out.dtype, out_before, accumulate, scale)
    err = (out.double() - ref).abs()
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max():.3g}"


# Every (K, N, dtype) cell would be 60 runs; every K meets every N and every dtype meets every
# K and every N in this thinner product.
CASES = [(k, n, DTYPES[(i + j) % 3]) for i, k in enumerate(KS) for j, n in enumerate(NS)]


@pytest.mark.parametrize("k,n,dtype", CASES, ids=str)
def test_combine_matches_reference(k, n, dtype, device, poison, combine_mod, rows_of, bits_of):
    rows = rows_of(k, n, dtype, device)
    w = _weights(k, device)
    out = torch.full((n,), float("nan"), dtype=dtype, device=device)
    assert combine_mod.combine(rows, w, out) is out
    _check(combine_mod, rows, w, out)
    again = torch.full_like(out, float("nan"))
    combine_mod.combine(rows, w, again)
    assert torch.equal(bits_of(again), bits_of(out))


@pytest.mark.parametrize("k,n,dtype", CASES[::2], ids=str)
def test_combine_accumulate(k, n, dtype, device, combine_mod, rows_of):
    rows = rows_of(k, n, dtype, device)
    w = _weights(k, device, dtype=torch.float32)
    out = rows_of(1, n, dtype, device, seed=7)[0]
    before = out.clone()
    combine_mod.combine(rows, w, out, accumulate=True)
    _check(combine_mod, rows, w, out, before, accumulate=True)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize(
    "k,n,dtype",
    [
        (2, 100003, torch.bfloat16),
        (5, 4097, torch.float32),
        (16, 7, torch.float16),
        (3, 1, torch.float32),
    ],
    ids=str,
)
def test_combine_in_place_into_a_row(k, n, dtype, accumulate, device, combine_mod, rows_of):
    """out = rows[j]: the update lands in the store itself (every column is read before it is
    written, so the result equals the out-of-place one)."""
    store = rows_of(k, n, dtype, device)
    w = _weights(k, device)
    j = k // 2
    before = store.clone()
    expected = combine_mod.combine(before, w, before[j].clone(), accumulate=accumulate)
    out = store[j]
    combine_mod.combine(store, w, out, accumulate=accumulate)
    assert out.data_ptr() == store[j].data_ptr()
    assert torch.equal(store[j], expected)
    others = [i for i in range(k) if i != j]
    assert torch.equal(store[others], before[others])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combine_scale_and_cast(dtype, device, poison, combine_mod, rows_of):
    """Scale folded in (python float or device tensor), fp32 out from 16-bit rows and back."""
    rows = rows_of(4, 4097, dtype, device)
    w = _weights(4, device, dtype=torch.bfloat16)
    for scale in (0.37, torch.tensor(2.5, dtype=torch.float64, device=device)):
        for out_dtype in (torch.float32, dtype):
            out = torch.full((4097,), float("nan"), dtype=out_dtype, device=device)
            combine_mod.combine(rows, w, out, scale=scale)
            _check(combine_mod, rows, w, out, scale=scale)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_store_rounds_to_nearest_even(device, combine_mod):
    """fp32 -> bf16/fp16 on store rounds like torch (to nearest, ties to even)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4097, generator=g) * torch.logspace(-30, 30, 4097)
    x[0, :4] = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.0e38, float("nan")])
    x = x.to(device)
    one = torch.ones(1, device=device)
    for dtype in (torch.bfloat16, torch.float16):
        out = torch.empty(4097, dtype=dtype, device=device)
        combine_mod.combine(x, one, out)
        assert torch.equal(out[4:], x[0, 4:].to(dtype))
        assert torch.equal(out[:3], x[0, :3].to(dtype)) and out[3].isnan()


def test_combine_rejects_unsafe_or_bad_input(device, combine_mod):
    rows = torch.zeros(3, 64, device=device)
    w = torch.ones(3, device=device)
    flat = rows.view(-1)
    with pytest.raises(ValueError, match="overlaps"):
        combine_mod.combine(rows, w, flat[5:69])  # a shifted view of the store
    wide = torch.zeros(1, 80, device=device)
    with pytest.raises(ValueError, match="overlaps"):
        combine_mod.combine(wide[:, :64], w[:1], wide[0, 3:67])  # K = 1, shifted in its row
    with pytest.raises(ValueError, match="overlaps"):
        combine_mod.combine(rows, w, flat.view(torch.bfloat16)[:64])  # the store, retyped
    combine_mod.combine(wide[:, :64], w[:1], wide[0, :64])  # K = 1, in place: fine
    with pytest.raises(ValueError):
        combine_mod.combine(rows, torch.ones(2, device=device), torch.empty(64, device=device))
    with pytest.raises(ValueError):
        combine_mod.combine(rows, w, torch.empty(63, device=device))
    with pytest.raises(ValueError):
        combine_mod.combine(rows, w, torch.empty(128, device=device)[::2])
