"""The eigen methods' K x K kernels: the two Jacobi orders, timed and checked side by side.

``gradbal.kernels.jacobi_eigh`` and the whole-stage kernels built on its sweeps
(``aligned_mtl_weights``, ``imtl_g_weights``, ``config_weights``) take ``order="cyclic"``
(the default: one rotation at a time) or ``order="parallel"`` (K / 2 disjoint rotations per
round through register gathers; about an eighth of the reductions at K = 16, never timed on a
GPU). This script gives the numbers to choose the default by. For each K and each kind of
Gram matrix (``random``: J J^T of a Gaussian J [K, 3K]; ``graded``: its rows scaled over 8
decades, the KD case) it prints and writes, per provider:

* ``us``: median microseconds per call: replayed from a CUDA graph of ``--graph-calls`` calls
  (the kernel's device time, not the ~20 us Python launch path), or eager where the graph
  cannot capture (LAPACK's ``torch.linalg.eigh`` synchronises) and on the CPU;
* ``err``: for the decompositions, ``max |lambda - lambda_LAPACK| / max |lambda|`` (float64
  LAPACK on the CPU as the reference); for the weights, ``max |w - w_torch| / max |w_torch|``
  against the method's torch ops on the CPU (LAPACK's eigh).

* ``sweeps`` (rows ``reference-cyclic`` / ``reference-parallel``, on any machine): the sweeps
  the kernels run on that matrix before they stop at convergence, of ``max_sweeps``
  (``default_sweeps``), counted on the kernel's torch twin
  (``gradbal.kernels.eigh.reference_sweeps``; the Triton kernel itself is not needed).

Providers: ``eigh-cyclic`` / ``eigh-parallel`` (``jacobi_eigh``), ``<method>-cyclic`` /
``<method>-parallel`` for aligned_mtl, imtl_g and config, and ``lapack`` (``torch.linalg.eigh``
on the same device). On a machine without CUDA only ``lapack`` and the torch-op Jacobi method
(``torch-jacobi``, :func:`gradbal.solvers_qp.jacobi_eigh`) run, and it says so.

    python benchmarks/bench_eigh.py --csv benchmarks/results/bench_eigh_gpu.csv
    python benchmarks/bench_eigh.py --ks 4 16 --reps 20
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys

import torch
from gradbal.kernels import eigh  # (needs Triton: the kernels and the sweeps' torch twin)

# benchmarks/ on sys.path, however this file is run or loaded (as a script, or from a test)
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from _timing import graph_ms, time_ms

FIELDS = ["device", "K", "kind", "provider", "us", "err", "timing", "sweeps", "max_sweeps"]
KINDS = ("random", "graded")
ORDERS = ("cyclic", "parallel")
METHODS = ("aligned_mtl", "imtl_g", "config")


def gram_matrix(k: int, kind: str, seed: int = 0) -> torch.Tensor:
    """A float64 [k, k] Gram matrix J J^T of the given kind (CPU)."""
    gen = torch.Generator().manual_seed(1000 * seed + k)
    j = torch.randn(k, 3 * k, generator=gen, dtype=torch.float64)
    if kind == "graded":
        j = j * torch.logspace(-4, 4, k, dtype=torch.float64)[:, None]
    return j @ j.T


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def kernels_run_on(device: torch.device) -> bool:
    """CUDA, or the CPU under Triton's interpreter (``TRITON_INTERPRET=1``: the tests)."""
    return device.type == "cuda" or eigh.INTERPRETED


def providers(k: int, g: torch.Tensor, device: torch.device):
    """(name, call, error of its answer) for each provider that runs on ``device``."""
    from gradbal import get_method
    from gradbal.solvers_qp import jacobi_eigh as torch_jacobi

    cpu = g.cpu()
    lam_ref = torch.linalg.eigvalsh(cpu)
    out = []
    gd = g.to(device)
    out.append(("lapack", lambda: torch.linalg.eigh(gd), rel_err(torch.linalg.eigh(gd)[0], lam_ref)))
    if not kernels_run_on(device):
        out.append(("torch-jacobi", lambda: torch_jacobi(gd), rel_err(torch_jacobi(gd)[0], lam_ref)))
        return out
    from gradbal import kernels

    p = torch.ones(k, dtype=torch.float64, device=device)
    for order in ORDERS:
        def eigh(order=order):
            return kernels.jacobi_eigh(gd, order=order)

        out.append((f"eigh-{order}", eigh, rel_err(eigh()[0], lam_ref)))
    for name in METHODS:
        if name != "aligned_mtl" and k < 3:
            continue  # (their K = 2 closed forms run instead of a kernel)
        ref = get_method(name).weights(cpu, None)
        for order in ORDERS:
            if name == "aligned_mtl":
                def call(order=order):
                    return kernels.aligned_mtl_weights(gd, p, "min", order=order)
            elif name == "imtl_g":
                def call(order=order):
                    return kernels.imtl_g_weights(gd, order=order)
            else:
                def call(order=order):
                    return kernels.config_weights(gd, p, order=order)
            out.append((f"{name}-{order}", call, rel_err(call(), ref)))
    return out


