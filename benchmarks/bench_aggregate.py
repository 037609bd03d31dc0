"""Aggregation table: every method's ``gradbal.aggregate`` on a materialised [K, N] matrix.

For each K and N the script times, on the same fp32 [K, N] matrix of task gradients:

* ``floor``   : the two passes alone, ``gradbal._ops.gram`` then ``gradbal._ops.combine``
                with fixed weights: what any Gram-based method must cost at least;
* ``<method>``: ``gradbal.aggregate(rows, method, losses=..., generator=...)`` for every
                registered method, and its K x K part alone (``Method.weights`` on the
                Gram matrix, column ``weights_ms``). Methods that never read G (sum, mean,
                rlw, the loss-based ones: ``Method.needs_gram = False``) skip the Gram pass,
                so they run below the floor; ``graddrop`` runs its own elementwise pass
                instead of the weighted combine (no TorchJD peer);
* ``torchjd`` : TorchJD's aggregator of the same name on the same matrix, when
                ``import torchjd`` works and the aggregator's optional solver is installed.

With ``--compile`` each Gram-based method runs as ``gradbal.compile_method(name)`` (its K x K
stage through ``torch.compile``; the warm-up calls compile it), column ``compiled`` in the CSV.
With ``--graph`` (CUDA) each method that a CUDA graph can replay (stateless, drawing nothing
from the generator) runs as ``gradbal.graph_method(name)``, column ``graphed``; the others
run as they are (on CPU every method does: graphs are CUDA's).

It prints, per method, the ratio ``aggregate / floor`` (target: <= 1.2 for Gram-based
methods) and ``torchjd / gradbal`` (> 1: gradbal is faster), and writes every row
(median / p20 / p80 ms) to a CSV file.

Timing (benchmarks/_timing.py): CUDA events (after a warm-up) on a GPU, perf_counter on CPU.
Each method is timed round-robin with the floor and its K x K part (and TorchJD's aggregator
with the method),
so each ratio compares timings taken side by side; the floor row is the median over all of
them. ``aggregate`` writes into a preallocated ``out=`` buffer, as the floor does (and as the
optimizer writes into its store). Stateful methods keep one instance across repetitions, as
in training. ``--threads`` sets torch's CPU threads for
the whole run (default: torch's own); on a shared machine ``--threads 1`` avoids OpenMP
stalls on the tiny K x K ops.

    python benchmarks/bench_aggregate.py --csv benchmarks/results/bench_aggregate.csv
    python benchmarks/bench_aggregate.py --ks 4 --ns 1e6 --methods upgrad cagrad --reps 5
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import warnings

import torch

try:  # run as a script (benchmarks/ on sys.path) or as benchmarks.bench_aggregate
    from _timing import interleaved_ms, quantiles
except ImportError:
    from ._timing import interleaved_ms, quantiles

FIELDS = [
    "device", "threads", "K", "N", "method", "provider", "median_ms", "p20_ms", "p80_ms",
    "weights_ms", "ratio_to_floor", "torchjd_over_gradbal", "compiled", "graphed",
]

# gradbal name -> TorchJD 0.18 aggregator (same defaults where they exist)
TORCHJD = {
    "upgrad": lambda a, k: a.UPGrad(),
    "dualproj": lambda a, k: a.DualProj(),
    "cagrad": lambda a, k: a.CAGrad(c=0.5),
    "imtl_g": lambda a, k: a.IMTLG(),
    "aligned_mtl": lambda a, k: a.AlignedMTL(),
    "config": lambda a, k: a.ConFIG(),
    "nash_mtl": lambda a, k: a.NashMTL(n_tasks=k),
    "fairgrad": lambda a, k: a.FairGrad(alpha=1.0),
    "gradvac": lambda a, k: a.GradVac(),
    "mgda": lambda a, k: a.MGDA(),
    "pcgrad": lambda a, k: a.PCGrad(),
    "rlw": lambda a, k: a.Random(),
    "mean": lambda a, k: a.Mean(),
    "sum": lambda a, k: a.Sum(),
}


def method_options(name: str, k: int) -> dict:
    return {"weighted": {"weights": [1.0] * k}}.get(name, {})


def bench_config(args, k: int, n: int, methods: list[str], tjd) -> list[dict]:
    """All rows for one (K, N): the floor, every method, and TorchJD's aggregators."""
    import gradbal
    from gradbal import _ops
    from gradbal.methods import get_method

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(k, n, generator=gen).to(device)
    # correlated rows with norms spread over two decades, like real task gradients
    rows[1:] += 0.3 * rows[:1]
    rows *= torch.logspace(-1, 1, k).to(device).unsqueeze(1)
    losses = (torch.rand(k, generator=gen, dtype=torch.float64) + 0.5).to(device)
    out = torch.empty(n, dtype=rows.dtype, device=device)
    w_fixed = torch.full((k,), 1.0 / k, dtype=torch.float64, device=device)

    def floor():
        _ops.gram(rows)
        return _ops.combine(rows, w_fixed, out)

    gram = _ops.gram(rows)
    base = {"device": str(device), "threads": torch.get_num_threads(), "K": k, "N": n, "compiled": False, "graphed": False}
    floor_times: list[float] = []
    result = []
    for name in methods:
        m = get_method(name, **method_options(name, k))
        if args.compile and m.needs_gram and not m.elementwise:
            # The warm-up calls compile it (once per K).
            m = gradbal.compile_method(m)
        elif args.graph and device.type == "cuda" and m.needs_gram and not (m.elementwise or m.stateful or m.draws_random):
            # The warm-up calls capture it (once per K).
            m = gradbal.graph_method(m)
        g = torch.Generator().manual_seed(1)
        gram_arg = gram if m.requires_task_gradients else None

        def step(m=m, g=g):
            # Into a preallocated output, as the floor and the optimizer's store write.
            return gradbal.aggregate(rows, m, losses=losses, generator=g, validate=False, out=out)

        def weights_only(m=m, g=g, gram_arg=gram_arg):
            return m.weights(gram_arg, losses, g)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The floor is timed side by side with each method, so that each ratio compares
            # timings taken under the same machine load.
            f_times, s_times, w_times = interleaved_ms(
                [floor, step, weights_only], device, args.reps, args.warmup
            )
        w_med = statistics.median(w_times)
        floor_times += f_times
        med, p20, p80 = quantiles(s_times)
        row = {**base, "method": name, "provider": "gradbal", "compiled": isinstance(m, gradbal.CompiledMethod),
               "graphed": isinstance(m, gradbal.GraphedMethod),
               "median_ms": med, "p20_ms": p20,
               "p80_ms": p80, "weights_ms": w_med,
               "ratio_to_floor": med / statistics.median(f_times), "torchjd_over_gradbal": ""}
        result.append(row)
        if tjd is not None and name in TORCHJD and not args.no_torchjd:
            try:
                agg = TORCHJD[name](tjd, k)
            except ImportError as err:
                print(f"torchjd {name}: {err}", file=sys.stderr)
                agg = None
            if agg is not None:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    ours, theirs = interleaved_ms(
                        [step, lambda agg=agg: agg(rows)], device, args.peer_reps, 1
                    )
                t_med, t20, t80 = quantiles(theirs)
                row["torchjd_over_gradbal"] = t_med / statistics.median(ours)
                result.append({**base, "method": name, "provider": "torchjd", "median_ms": t_med,
                               "p20_ms": t20, "p80_ms": t80, "weights_ms": "",
                               "ratio_to_floor": "", "torchjd_over_gradbal": row["torchjd_over_gradbal"]})
        peer = row["torchjd_over_gradbal"]
        print(f"K={k:2d} N={n:.0e} {name:15s} {med:9.2f} ms  x{row['ratio_to_floor']:5.2f} floor"
              + (f"  torchjd x{peer:.2f}" if peer != "" else ""), file=sys.stderr, flush=True)
    f_med, f20, f80 = quantiles(floor_times)
    result.insert(0, {**base, "method": "floor", "provider": "gradbal", "median_ms": f_med,
                      "p20_ms": f20, "p80_ms": f80, "weights_ms": 0.0, "ratio_to_floor": 1.0,
                      "torchjd_over_gradbal": ""})
    return result


