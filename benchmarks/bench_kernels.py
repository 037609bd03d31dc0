"""Throughput of the memory-bound passes (gram, combine, graddrop) and of whole balanced steps.

A step over K task gradients stored as the rows of a [K, N] matrix of element size s must read
the rows twice and write one row: the floor is (2K + 1) N s bytes (gram reads K N s, combine
reads K N s and writes N s). Each row of the report divides that traffic by the measured time
and compares it with the device-to-device copy bandwidth measured in the same run, on a buffer
of the same size (so both sides see the same caches).

Ops:
* ``gram``        : G = rows rows^T (float64 [K, K]).
* ``combine``     : out = sum_k w_k rows[k].
* ``step-mokd``   : ``gradbal.aggregate(rows, "mokd", losses=ones(K), validate=False)``: gram, MoKD weights,
                    combine.
* ``step-pcgrad`` : ``gradbal.aggregate(rows, "pcgrad")``.
* ``graddrop``    : GradDrop's elementwise pass on given fp32 uniforms (reads the K rows and the
                    N uniforms, writes one row: K N s + 4 N + N s bytes).
* ``step-graddrop``: ``gradbal.aggregate(rows, GradDrop(backend=provider))``: the uniforms drawn
                    from the seeded generator (4 N bytes written), then the pass.

Providers:
* ``triton`` : gradbal.kernels (CUDA only; aggregate(..., backend="triton") for the steps).
* ``torch``  : the flat torch path, gradbal._ops.gram_torch / combine_torch (matmul and
               matrix-vector product; aggregate(..., backend="torch") for the steps).
* ``loop``   : what per-pair libraries do: one torch.dot per pair, one fused axpy
               (``out.addcmul_(row, w_k)``) per row, the method's weights in between; for
               GradDrop, LibMTL's dense formula (full [K, N] masks and products).
* ``torchjd``: TorchJD's aggregator on the [K, N] matrix (PCGrad; MGDA stands in for MoKD,
               which TorchJD lacks), only when ``import torchjd`` works; steps only.

Timing: CUDA events (the L2 cache is flushed before every repetition) on a GPU, perf_counter
on CPU. For each row: median / p20 / p80 ms, GB/s of the op's floor traffic, % of the copy
bandwidth, and (CUDA) whether the call synchronised with the host. On a CPU-only machine only
the torch providers run (Triton's interpreter is a correctness tool, not a benchmark), N
defaults to 1e5 and 1e6, and the script says so.

    python benchmarks/bench_kernels.py --csv benchmarks/results/bench_kernels.csv
    python benchmarks/bench_kernels.py --ks 8 --ns 1e7 --dtypes bf16 --ops step-pcgrad
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable

import torch

try:  # run as a script (benchmarks/ on sys.path) or as benchmarks.bench_kernels
    from _timing import Timer, graph_ms, host_syncs, quantiles, write_csv
except ImportError:
    from ._timing import Timer, graph_ms, host_syncs, quantiles, write_csv

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("gram", "combine", "step-mokd", "step-pcgrad", "graddrop", "step-graddrop")
PROVIDERS = ("triton", "torch", "loop", "torchjd")
FIELDS = [
    "device",
    "op",
    "provider",
    "dtype",
    "K",
    "N",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "bytes",
    "GBps",
    "copy_GBps",
    "pct_of_copy",
    "host_sync",
    "timing",
]

# Kernel-only ops that --graph-calls may time as CUDA-graph replays.
GRAPHABLE = ("gram", "combine", "graddrop")


# --------------------------------------------------------------------------------------------
# timing (benchmarks/_timing.py) and the copy bandwidth
# --------------------------------------------------------------------------------------------


_copy_cache: dict[tuple[int, int], float] = {}


def copy_bandwidth(nbytes: int, device: torch.device, timer: Timer) -> float:
    """GB/s of dst.copy_(src) for a buffer of nbytes (read + write counted), cached per size."""
    nbytes = max(nbytes, 4096)
    key = (nbytes, device.index or 0)
    if key not in _copy_cache:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        med, _, _ = quantiles(timer(lambda: dst.copy_(src)))
        _copy_cache[key] = 2 * nbytes / (med * 1e-3) / 1e9
        del src, dst
    return _copy_cache[key]


# --------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------


def loop_gram(rows: torch.Tensor) -> torch.Tensor:
    """One torch.dot per pair, as per-pair libraries compute the Gram matrix."""
    k = rows.shape[0]
    dots = {}
    for i in range(k):
        for j in range(i, k):
            dots[i, j] = torch.dot(rows[i], rows[j])
    return torch.stack(
        [torch.stack([dots[min(i, j), max(i, j)] for j in range(k)]) for i in range(k)]
    ).double()


def loop_combine(rows: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One axpy per row (fused multiply-add with an on-device 0-d weight: no host sync)."""
    w = w.to(rows.dtype)
    out.zero_()
    for k in range(rows.shape[0]):
        out.addcmul_(rows[k], w[k])
    return out


