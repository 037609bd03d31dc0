"""Distributed balancing: the library's all-reduce of the [K, N] store vs reduce-scatter +
partial Gram + all-gather, timed on gloo (CPU) with R processes (docs/DISTRIBUTED.md).

Per step and rank, for ring collectives (bytes sent = received; s bytes per element):

* ordinary DDP step: all-reduce of N            -> 2 (R-1)/R N s
* gradbal (current): all-reduce of K N          -> 2 (R-1)/R K N s             (K DDP steps)
* alternative: reduce-scatter of K N + all-reduce of K x K + all-gather of N
                                                -> (R-1)/R (K + 1) N s         ((K+1)/2 DDP steps)

Each pipeline is timed end to end (communication + Gram pass + weights + combine) and as
communication only, round-robin over the variants (so load drift hits all alike), median
of ``--repeat`` runs. "current" is the library's own path: gradbal.distributed.
average_objectives on a GradientStore (rows, K loss values, K x P reach flags), then the
Gram and combine passes over the full rows. "alternative" reduce-scatters row by row
(``alt_list_comm``: gloo's list form; ``alt_staged_comm``: rows copied rank-major, then one
reduce-scatter), then the Gram pass on the shards, the K x K all-reduce, the combine on the
shards and the all-gather.

    python benchmarks/bench_comm.py --world 2 --numel 262144,1048576,4194304 --k 2,3,4 --repeat 20

It starts ``--world`` processes of itself (gloo, one CPU thread each, file:// rendezvous in a
temporary folder); rank 0 prints one line per (N, K) and writes ``--csv`` if given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial

import torch
import torch.distributed as dist

from gradbal import _ops, distributed, get_method
from gradbal._store import GradientStore

# torch 2.14 renamed the flat-tensor collectives (the old names warn).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def make_store(numel: int, k: int, params_count: int = 8):
    sizes = [numel // params_count] * params_count
    sizes[-1] += numel - sum(sizes)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    store = GradientStore(params)
    store.allocate(k)
    gen = torch.Generator().manual_seed(dist.get_rank())
    store.groups[0].rows.copy_(torch.randn(k, numel, generator=gen))
    return store, params


def current(store, k, method, group, comm_only):
    g = store.groups[0]
    losses = torch.rand(k, dtype=torch.float64) + 0.5
    reached = [[True] * len(store.params) for _ in range(k)]
    losses, reached = distributed.average_objectives(store, losses, reached, group)
    if comm_only:
        return
    gram = _ops.gram(g.rows)
    w = method.weights(gram, losses)
    _ops.combine(g.rows, w, g.out)


def _scatter_rows(rows, shard, group, how):
    """Reduce-scatter so that rank r gets columns [r n/R, (r+1) n/R) of every objective."""
    world = dist.get_world_size(group)
    k, n = rows.shape
    if how == "rows":  # one reduce-scatter per objective
        for i in range(k):
            _reduce_scatter(shard[i], rows[i], group=group)
    elif how == "list":  # the same with gloo's list form (measured faster than the flat one)
        for i in range(k):
            dist.reduce_scatter(shard[i], list(rows[i].chunk(world)), group=group)
    else:  # "staged": rows laid out rank-major ([R, K, n/R], one copy), one reduce-scatter
        staged = rows.view(k, world, n // world).transpose(0, 1).contiguous()
        _reduce_scatter(shard.view(-1), staged.view(-1), group=group)


def alternative(rows, shard, out, k, method, group, comm_only, how="rows"):
    world = dist.get_world_size(group)
    losses = torch.rand(k, dtype=torch.float64) + 0.5
    dist.all_reduce(losses, group=group)
    _scatter_rows(rows, shard, group, how)
    shard.div_(world)
    gram = _ops.gram(shard) if not comm_only else torch.zeros(k, k, dtype=torch.float64)
    dist.all_reduce(gram, group=group)
    if comm_only:
        _all_gather(out, shard[0], group=group)
        return
    w = method.weights(gram, losses / world)
    local = torch.empty(shard.shape[1])
    _ops.combine(shard, w, local)
    _all_gather(out, local, group=group)


def ddp_step(flat, group):
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))


def worker(rank, world, init, numels, ks, repeat, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = dist.group.WORLD
    method = get_method("mgda")
    rows_out = []
    for numel in numels:
        numel -= numel % world
        flat = torch.randn(numel)
        for k in ks:
            store, _ = make_store(numel, k)
            rows = torch.randn(k, numel)
            shard = torch.empty(k, numel // world)
            out = torch.empty(numel)
            alt = partial(alternative, rows, shard, out, k, method, group)
            variants = {
                "ddp_step": partial(ddp_step, flat, group),
                "current": partial(current, store, k, method, group, False),
                "alternative": partial(alt, False),
                "current_comm": partial(current, store, k, method, group, True),
                "alternative_comm": partial(alt, True),
                "alt_list_comm": partial(alt, True, "list"),
                "alt_staged_comm": partial(alt, True, "staged"),
            }
            times = {name: [] for name in variants}
            for it in range(repeat + 3):
                for name, fn in variants.items():
                    dist.barrier(group)
                    t = time.perf_counter()
                    fn()
                    dist.barrier(group)  # the step ends when every rank has its gradient
                    if it >= 3:
                        times[name].append(time.perf_counter() - t)
            med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
            if rank == 0:
                rows_out.append((numel, k, med))
                cells = "  ".join(f"{n} {v:8.2f} ms" for n, v in med.items())
                print(f"N={numel:>9} K={k}  {cells}", flush=True)
    if rank == 0 and out_path:
        with open(out_path, "w") as f:
            f.write("numel,k," + ",".join(rows_out[0][2]) + "\n")
            for numel, k, med in rows_out:
                f.write(f"{numel},{k}," + ",".join(f"{v:.3f}" for v in med.values()) + "\n")
    dist.barrier(group)
    sys.stdout.flush()
    os._exit(0)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--numel", default="262144,1048576,4194304")
    parser.add_argument("--k", default="2,3,4")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--csv", default="")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--init", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    numels = [int(v) for v in args.numel.split(",")]
    ks = [int(v) for v in args.k.split(",")]
    if args.rank is not None:
        worker(args.rank, args.world, args.init, numels, ks, args.repeat, args.csv)
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        procs = [
            subprocess.Popen([sys.executable, os.path.abspath(__file__), "--world", str(args.world),
                              "--numel", args.numel, "--k", args.k, "--repeat", str(args.repeat),
                              "--csv", args.csv, "--rank", str(r), "--init", init])
            for r in range(args.world)
        ]
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
