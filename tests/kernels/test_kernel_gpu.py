"""GPU-only checks of the compiled kernels: paths the interpreter cannot show (int64 offsets past
2^31 elements, native bf16/fp16 tensor-core dots, no host synchronisation, real parallel
programs). The other kernel tests also run compiled on a GPU machine (their ``device`` fixture
is CUDA there)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 9, 16, 17, 33, 64])
def test_gpu_every_path(k, dtype, poison, gram_mod, combine_mod, rows_of, bits_of):
    """fma and dot paths (native 16-bit dots on the GPU), many programs in parallel; three
    runs of each give the same bits."""
    for n in (1, 4097, 1_000_003):
        rows = rows_of(k, n, dtype, "cuda")
        rows[k - 1, n // 2] = float("nan")
        g, counts = gram_mod.gram_with_nonfinite(rows)
        assert torch.equal(counts, gram_mod.nonfinite_reference(rows))
        rows[k - 1, n // 2] = 0.0
        g = gram_mod.gram(rows)
        assert ((g - gram_mod.gram_reference(rows)).abs() <= gram_mod.gram_error_bound(rows)).all()
        for _ in range(2):
            assert torch.equal(bits_of(gram_mod.gram(rows)), bits_of(g))
        w = torch.randn(k, dtype=torch.float64, device="cuda")
        out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
        combine_mod.combine(rows, w, out)
        err = (out.double() - combine_mod.combine_reference(rows, w)).abs()
        assert (err <= combine_mod.combine_error_bound(rows, w, dtype)).all()


def test_gpu_offsets_past_2_31_elements(gram_mod, combine_mod):
    """K = 3 bf16 rows of 2^30 + 13 elements: row 2 starts past element 2^31 (6.4 GB)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    n = 2**30 + 13
    rows = torch.empty(3, n, dtype=torch.bfloat16, device="cuda")
    for r in range(3):
        rows[r].normal_(generator=torch.Generator("cuda").manual_seed(r))
    rows[2, -1] = 64.0  # the very last element must count
    g = gram_mod.gram(rows)
    ref = gram_mod.gram_reference(rows)
    assert ((g - ref).abs() <= gram_mod.gram_error_bound(rows)).all()
    w = torch.tensor([0.5, -1.0, 2.0], device="cuda")
    out = rows[0]  # in place, into the first row
    windows = [slice(0, 4096), slice(2**30 - 4096, 2**30 + 13)]
    before = {i: rows[:, s].clone() for i, s in enumerate(windows)}
    combine_mod.combine(rows, w, out)
    for i, s in enumerate(windows):
        ref = combine_mod.combine_reference(before[i], w)
        bound = combine_mod.combine_error_bound(before[i], w, torch.bfloat16)
        assert ((out[s].double() - ref).abs() <= bound).all()


def test_gpu_no_host_sync(gram_mod, combine_mod, rows_of):
    rows = rows_of(4, 100_003, torch.bfloat16, "cuda")
    w = torch.randn(4, device="cuda")
    out = torch.empty(100_003, dtype=torch.float32, device="cuda")
    scale = torch.tensor(0.5, device="cuda")
    calls = [
        lambda: gram_mod.gram(rows),
        lambda: gram_mod.gram_with_nonfinite(rows),
        lambda: combine_mod.combine(rows, w, out, accumulate=True, scale=scale),
    ]
    for call in calls:  # compile outside the check
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_gpu_ops_dispatch_uses_triton(rows_of):
    from gradbal import _ops

    rows = rows_of(3, 4097, torch.float32, "cuda")
    assert _ops.resolve_backend(rows, "auto") == "triton"
    g = _ops.gram(rows, backend="triton")
    assert torch.allclose(g, _ops.gram(rows, backend="torch"), rtol=1e-5, atol=1e-6)
