"""Sweep the Gram pass's launch plans on a GPU and report the fastest one per (K, N, dtype).

gradbal.kernels.gram reads a [K, N] store once; its plan (gram.plan_gram) has knobs that only
a GPU can settle: ``unroll`` (U column blocks loaded per loop iteration, i.e. U x KP x B
elements in flight per program), ``programs_per_sm`` (resident programs per SM),
``fma_lanes`` (fp32 accumulators per program on the fma path: B = fma_lanes / KP^2 columns per
block) and ``use_dot`` (tl.dot on tiles padded to KP >= 16 instead of lane-wise FMAs). For
each K (--ks), N (--ns) and dtype this script times every plan of the grid (--unrolls,
--programs-per-sm, --fma-lanes; --dot both also tries the other block product at K >= 8) with
CUDA events (benchmarks/_timing.py: warm-up calls, then the median of --reps; the input
rotates over enough buffers that the L2 cache never holds the store), replaying a CUDA graph
of up to --graph-calls calls so that the host's launch time (tens of microseconds, comparable
to the whole pass for K = 2 at N = 1e7) is not what gets measured (--eager: single calls), as
a fraction of the device-to-device copy bandwidth measured once (bench_kernels'
copy_bandwidth, 1 GiB buffer):

    %copy = (K N s / median time) / copy GB/s        (s = element size)

It prints a progress line per (K, N, dtype) with the best plan, its %copy and the default
plan's, and writes every timed plan to --csv. Each plan's G is compared with the default
plan's: max |G - G_default| / max |G_default| must stay <= 1e-5 (both accumulate in fp32;
violations are listed at the end and flagged in the CSV). The best plan's settings are printed
in the GRADBAL_GRAM_PLAN format, so they can be tried without a code change
(``GRADBAL_GRAM_PLAN="unroll=4,programs_per_sm=4" python benchmarks/bench_kernels.py ...``).

The default sweep (K 2, 4, 8, 16; N 1e7, 1e8; fp32, bf16; 4 x 4 x 3 fma plans, fewer on the
dot path) is sized for about 90 s on an H100, most of it Triton compiling the variants (a
second run reuses Triton's cache); --budget-s (default 120) stops it cleanly (what was timed
is still reported and written). Without CUDA it prints that it needs CUDA and exits with
status 0 (the tests run the sweep's logic on CPU under Triton's interpreter with the hidden
option --device cpu: a check of the script, not a benchmark).

    python benchmarks/tune_gram.py --csv benchmarks/results/tune_gram_h100.csv
    python benchmarks/tune_gram.py --ks 8 --ns 1e8 --dtypes bf16 --unrolls 1,4 --dot both
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import os
import sys
import time

import torch

# Run as a script or loaded from a file by the tests: the sibling modules are imported by name.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from _timing import Timer, graph_ms, quantiles, time_ms, write_csv
from bench_kernels import copy_bandwidth, free_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DOT_MODES = ("auto", "both", "on", "off")
# Largest relative difference (max-norm) from the default plan's G: both accumulate in fp32,
# in different orders, over at most N / (U B P) terms per lane, far below this on random data.
REL_TOL = 1e-5
FIELDS = [
    "device", "dtype", "K", "N", "plan", "default", "use_dot", "k_pad", "block", "unroll",
    "num_programs", "num_warps", "median_ms", "p20_ms", "p80_ms", "GBps", "copy_GBps",
    "pct_of_copy", "rel_err_vs_default", "ok", "timing",
]  # fmt: skip


def parse_list(text: str, cast=int) -> list:
    """'1,2, 4' -> [1, 2, 4]; floats like '1e7' allowed where cast is int."""
    out = []
    for part in text.split(","):
        if part.strip():
            out.append(cast(float(part)) if cast is int else cast(part.strip()))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", default="2,4,8,16", help="comma-separated K values")
    p.add_argument("--ns", default="1e7,1e8", help="comma-separated N values")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"from {sorted(DTYPES)}")
    p.add_argument("--unrolls", default="1,2,4,8", help="unroll values to try")
    p.add_argument("--programs-per-sm", default="1,2,4,8", help="programs_per_sm values")
    p.add_argument("--fma-lanes", default="4096,8192,16384", help="fma_lanes values (fma path)")
    p.add_argument(
        "--dot",
        default="both",
        choices=DOT_MODES,
        help="auto: the default block product only; both: also the other one where it is "
        "meaningful (K >= 8); on/off: force tl.dot / fma (fma only for K <= 16)",
    )
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per plan")
    p.add_argument(
        "--graph-calls",
        type=int,
        default=8,
        help="gram calls per captured CUDA graph (each timed replay runs them back to back)",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="time single eager calls (launch overhead included) instead of CUDA graphs",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per plan (compiles)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=120.0,
        help="stop the sweep cleanly after this many seconds (default 120; 0: no limit)",
    )
    p.add_argument("--csv", default=None, help="write every timed plan to this CSV file")
    # Hidden: cpu runs the sweep under Triton's interpreter (TRITON_INTERPRET=1), for tests.
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ks = parse_list(args.ks)
    args.ns = parse_list(args.ns)
    args.dtypes = parse_list(args.dtypes, str)
    bad = sorted(set(args.dtypes) - set(DTYPES))
    if bad:
        p.error(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
    args.unrolls = parse_list(args.unrolls)
    args.programs_per_sm = parse_list(args.programs_per_sm)
    args.fma_lanes = parse_list(args.fma_lanes)
    if args.reps < 1 or args.warmup < 1:
        p.error("--reps and --warmup must be >= 1 (the first call compiles)")
    return args


def plan_grid(gram_mod, k: int, dtype: torch.dtype, args) -> list[dict]:
    """The override dicts to time for (K, dtype): the default plan ({}) first, then every
    combination of the grid, without duplicates (fma_lanes does not change a dot plan).
    Invalid combinations (e.g. fma above K = 16) are left out."""
    default = gram_mod.plan_gram(k, 1, dtype)
    dots = {
        "auto": [default.use_dot],
        "both": [default.use_dot] + ([not default.use_dot] if 8 <= k <= 16 else []),
        "on": [True],
        "off": [False] if k <= 16 else [],
    }[args.dot]
    grid: list[dict] = [{}]
    seen = set()
    for use_dot, unroll, pps, lanes in itertools.product(
        dots, args.unrolls, args.programs_per_sm, args.fma_lanes
    ):
        ov = {"unroll": unroll, "programs_per_sm": pps}
        if use_dot != default.use_dot:
            ov["use_dot"] = use_dot
        if not use_dot:
            ov["fma_lanes"] = lanes
        try:
            plan = gram_mod.plan_gram(k, 1, dtype, **ov)
        except ValueError:
            continue
        key = (plan.use_dot, plan.k_pad, plan.block, plan.unroll, plan.num_warps, pps)
        if key in seen:
            continue
        seen.add(key)
        grid.append(ov)
    return grid


def time_plan(
    fn, nbuf: int, nbytes: int, device: torch.device, args
) -> tuple[float, float, float, str]:
    """(median, p20, p80) milliseconds per call of ``fn`` and how they were taken.

    A small store takes the GPU less time than the host needs to launch gram's two kernels
    (tens of microseconds), so timing single eager calls would measure the launch path. On
    CUDA (unless --eager) the calls are captured in a CUDA graph, ``calls`` back to back, and
    each timed replay counts ``elapsed / calls``; if capture fails, eager calls are timed.
    calls = min(--graph-calls, ceil(1 GB / store bytes)), rounded up to a multiple of the
    buffer count (every replay reads the buffers in turn): enough to amortise the graph's own
    launch for small stores, while large ones (which hide it anyway) keep the sweep short."""
    if device.type == "cuda" and not args.eager:
        for _ in range(args.warmup):  # compiles, and sets up the allocator outside capture
            fn()
        calls = min(args.graph_calls, max(1, math.ceil(1e9 / max(nbytes, 1))))
        calls = nbuf * math.ceil(calls / nbuf)
        times = graph_ms(fn, device, args.reps, calls)
        if times is None:
            print("  (CUDA graph capture failed, timing eager calls)")
        else:
            med, p20, p80 = quantiles(times)
            return med, p20, p80, f"graph x{calls}"
    med, p20, p80 = quantiles(time_ms(fn, device, args.reps, args.warmup))
    return med, p20, p80, "eager"


def describe(ov: dict, gram_mod) -> str:
    return gram_mod.format_plan_spec(ov) if ov else "default"


def main(argv=None) -> int:
    args = parse_args(argv)
    interpreted = args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if not (torch.cuda.is_available() or interpreted):
        print(
            "tune_gram.py needs CUDA (it times the Triton Gram kernel on a GPU); no CUDA device "
            "here, nothing to do."
        )
        return 0
    t_start = time.perf_counter()
    if os.environ.pop("GRADBAL_GRAM_PLAN", None) is not None:
        print("note: GRADBAL_GRAM_PLAN is ignored here (the default plan is the code's default)")
    gram_mod = importlib.import_module("gradbal.kernels.gram")
    cuda = not interpreted
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        name = torch.cuda.get_device_name(device)
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
    else:
        name, l2 = "cpu (Triton interpreter: not a benchmark)", 0
    print(f"torch {torch.__version__}, device {name}, L2 {l2 / 2**20:.0f} MiB")
    copy_bytes = min(2**30, free_bytes(device) // 8) if cuda else 2**22
    copy = copy_bandwidth(copy_bytes, device, Timer(device, 20, 3, flush_l2=True))
    print(f"copy bandwidth ({copy_bytes / 2**20:.0f} MiB buffer): {copy:.1f} GB/s\n")

    rows_out: list[dict] = []
    summary, violations = [], []
    stopped = False
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        s = torch.empty(0, dtype=dtype).element_size()
        for k in args.ks:
            grid = plan_grid(gram_mod, k, dtype, args)
            for n in args.ns:
                if stopped:
                    break
                nbytes = k * n * s
                # Enough buffers that the L2 cache never holds the one read next (3 x L2).
                nbuf = max(1, math.ceil(3 * l2 / max(nbytes, 1)))
                if nbuf * nbytes + 2**30 > free_bytes(device):
                    print(f"(skipping K={k} N={n:.0e} {dtype_name}: not enough memory)")
                    continue
                bufs = [
                    torch.randn(k, n, device=device, dtype=torch.float32).to(dtype)
                    for _ in range(nbuf)
                ]
                t_group = time.perf_counter()
                g_default = None
                results = []
                for ov in grid:
                    if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                        stopped = True
                        break
                    plan = gram_mod.plan_gram(k, n, dtype, bufs[0], **ov)
                    turn = itertools.count()

                    def fn(plan=plan, turn=turn, bufs=bufs):
                        return gram_mod.gram(bufs[next(turn) % len(bufs)], plan=plan)

                    med, p20, p80, how = time_plan(fn, len(bufs), nbytes, device, args)
                    g = gram_mod.gram(bufs[0], plan=plan)
                    if g_default is None:
                        g_default = g
                    scale = g_default.abs().max().clamp_min(1e-300)
                    rel = float((g - g_default).abs().max() / scale)
                    ok = math.isfinite(rel) and rel <= REL_TOL
                    gbps = nbytes / (med * 1e-3) / 1e9
                    row = {
                        "device": name, "dtype": dtype_name, "K": k, "N": n,
                        "plan": describe(ov, gram_mod), "default": not ov,
                        "use_dot": plan.use_dot, "k_pad": plan.k_pad, "block": plan.block,
                        "unroll": plan.unroll, "num_programs": plan.num_programs,
                        "num_warps": plan.num_warps, "median_ms": f"{med:.4f}",
                        "p20_ms": f"{p20:.4f}", "p80_ms": f"{p80:.4f}", "GBps": f"{gbps:.1f}",
                        "copy_GBps": f"{copy:.1f}", "pct_of_copy": f"{100 * gbps / copy:.1f}",
                        "rel_err_vs_default": f"{rel:.3g}", "ok": ok, "timing": how,
                    }  # fmt: skip
                    rows_out.append(row)
                    results.append((med, ov, row))
                    if not ok:
                        violations.append(row)
                bufs.clear()  # free the store before the next one is made
                if cuda:
                    torch.cuda.empty_cache()
                if not results:
                    break
                best_ms, best_ov, best = min(results, key=lambda r: r[0])
                dflt = results[0][2]
                part = "" if len(results) == len(grid) else f" (partial: {len(results)} plans)"
                line = (
                    f"K={k:>2} N={n:.0e} {dtype_name}: best {best['pct_of_copy']:>5}% of copy "
                    f"[{describe(best_ov, gram_mod)}] {best_ms:.3f} ms; default "
                    f"{dflt['pct_of_copy']:>5}%; {len(results)} plans in "
                    f"{time.perf_counter() - t_group:.1f} s{part}"
                )
                print(line, flush=True)
                summary.append(line)
    elapsed = time.perf_counter() - t_start
    if stopped:
        print(f"\nstopped after {elapsed:.1f} s (--budget-s {args.budget_s}); the rest was skipped")
    print(f"\nsweep took {elapsed:.1f} s; %copy = K N s / median over {copy:.1f} GB/s")
    if violations:
        print(f"\n{len(violations)} plan(s) differ from the default plan's G by > {REL_TOL}:")
        for row in violations:
            print(
                f"  K={row['K']} N={row['N']} {row['dtype']} [{row['plan']}]: "
                f"{row['rel_err_vs_default']}"
            )
    else:
        print(f"every plan's G within {REL_TOL} (relative, max-norm) of the default plan's")
    if args.csv:
        write_csv(args.csv, FIELDS, rows_out)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
