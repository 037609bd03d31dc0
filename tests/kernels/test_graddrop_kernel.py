"""gradbal.kernels.graddrop (Triton's interpreter on CPU machines) against the torch pass it must
match bit for bit (gradbal._ops.graddrop_torch) and against a float64 reference.

Bits: for the same rows, noise and leak factors the kernel and the torch pass perform the same
IEEE fp32 operations in the same order, so their outputs have the same bits (NaN payloads
aside: both give NaN at the same places, but the bf16 NaN pattern depends on the cast).

Float64 reference: where the float64 sign purity P is farther than the fp32 rounding bound from
the draw U the keep decision is the same and the result is within the kernel's error bound of
the float64 value; nearer (a tie, rare) either decision is accepted.

Non-finite entries: a column holding inf or NaN gives the plain sum of the column (+inf, -inf or
NaN), never a finite value; every other column is unaffected.
"""

from __future__ import annotations

import pytest
import torch

import gradbal
from gradbal import _ops
from gradbal.methods import get_method

KS = (2, 3, 5, 8, 16)
NS = (1, 7, 4097, 100003)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# inf / inf in the (discarded) ratio of a non-finite column: numpy warns under the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")



@pytest.fixture(autouse=True)
def _single_thread(single_thread):
    """One torch thread (the root conftest's fixture): OpenMP stalls dominate these small ops."""
    yield


# Every (K, N, dtype) cell would be 60 runs; in this thinner product every K meets every N and
# every dtype meets every K and every N. Odd cases carry leak factors.
CASES = [(k, n, DTYPES[(i + j) % 3]) for i, k in enumerate(KS) for j, n in enumerate(NS)]


def _noise(n, device, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed + n)).to(device)


def _leak(k, device, seed=2):
    g = torch.Generator().manual_seed(seed + k)
    lk = torch.rand(k, generator=g)
    lk[0] = 0.0  # one objective without leak, one passed through
    lk[-1] = 1.0
    return lk.to(device), (1 - lk).to(device)


def _rows(rows_of, k, n, dtype, device, seed=0):
    """Random rows with some all-zero, all-positive and one-zero columns (ties of every kind)."""
    rows = rows_of(k, n, dtype, device, seed=seed)
    if n >= 7:
        rows[:, 1] = 0.0
        rows[:, 2] = rows[:, 2].abs()
        rows[:, 3] = -rows[:, 3].abs()
        rows[0, 4] = 0.0
        rows[:, 5] = -0.0
    return rows


def _canon(t):
    """Bit pattern with every NaN replaced by one pattern."""
    t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.contiguous().view(ints[t.element_size()])


def _same_bits(a, b):
    return torch.equal(_canon(a), _canon(b))


def _check_reference(gd, rows, noise, out, leak=None, out_before=None):
    """out is the float64 reference within the error bound (either decision at near-ties);
    non-finite reference entries must be matched in kind (+inf, -inf or NaN)."""
    k = rows.shape[0]
    p = gd.sign_purity_reference(rows)
    u = noise.double()
    tie = (p - u).abs() <= gd.purity_tie_margin(k)
    exact = gd.graddrop_reference(rows, noise, leak, out_before)
    other = gd.graddrop_reference(rows, noise, leak, out_before, keep_positive=~(p > u))
    got = out.double()
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(got), torch.isnan(exact))
    assert torch.equal(got[~finite & ~torch.isnan(exact)], exact[~finite & ~torch.isnan(exact)])
    ok = (got - exact).abs() <= gd.graddrop_error_bound(rows, out.dtype, exact, out_before)
    ok_other = (got - other).abs() <= gd.graddrop_error_bound(rows, out.dtype, other, out_before)
    ok = ok | (tie & ok_other)
    assert bool(ok[finite].all()), f"{int((~ok & finite).sum())} columns off the reference"


def _both(gd, rows, noise, out_dtype, accumulate=False, leak=None, before=None):
    """(kernel out, torch out), each written over a NaN-poisoned (or given) buffer."""
    n = rows.shape[1]
    outs = []
    for run in (gd.graddrop, _ops.graddrop_torch):
        out = (
            before.clone()
            if before is not None
            else torch.full((n,), float("nan"), dtype=out_dtype, device=rows.device)
        )
        assert run(rows, noise, out, accumulate, leak) is out
        outs.append(out)
    return outs


