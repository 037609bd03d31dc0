"""Property test: for random shapes, dtypes and per-row magnitudes, gram and combine stay within
their stated worst-case bounds, and combine is consistent with gram (||sum_k w_k g_k||^2 =
w^T G w, up to both bounds)."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    k=st.integers(1, 20),
    n=st.integers(0, 3000),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    log_scales=st.lists(st.integers(-6, 6), min_size=20, max_size=20),
    seed=st.integers(0, 2**16),
)
def test_gram_and_combine_within_bounds(
    k, n, dtype, log_scales, seed, device, gram_mod, combine_mod
):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([2.0**s for s in log_scales[:k]], dtype=torch.float64)[:, None]
    rows = (torch.randn(k, n, generator=g, dtype=torch.float64) * scales).to(dtype).to(device)
    gm = gram_mod.gram(rows)
    assert ((gm - gram_mod.gram_reference(rows)).abs() <= gram_mod.gram_error_bound(rows)).all()

    w = torch.randn(k, generator=g, dtype=torch.float64).to(device)
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    combine_mod.combine(rows, w, out)
    ref = combine_mod.combine_reference(rows, w)
    assert (
        (out.double() - ref).abs() <= combine_mod.combine_error_bound(rows, w, torch.float32)
    ).all()
    # <d, d> from the combined row vs w^T G w from the Gram pass: |d_c - d*_c| <= gamma T_c
    # with T = |w|^T |rows|, so the squares differ by <= (2 gamma + gamma^2) T.T; the Gram side
    # by |w|^T bound |w|; float64 dots add n 2^-52 T.T.
    d = out.double()
    a = w.abs() @ rows.double().abs()
    t2 = (a @ a).item()
    gamma = (k + 4) * 2.0**-24 / (1 - (k + 4) * 2.0**-24)  # K + 3 roundings + the store
    tol = (2 * gamma + gamma**2 + (n + k) * 2.0**-52) * t2
    tol += (w.abs() @ gram_mod.gram_error_bound(rows) @ w.abs()).item()
    assert abs((d @ d).item() - (w @ gm @ w).item()) <= tol + 1e-300


@settings(max_examples=300, deadline=None, derandomize=True)
@given(x=st.floats(allow_nan=False, allow_infinity=True, width=64))
def test_fp32_pair_splits_a_float64_argument(x):
    """The K x K kernels take float64 parameters as two fp32 values (Triton passes Python floats
    as fp32): hi is x rounded as torch rounds to float32 (inf beyond its range), and within that
    range hi + lo is x to 2^-48 relative (or to fp32's smallest subnormal)."""
    import importlib

    fp32_pair = importlib.import_module("gradbal.kernels._sweep").fp32_pair
    hi, lo = fp32_pair(x)
    assert hi == float(torch.tensor(x, dtype=torch.float32))
    if abs(hi) < float("inf"):
        assert lo == float(torch.tensor(x - hi, dtype=torch.float32))
        assert abs(hi + lo - x) <= max(2.0**-48 * abs(x), 2.0**-149)