def run(args, on_row=lambda row: None) -> list[dict]:
    """Every (K, kind, provider) row; ``on_row`` is called with each as it is measured."""
    device = torch.device(args.device)
    if not kernels_run_on(device):
        print("no CUDA device: the Triton kernels need one; timing LAPACK and the torch-op "
              "Jacobi method only", file=sys.stderr)  # fmt: skip
    rows = []
    for k in args.ks:
        for kind in KINDS:
            g = gram_matrix(k, kind)
            for order in ORDERS:
                row = {"device": "any", "K": k, "kind": kind, "provider": f"reference-{order}",
                       "us": "", "err": "", "timing": "", "sweeps": eigh.reference_sweeps(g, order=order),
                       "max_sweeps": eigh.default_sweeps(k, order)}  # fmt: skip
                rows.append(row)
                on_row(row)
                print(f"K={k:2d} {kind:7s} {order:8s} sweeps to convergence: {row['sweeps']} of "
                      f"{row['max_sweeps']}", flush=True)  # fmt: skip
            for name, call, err in providers(k, g, device):
                times = None
                if name != "lapack":
                    call()  # compile / warm the allocator outside any capture
                    times = graph_ms(call, device, args.reps, args.graph_calls)
                timing = "graph" if times is not None else "eager"
                if times is None:
                    times = time_ms(call, device, args.reps, 2)
                row = {"device": str(device), "K": k, "kind": kind, "provider": name,
                       "us": 1e3 * statistics.median(times), "err": err, "timing": timing,
                       "sweeps": "", "max_sweeps": ""}  # fmt: skip
                rows.append(row)
                on_row(row)
                print(f"K={k:2d} {kind:7s} {name:22s} {row['us']:10.1f} us ({timing})  err {err:.1e}",
                      flush=True)  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    ks = sorted({r["K"] for r in rows})
    print("\nsweeps run before convergence / default sweeps (the kernels' torch twin)")
    print(f"{'':22s}" + "".join(f"{'K=' + str(k):>12s}" for k in ks))
    for kind in KINDS:
        for order in ORDERS:
            cells = [next(f"{r['sweeps']} / {r['max_sweeps']}" for r in rows if r["K"] == k and
                          r["kind"] == kind and r["provider"] == f"reference-{order}") for k in ks]  # fmt: skip
            print(f"{kind + ' ' + order:22s}" + "".join(f"{c:>12s}" for c in cells))
    rows = [r for r in rows if not r["provider"].startswith("reference-")]
    names = list(dict.fromkeys(r["provider"] for r in rows))
    for kind in KINDS:
        print(f"\n{kind}: median us per call (err)")
        print(f"{'':22s}" + "".join(f"{'K=' + str(k):>20s}" for k in ks))
        for name in names:
            cells = []
            for k in ks:
                r = next((r for r in rows if r["K"] == k and r["kind"] == kind and r["provider"] == name), None)
                cells.append(f"{r['us']:9.1f} ({r['err']:.0e})" if r else "")
            print(f"{name:22s}" + "".join(f"{c:>20s}" for c in cells))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 8, 16, 32])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--graph-calls", type=int, default=8,
                   help="calls captured per CUDA graph replay (default 8)")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    if any(not 1 <= k <= 32 for k in args.ks):
        p.error("--ks: each K must be in [1, 32] (the kernels' range)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.csv:
        print_table(run(args))
        return
    # Row by row, so that a run cut by a time limit keeps what it measured.
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()

        def write(row):
            writer.writerow(row)
            f.flush()

        rows = run(args, write)
    print_table(rows)
    print(f"wrote {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
