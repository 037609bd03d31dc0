"""The K x K stage alone: every Gram-based method's ``Method.weights`` on a K x K Gram matrix.

Between the two passes over memory only K x K work runs, as small tensor ops. On a CPU each
small op costs ~1-2 us whatever its size and on a GPU each is a kernel launch, so the number
of ops is the cost. Per method and K this prints (and writes to CSV):

* ``ops``: top-level aten ops of one call (torch.profiler events whose parent is not an aten
  op: what Python dispatches; a GPU launches about one kernel per op);
* ``median_us`` / ``p20_us`` / ``p80_us``: wall time of one call, ``--reps`` calls in a loop
  after a warm-up (warm caches: the same call right after the passes runs slower, see
  bench_aggregate.py's K x K column).

The Gram matrix is ``J J^T`` of a random float64 J [K, 1000] (seeded); stateful methods keep
one instance across calls, as in training.

    python benchmarks/bench_weights.py --threads 1
    python benchmarks/bench_weights.py --ks 16 --methods upgrad cagrad --csv weights.csv

``--compile`` also times ``gradbal.compile_method(name).weights`` (the K x K stage through
``torch.compile``; on CUDA a stateless method replays as a CUDA graph) round-robin with the
eager call, and the first (compiling) call's wall time.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch
from torch.profiler import profile

try:  # run as a script (benchmarks/ on sys.path) or as benchmarks.bench_weights
    from _timing import interleaved_ms, quantiles, time_ms
except ImportError:
    from ._timing import interleaved_ms, quantiles, time_ms

FIELDS = ["device", "threads", "K", "method", "ops", "median_us", "p20_us", "p80_us", "compiled_us", "compile_s",
          "graphed_us"]


def count_ops(fn) -> int:
    """Top-level aten ops dispatched by one call of ``fn``."""
    with profile() as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def run(args, on_row=None) -> list[dict]:
    """Every (K, method) row; ``on_row(row)`` is called as each is measured."""
    import gradbal

    device = torch.device(args.device)
    names = args.methods or [
        m for m in gradbal.available_methods()
        if m != "weighted" and gradbal.get_method(m).needs_gram and not gradbal.get_method(m).elementwise
    ]
    rows = []
    for k in args.ks:
        gen = torch.Generator().manual_seed(k)
        j = torch.randn(k, 1000, generator=gen, dtype=torch.float64)
        gram = (j @ j.T).to(device)
        losses = (torch.rand(k, generator=gen, dtype=torch.float64) + 0.5).to(device)
        for name in names:
            method = gradbal.get_method(name)
            g = torch.Generator().manual_seed(0)

            def call(method=method, g=g, gram=gram, losses=losses):
                return method.weights(gram, losses, g)

            call()
            ops = count_ops(call) if args.ops else -1
            row = {"device": str(device), "threads": torch.get_num_threads(), "K": k,
                   "method": name, "ops": ops, "compiled_us": "", "compile_s": "", "graphed_us": ""}
            if args.compile:
                compiled = gradbal.compile_method(gradbal.get_method(name))
                gc = torch.Generator().manual_seed(0)

                def call_compiled(compiled=compiled, gc=gc, gram=gram, losses=losses):
                    return compiled.weights(gram, losses, gc)

                t0 = time.perf_counter()
                call_compiled()  # compiles
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["compile_s"] = time.perf_counter() - t0
                # Eager and compiled round-robin: their ratio compares like with like.
                eager_t, comp_t = interleaved_ms([call, call_compiled], device, args.reps, 3)
                row["compiled_us"] = quantiles(comp_t)[0] * 1e3
            elif args.graph:
                base = gradbal.get_method(name)
                if base.stateful or base.draws_random:
                    eager_t = time_ms(call, device, args.reps, 3)  # graph_method refuses these
                else:
                    graphed = gradbal.graph_method(base)

                    def call_graphed(graphed=graphed, gram=gram, losses=losses):
                        return graphed.weights(gram, losses, None)

                    call_graphed()  # captures
                    eager_t, graph_t = interleaved_ms([call, call_graphed], device, args.reps, 3)
                    row["graphed_us"] = quantiles(graph_t)[0] * 1e3
            else:
                eager_t = time_ms(call, device, args.reps, 3)
            med, p20, p80 = quantiles(eager_t)
            row.update(median_us=med * 1e3, p20_us=p20 * 1e3, p80_us=p80 * 1e3)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            extra = (f"  compiled {row['compiled_us']:9.1f} us (compile {row['compile_s']:.1f} s)"
                     if args.compile else f"  graphed {row['graphed_us']:9.1f} us"
                     if row["graphed_us"] != "" else "")
            print(f"K={k:2d} {name:12s} {ops:6d} ops {med * 1e3:9.1f} us" + extra, file=sys.stderr, flush=True)
    return rows


def _grid(rows: list[dict], title: str, width: int, cell) -> None:
    """One line per method, one column per K: ``cell(row)`` for each (method, K) row."""
    ks = sorted({r["K"] for r in rows})
    print(f"\n{title}")
    print(f"{'':14s}" + "".join(f"{'K=' + str(k):>{width}s}" for k in ks))
    for name in dict.fromkeys(r["method"] for r in rows):
        hits = [[r for r in rows if r["K"] == k and r["method"] == name] for k in ks]
        print(f"{name:14s}" + "".join(f"{cell(h[0]) if h else '-':>{width}s}" for h in hits))


def print_table(rows: list[dict]) -> None:
    _grid(rows, "Method.weights: top-level ops / median us", 16,
          lambda r: f"{r['ops']:>7d} / {r['median_us']:6.0f}")
    if any(r["graphed_us"] != "" for r in rows):
        _grid(rows, "graph_method(name).weights: eager / graphed, graphed median us", 18,
              lambda r: f"{r['median_us'] / r['graphed_us']:6.2f}x {r['graphed_us']:6.0f}"
              if r["graphed_us"] != "" else "-")
    if any(r["compiled_us"] != "" for r in rows):
        _grid(rows, "compile_method(name).weights: eager / compiled, compiled median us, compile s", 24,
              lambda r: f"{r['median_us'] / r['compiled_us']:5.2f}x {r['compiled_us']:6.0f} {r['compile_s']:5.1f}s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--methods", nargs="+", default=None, help="default: every Gram-based method")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--compile", action="store_true",
                   help="also time gradbal.compile_method(name).weights (torch.compile), round-robin with eager")
    p.add_argument("--graph", action="store_true",
                   help="also time gradbal.graph_method(name).weights (CUDA graph replay; eager on "
                   "CPU), round-robin with eager; stateful and random methods are skipped")
    p.add_argument("--no-ops", dest="ops", action="store_false",
                   help="skip counting the ops with the profiler (slow on CUDA); ops = -1")
    args = p.parse_args(argv)
    if args.compile and args.graph:
        p.error("--compile and --graph time different wrappers: pass one of them")
    if args.threads:
        torch.set_num_threads(args.threads)
    writer = None
    if args.csv:
        # Written row by row: a run stopped by a time limit (the GPU session's stages) keeps
        # what it measured.
        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
        f = open(args.csv, "w", newline="")  # noqa: SIM115 - closed below
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()

    def on_row(row):
        if writer is not None:
            writer.writerow(row)
            f.flush()

    try:
        rows = run(args, on_row)
    finally:
        if writer is not None:
            f.close()
    print_table(rows)


if __name__ == "__main__":
    main()