def run(args, on_config=None) -> list[dict]:
    """Every row; ``on_config(rows)`` is called with each (K, N)'s rows as they are done."""
    import gradbal

    try:
        import torchjd.aggregation as tjd
    except ImportError:
        tjd = None
        print("torchjd is not installed: no peer column", file=sys.stderr)
    methods = args.methods or [m for m in gradbal.available_methods() if m != "weighted"]
    rows_out = []
    for n in args.ns:
        for k in args.ks:
            rows = bench_config(args, k, n, methods, tjd)
            if on_config is not None:
                on_config(rows)
            rows_out += rows
    return rows_out


def print_tables(rows: list[dict]) -> None:
    configs = sorted({(r["N"], r["K"]) for r in rows})
    header = " ".join(f"K={k},N={n:.0e}".rjust(14) for n, k in configs)
    floor = {(r["N"], r["K"]): r["median_ms"] for r in rows if r["method"] == "floor"}
    print("\nfloor (gram + combine), ms")
    print(f"{'':16s}{header}")
    print(f"{'floor':16s}" + " ".join(f"{floor[c]:14.2f}" for c in configs))
    methods = [r["method"] for r in rows if r["provider"] == "gradbal" and r["method"] != "floor"]
    methods = list(dict.fromkeys(methods))
    for title, key, provider in (
        ("gradbal.aggregate / floor", "ratio_to_floor", "gradbal"),
        ("K x K part (Method.weights), ms", "weights_ms", "gradbal"),
        ("torchjd / gradbal (same method, same matrix)", "torchjd_over_gradbal", "torchjd"),
    ):
        print(f"\n{title}")
        print(f"{'':16s}{header}")
        for name in methods:
            cells = []
            for c in configs:
                hit = [r for r in rows if (r["N"], r["K"]) == c and r["method"] == name and r["provider"] == provider]
                v = hit[0][key] if hit else ""
                cells.append(f"{v:14.2f}" if isinstance(v, float) else f"{'-':>14s}")
            if any(cell.strip() != "-" for cell in cells):
                print(f"{name:16s}" + " ".join(cells))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--ns", type=float, nargs="+", default=[1e6, 4e6])
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--peer-reps", type=int, default=3, help="repetitions for TorchJD (slow solvers)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-torchjd", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="run each Gram-based method as gradbal.compile_method(name) (torch.compile)")
    p.add_argument("--graph", action="store_true",
                   help="replay each replayable method's K x K stage from a CUDA graph (gradbal.graph_method)")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    args.ns = [int(n) for n in args.ns]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.node()} {platform.processor() or platform.machine()} torch {torch.__version__} "
          f"device {args.device} threads {torch.get_num_threads()} reps {args.reps}", file=sys.stderr)

    def on_config(rows):
        # Appended per (K, N): a run stopped by a time limit (the GPU session's stages) keeps
        # the configurations it finished.
        if not args.csv:
            return
        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    print_tables(run(args, on_config))


if __name__ == "__main__":
    main()