@pytest.mark.parametrize("k,n,dtype", CASES, ids=str)
def test_graddrop_matches_torch_bits_and_reference(k, n, dtype, device, graddrop_mod, rows_of):
    gd = graddrop_mod
    case = CASES.index((k, n, dtype))
    rows = _rows(rows_of, k, n, dtype, device)
    noise = _noise(n, device)
    leak = _leak(k, device) if case % 2 else None
    out, ref = _both(gd, rows, noise, dtype, leak=leak)
    assert _same_bits(out, ref)
    assert torch.isfinite(out).all()
    _check_reference(gd, rows, noise, out, leak)
    again = torch.full_like(out, float("nan"))
    gd.graddrop(rows, noise, again, leak=leak)
    assert torch.equal(_canon(again), _canon(out))  # deterministic: same bits every run


@pytest.mark.parametrize("k,n,dtype", CASES[1::3], ids=str)
@pytest.mark.parametrize("leaky", [False, True], ids=["noleak", "leak"])
def test_graddrop_accumulate(k, n, dtype, leaky, device, graddrop_mod, rows_of):
    """out += round(res): the same two roundings as torch's ``dst.add_(res.to(dst.dtype))``."""
    gd = graddrop_mod
    rows = _rows(rows_of, k, n, dtype, device)
    noise = _noise(n, device, seed=5)
    leak = _leak(k, device) if leaky else None
    before = rows_of(1, n, dtype, device, seed=7)[0]
    out, ref = _both(gd, rows, noise, dtype, accumulate=True, leak=leak, before=before)
    assert _same_bits(out, ref)
    _check_reference(gd, rows, noise, out, leak, out_before=before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_graddrop_casts_to_the_out_dtype(dtype, device, graddrop_mod, rows_of):
    """fp32 / fp64 / 16-bit out from any row dtype, overwritten and accumulated into."""
    gd = graddrop_mod
    rows = _rows(rows_of, 4, 4097, dtype, device)
    noise = _noise(4097, device)
    for out_dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        out, ref = _both(gd, rows, noise, out_dtype)
        assert _same_bits(out, ref)
        _check_reference(gd, rows, noise, out)
        before = rows_of(1, 4097, out_dtype, device, seed=3)[0]
        out, ref = _both(gd, rows, noise, out_dtype, accumulate=True, before=before)
        assert _same_bits(out, ref)
        _check_reference(gd, rows, noise, out, out_before=before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leaky", [False, True], ids=["noleak", "leak"])
def test_graddrop_nonfinite_columns_give_the_plain_sum(dtype, leaky, device, graddrop_mod, rows_of):
    """NaN, +inf, -inf and +inf against -inf planted in several rows (one in the masked tail
    block): those columns give +inf, -inf or NaN like the plain column sum, in both passes;
    every other column is what it is without them."""
    gd = graddrop_mod
    k, n = 5, 4097
    rows = _rows(rows_of, k, n, dtype, device)
    clean = rows.clone()
    nan, inf = float("nan"), float("inf")
    plants = {  # column: [(row, value)], expected class of the result
        10: ([(0, nan)], "nan"),
        11: ([(4, inf)], "+inf"),
        12: ([(2, -inf)], "-inf"),
        13: ([(1, inf), (3, -inf)], "nan"),
        14: ([(0, inf), (1, inf)], "+inf"),
        15: ([(3, nan), (4, inf)], "nan"),
        n - 1: ([(4, -inf)], "-inf"),
    }
    for col, (entries, _) in plants.items():
        for r, v in entries:
            rows[r, col] = v
    rows[:, 11] = rows[:, 11].abs()  # +inf among positives only (nothing to drop)
    noise = _noise(n, device)
    leak = _leak(k, device) if leaky else None
    out, ref = _both(gd, rows, noise, dtype, leak=leak)
    assert _same_bits(out, ref)
    _check_reference(gd, rows, noise, out, leak)
    for col, (_, kind) in plants.items():
        v = float(out[col])
        assert {"nan": v != v, "+inf": v == inf, "-inf": v == -inf}[kind], (col, v)  # noqa: PLR0124
    others = [c for c in range(n) if c not in plants]
    clean_out = gd.graddrop(clean, noise, torch.empty_like(out), leak=leak)
    assert torch.equal(out[others], clean_out[others])
    assert torch.isfinite(out[others]).all()


def test_graddrop_noise_may_live_in_out(device, graddrop_mod, rows_of):
    """The method draws the noise into ``out`` when it can; the result is the same."""
    gd = graddrop_mod
    rows = _rows(rows_of, 3, 100003, torch.bfloat16, device)
    noise = _noise(100003, device)
    separate = gd.graddrop(rows, noise, torch.empty(100003, device=device))
    shared = noise.clone()
    assert gd.graddrop(rows, shared, shared) is shared
    assert torch.equal(shared, separate)
    shared = noise.clone()
    assert torch.equal(_ops.graddrop_torch(rows, shared, shared), separate)


def test_graddrop_rejects_bad_input(device, graddrop_mod):
    gd = graddrop_mod
    rows = torch.zeros(3, 64, device=device)
    noise = torch.rand(64, device=device)
    out = torch.empty(64, device=device)
    with pytest.raises(ValueError, match="overlaps the rows"):
        gd.graddrop(rows, noise, rows[1])  # out must be separate from the store
    with pytest.raises(ValueError, match="noise overlaps the rows"):
        gd.graddrop(rows, rows[2], out)
    buf = torch.zeros(128, device=device)
    with pytest.raises(ValueError, match="without being out"):
        gd.graddrop(rows, buf[32:96], buf[:64])  # noise half inside out
    with pytest.raises(ValueError, match="when accumulating"):
        gd.graddrop(rows, out, out, accumulate=True)
    with pytest.raises(TypeError):
        gd.graddrop(rows, noise.double(), out)
    with pytest.raises(TypeError):
        gd.graddrop(rows.double(), noise, out)
    with pytest.raises(ValueError):
        gd.graddrop(rows, noise, torch.empty(63, device=device))
    with pytest.raises(ValueError):
        gd.graddrop(rows, noise, torch.empty(128, device=device)[::2])
    with pytest.raises(ValueError, match="leak"):
        gd.graddrop(rows, noise, out, leak=(torch.ones(2), torch.zeros(2)))
    # K = 0: an empty sum.
    empty = torch.zeros(0, 64, device=device)
    assert torch.equal(gd.graddrop(empty, noise, out.fill_(3.0)), torch.zeros(64, device=device))


# --------------------------------------------------------------------- dispatch, method, optimizer


def _spy_kernel(monkeypatch):
    """Count calls of the Triton graddrop kernel through gradbal._ops."""
    fns = _ops._triton_ops()
    calls = []

    def graddrop(*args, **kwargs):
        calls.append(1)
        return fns[2](*args, **kwargs)

    monkeypatch.setattr(_ops, "_triton_ops", lambda: (fns[0], fns[1], graddrop))
    return calls


@pytest.mark.parametrize("leak", [None, [0.25, 0.0, 1.0]], ids=["noleak", "leak"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_method_backends_give_the_same_bits(dtype, leak, device, monkeypatch, rows_of):
    calls = _spy_kernel(monkeypatch)
    rows = _rows(rows_of, 3, 4097, dtype, device)
    res = {}
    for backend in ("torch", "triton"):
        m = get_method("graddrop", leak=leak, backend=backend)
        gen = torch.Generator().manual_seed(11)
        res[backend] = gradbal.aggregate(rows, m, generator=gen)
        # an explicit backend given to combine wins over the method's own
        out = torch.empty(4097, dtype=dtype, device=device)
        other = "torch" if backend == "triton" else "triton"
        m.combine(rows, out, False, torch.Generator(device).manual_seed(1), backend=other)
        res[backend, "combine"] = out
    assert len(calls) == 2
    assert _same_bits(res["torch"], res["triton"])
    assert _same_bits(res["torch", "combine"], res["triton", "combine"])


def test_aggregate_backend_reaches_the_kernel(monkeypatch, rows_of):
    """``gradbal.aggregate(..., backend=...)`` routes GradDrop's pass like gram/combine."""
    calls = _spy_kernel(monkeypatch)
    rows = _rows(rows_of, 3, 300, torch.float32, "cpu")
    res = {}
    for backend in ("torch", "triton"):
        res[backend] = gradbal.aggregate(
            rows, "graddrop", generator=torch.Generator().manual_seed(5), backend=backend
        )
    assert calls == [1]
    assert _same_bits(res["torch"], res["triton"])


def test_env_forces_the_kernel_and_auto_keeps_cpu_on_torch(monkeypatch, rows_of):
    calls = _spy_kernel(monkeypatch)
    rows = _rows(rows_of, 2, 100, torch.float32, "cpu")
    gen = lambda: torch.Generator().manual_seed(0)
    plain = gradbal.aggregate(rows, "graddrop", generator=gen())
    assert calls == []
    monkeypatch.setenv("GRADBAL_BACKEND", "triton")
    forced = gradbal.aggregate(rows, "graddrop", generator=gen())
    assert calls == [1] and torch.equal(plain, forced)
    # float64 rows are the torch pass's under "auto" (the kernels read fp32/bf16/fp16)
    monkeypatch.delenv("GRADBAL_BACKEND")
    assert _ops.resolve_backend(torch.ones(2, 3, dtype=torch.float64), "auto") == "torch"


def test_graddrop_falls_back_to_torch_with_one_warning(monkeypatch, rows_of):
    import warnings

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(_ops, "_triton_ops", lambda: (broken, broken, broken))
    monkeypatch.setattr(_ops, "resolve_backend", lambda rows, backend="auto": "triton")
    monkeypatch.setattr(_ops, "_triton_failed", False)
    rows = _rows(rows_of, 3, 50, torch.float32, "cpu")
    noise = _noise(50, "cpu")
    expected = _ops.graddrop_torch(rows, noise, torch.empty(50))
    with pytest.warns(RuntimeWarning, match="falling back to torch"):
        out = _ops.graddrop(rows, noise, torch.full((50,), float("nan")))
    assert torch.equal(out, expected) and _ops._triton_failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="no kernel image"):
            _ops.graddrop(rows, noise, torch.empty(50), backend="triton")


def _train(backend, leak=None, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    # The method by name, with no backend of its own: the optimizer's ``backend`` routes it.
    opt = gradbal.MultiObjectiveOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "graddrop",
        leak=leak,
        backend=backend,
        seed=1,
    )
    gen = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 5, (16,), generator=gen)
        out = model(x)
        f = torch.nn.functional
        losses = [f.cross_entropy(out, y), out.pow(2).mean(), (out[:, :2] - 1).abs().mean()]
        opt.zero_grad()
        opt.backward(losses)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("leak", [None, [0.5, 0.0, 0.25]], ids=["noleak", "leak"])
def test_optimizer_graddrop_triton_equals_torch(leak, monkeypatch):
    """MultiObjectiveOptimizer with method="graddrop": backend="triton" (the interpreter on
    CPU) gives the same bits as backend="torch", step after step."""
    calls = _spy_kernel(monkeypatch)
    g_t, p_t = _train("torch", leak)
    assert calls == []
    g_k, p_k = _train("triton", leak)
    assert len(calls) == 3
    for a, b in zip(g_t + p_t, g_k + p_k):
        assert torch.equal(a, b)


# --------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_graddrop_bits_and_no_sync(dtype, graddrop_mod, rows_of):
    """Compiled: same bits as the torch pass on CUDA (div_rn, no FMA contraction), many
    programs in parallel, no host synchronisation."""
    gd = graddrop_mod
    for k in (2, 8, 16):
        for n in (1, 4097, 1_000_003):
            rows = _rows(rows_of, k, n, dtype, "cuda")
            if n > 10:
                rows[0, 10], rows[k - 1, 11] = float("nan"), float("inf")
            noise = torch.rand(n, device="cuda")
            for leak in (None, _leak(k, "cuda")):
                out, ref = _both(gd, rows, noise, dtype, leak=leak)
                assert _same_bits(out, ref)
                _check_reference(gd, rows, noise, out, leak)
    rows = _rows(rows_of, 8, 4_000_000, dtype, "cuda")
    noise = torch.rand(4_000_000, device="cuda")
    out = torch.empty(4_000_000, dtype=dtype, device="cuda")
    leak = _leak(8, "cuda")  # built before the check: its host-to-device copy is the test's own
    gd.graddrop(rows, noise, out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gd.graddrop(rows, noise, out, leak=leak)
    finally:
        torch.cuda.set_sync_debug_mode("default")