def loop_graddrop(rows: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """LibMTL's GradDrop: P from two [K, N] reductions, dense [K, N] masks, one masked sum."""
    p = 0.5 * (1 + rows.sum(0) / (rows.abs().sum(0) + 1e-7))
    mask = (p > noise) * (rows > 0) + (p < noise) * (rows < 0)
    return (rows * mask).sum(0)


def make_fns(
    op: str, provider: str, rows, w, out, losses, gen, noise=None
) -> Callable[[], object] | None:
    """The callable timed for (op, provider), or None when the provider cannot run here."""
    import gradbal
    from gradbal import _ops
    from gradbal.methods import get_method

    cuda = rows.is_cuda
    if "graddrop" in op:
        return _graddrop_fn(op, provider, rows, out, noise, gen)
    if provider == "triton":
        try:
            from gradbal import kernels
        except ImportError:
            return None
        if not (cuda and kernels.AVAILABLE):
            return None
        if op == "gram":
            return lambda: kernels.gram(rows)
        if op == "combine":
            return lambda: kernels.combine(rows, w, out)
    if provider == "torch":
        if op == "gram":
            return lambda: _ops.gram_torch(rows)
        if op == "combine":
            return lambda: _ops.combine_torch(rows, w, out)
    if provider in ("triton", "torch"):
        method = op.split("-", 1)[1]
        # validate=False: the loss-sign check for MoKD's log scaling is one host read of the
        # losses, a check on the caller's input rather than part of the step (the loop and
        # TorchJD providers make none either).
        kwargs = {"losses": losses, "validate": False} if method == "mokd" else {"generator": gen}
        return lambda: gradbal.aggregate(rows, method, backend=provider, **kwargs)
    if provider == "loop":
        if op == "gram":
            return lambda: loop_gram(rows)
        if op == "combine":
            return lambda: loop_combine(rows, w, out)
        method = get_method(op.split("-", 1)[1])
        loss_values = losses.double() if method.requires_losses else None

        def step():
            g = loop_gram(rows)
            weights = method.weights(g, loss_values, gen)
            return loop_combine(rows, weights, torch.empty_like(out))

        return step
    if provider == "torchjd":
        if not op.startswith("step-"):
            return None
        try:
            from torchjd import aggregation
        except ImportError:
            return None
        agg = aggregation.PCGrad() if op == "step-pcgrad" else aggregation.MGDA()
        return lambda: agg(rows)
    return None


def _graddrop_fn(op, provider, rows, out, noise, gen) -> Callable[[], object] | None:
    import gradbal
    from gradbal import _ops
    from gradbal.methods import get_method

    if provider == "triton":
        from gradbal import kernels

        if not (rows.is_cuda and kernels.AVAILABLE):
            return None
    if provider in ("triton", "torch"):
        if op == "graddrop":
            if provider == "torch":
                return lambda: _ops.graddrop_torch(rows, noise, out)
            return lambda: kernels.graddrop(rows, noise, out)
        method = get_method("graddrop", backend=provider)
        return lambda: gradbal.aggregate(rows, method, generator=gen)
    if provider == "loop":
        k, n = rows.shape
        if 3 * k * n * 4 + 2**30 > free_bytes(rows.device):  # its dense temporaries
            return None
        if op == "graddrop":
            return lambda: loop_graddrop(rows, noise)

        def step():
            u = torch.rand(rows.shape[1], device=rows.device)  # LibMTL: global RNG
            return loop_graddrop(rows, u)

        return step
    return None  # no TorchJD GradDrop


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def traffic(op: str, k: int, n: int, s: int) -> int:
    """Floor bytes: gram K N s, combine (K + 1) N s, a step (2K + 1) N s; graddrop (K + 1) N s
    + 4 N (the uniforms read), its step 4 N more (the uniforms written)."""
    return {
        "gram": k * n * s,
        "combine": (k + 1) * n * s,
        "graddrop": (k + 1) * n * s + 4 * n,
        "step-graddrop": (k + 1) * n * s + 8 * n,
    }.get(op, (2 * k + 1) * n * s)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", default="2,4,8,16", help="comma-separated K values")
    p.add_argument(
        "--ns",
        default=None,
        help="comma-separated N values (default 1e6,1e7,1e8 on CUDA, 1e5,1e6 on CPU)",
    )
    p.add_argument("--dtypes", default="fp32,bf16", help=f"from {sorted(DTYPES)}")
    p.add_argument("--ops", default=",".join(OPS), help=f"from {OPS}")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"from {PROVIDERS}")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (CUDA 30, CPU 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (CUDA 5, CPU 1)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--csv", default=None, help="write the rows to this CSV file")
    p.add_argument(
        "--graph-calls",
        type=int,
        default=0,
        help="CUDA only: also time gram/combine/graddrop as replays of a CUDA graph of this many "
        "calls (per-call time; leaves out the host's launch path) where the rows exceed 4x the "
        "L2 cache; the 'timing' column says which (default 0: single eager calls)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    ks = [int(k) for k in args.ks.split(",")]
    ns = [int(float(n)) for n in (args.ns or ("1e6,1e7,1e8" if cuda else "1e5,1e6")).split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    ops = args.ops.split(",")
    providers = args.providers.split(",")
    for name, given, allowed in (("op", ops, OPS), ("provider", providers, PROVIDERS)):
        bad = sorted(set(given) - set(allowed))
        if bad:
            sys.exit(f"unknown {name}(s) {bad}; choose from {allowed}")
    reps = args.reps or (30 if cuda else 5)
    timer = Timer(device, reps, args.warmup or (5 if cuda else 1), flush_l2=True)
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if cuda else 0

    if cuda:
        name = torch.cuda.get_device_name(device)
    else:
        name = (
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
        print(
            "No CUDA device: timing the torch providers on CPU only (Triton's interpreter is "
            f"not a benchmark); N defaults to 1e5 and 1e6. Device: {name}"
        )
    print(f"torch {torch.__version__}, device {name}")
    big = copy_bandwidth(min(2**30, free_bytes(device) // 8), device, timer)
    print(f"device-to-device copy bandwidth (large buffer): {big:.1f} GB/s\n")

    header = (
        f"{'op':<13} {'provider':<8} {'dtype':<5} {'K':>3} {'N':>10} {'median':>9} "
        f"{'p20':>9} {'p80':>9} {'GB/s':>8} {'copy':>8} {'%copy':>6} {'sync':>4}"
    )
    print(header)
    print("-" * len(header))
    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        s = torch.empty(0, dtype=dtype).element_size()
        for n in ns:
            for k in ks:
                if 2 * k * n * s + 2**30 > free_bytes(device):
                    print(f"(skipping K={k} N={n:.0e} {dtype}: not enough memory)")
                    continue
                rows = torch.randn(k, n, device=device, dtype=torch.float32).to(dtype)
                w = torch.rand(k, device=device, dtype=torch.float64)
                out = torch.empty(n, dtype=dtype, device=device)
                losses = torch.ones(k, device=device)
                noise = torch.rand(n, device=device) if any("graddrop" in o for o in ops) else None
                for op in ops:
                    nbytes = traffic(op, k, n, s)
                    copy = copy_bandwidth(k * n * s, device, timer)
                    for provider in providers:
                        fn = make_fns(op, provider, rows, w, out, losses, gen, noise)
                        if fn is None:
                            continue
                        times, timing = timer(fn), "eager"
                        # Replays read the same rows back to back: only a store well over
                        # the L2 cache streams from memory each time.
                        if args.graph_calls and op in GRAPHABLE and k * n * s >= 4 * l2_bytes:
                            graphed = graph_ms(fn, device, reps, args.graph_calls)
                            if graphed is not None:
                                times, timing = graphed, f"graph x{args.graph_calls}"
                        med, p20, p80 = quantiles(times)
                        gbps = nbytes / (med * 1e-3) / 1e9
                        row = {
                            "device": name,
                            "op": op,
                            "provider": provider,
                            "dtype": str(dtype)[6:],
                            "K": k,
                            "N": n,
                            "median_ms": f"{med:.4f}",
                            "p20_ms": f"{p20:.4f}",
                            "p80_ms": f"{p80:.4f}",
                            "bytes": nbytes,
                            "GBps": f"{gbps:.1f}",
                            "copy_GBps": f"{copy:.1f}",
                            "pct_of_copy": f"{100 * gbps / copy:.1f}",
                            "host_sync": host_syncs(fn, device),
                            "timing": timing,
                        }
                        rows_out.append(row)
                        print(
                            f"{op:<13} {provider:<8} {row['dtype']:<5} {k:>3} {n:>10.0e} "
                            f"{med:>9.4f} {p20:>9.4f} {p80:>9.4f} {gbps:>8.1f} {copy:>8.1f} "
                            f"{100 * gbps / copy:>6.1f} {row['host_sync']:>4}",
                            flush=True,
                        )
                del rows, out, noise
                if cuda:
                    torch.cuda.empty_cache()
    print(
        "\ntimes in ms; GB/s = floor traffic (gram K N s, combine (K+1) N s, step (2K+1) N s, "
        "graddrop (K+1) N s + 4 N, step-graddrop (K+1) N s + 8 N) / median; %copy = GB/s over "
        "the copy bandwidth of a K N s buffer"
    )
    if args.csv:
        write_csv(args.csv, FIELDS, rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
