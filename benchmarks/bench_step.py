"""Step time of a K = 2 distillation step (cross-entropy + KL to fixed teacher logits).

Student: torchvision ResNet-18 (random init, 100 classes) on a batch of B x 3 x S x S.
Providers are timed round-robin in one process (each repeat runs every provider once, so
machine noise hits all alike); peak memory is measured for each in a subprocess of its own:

* ``plain``    : ``(ce + kl).backward(); opt.step()`` -- the baseline every ratio is to.
* ``floor``    : ``ce.backward(retain_graph=True); kl.backward(); opt.step()`` -- one forward
                 and K backward passes, the floor of any exact method (no balancing at all).
* ``gradbal-*``: ``MultiObjectiveOptimizer(method=...)``: K backward passes into the flat
                 store, one Gram pass, K x K solve, one combine pass.
* ``two-grad`` : two ``torch.autograd.grad`` calls, ``torch.cat``, Gram, MoKD weights, combine,
                 copy back into ``.grad`` (the naive exact path).
* ``torchjd-upgrad`` / ``torchjd-mgda``: ``torchjd.autojac.backward`` + ``jac_to_grad``
                 (only when torchjd is installed).

Prints a table (median / p20 / p80 ms, ratio to plain, peak memory) and writes a CSV. For
gradbal it also times the balancing work alone (Gram + solve + combine on the live store)
as a share of the step.

    python benchmarks/bench_step.py --csv benchmarks/results/bench_step_cpu.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

try:  # run as a script (benchmarks/ on sys.path) or as benchmarks.bench_step
    from _timing import quantiles
except ImportError:
    from ._timing import quantiles

PROVIDERS = ["plain", "floor", "gradbal-mokd", "gradbal-pcgrad", "gradbal-mgda", "two-grad", "torchjd-upgrad", "torchjd-mgda"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, device):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=100).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    teacher_logits = torch.randn(args.batch, 100, device=device)
    return model, x, y, teacher_logits


def losses_of(model, x, y, teacher_logits):
    out = model(x)
    ce = F.cross_entropy(out, y)
    kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean", log_target=True)
    return ce, kl


def make_step(provider, model, x, y, t):
    import gradbal

    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if provider == "plain":
        def step():
            sgd.zero_grad()
            ce, kl = losses_of(model, x, y, t)
            (ce + kl).backward()
            sgd.step()
        return step, None
    if provider == "floor":  # the cost floor of any exact method: 1 forward, K backwards
        def step():
            sgd.zero_grad()
            ce, kl = losses_of(model, x, y, t)
            ce.backward(retain_graph=True)
            kl.backward()
            sgd.step()
        return step, None
    if provider.startswith("gradbal-"):
        opt = gradbal.MultiObjectiveOptimizer(sgd, provider.split("-", 1)[1], nonfinite="ignore")

        def step():
            opt.zero_grad()
            opt.backward(list(losses_of(model, x, y, t)))
            opt.step()
        return step, opt
    if provider == "two-grad":
        mokd = gradbal.get_method("mokd")

        def step():
            sgd.zero_grad()
            ce, kl = losses_of(model, x, y, t)
            g1 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ce, params, retain_graph=True)])
            g2 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params)])
            rows = torch.stack([g1, g2])
            gram = (rows @ rows.T).double()
            w = mokd.weights(gram, torch.stack([ce.detach(), kl.detach()]).double()).to(rows.dtype)
            flat = w @ rows
            offset = 0
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            sgd.step()
        return step, None
    if provider.startswith("torchjd-"):
        from torchjd import autojac
        from torchjd.aggregation import MGDA, UPGrad

        aggregator = UPGrad() if provider.endswith("upgrad") else MGDA()

        def step():
            sgd.zero_grad()
            ce, kl = losses_of(model, x, y, t)
            autojac.backward([ce, kl])
            autojac.jac_to_grad(params, aggregator)
            sgd.step()
        return step, None
    raise ValueError(provider)


def time_it(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def balancing_share(opt, device, repeats):
    """Time Gram + weights + combine alone on the live store (the work between backwards)."""
    from gradbal import _ops

    store = opt._store
    losses = opt.last_stats.losses

    def work():
        gram = sum(_ops.gram(g.rows) for g in store.groups)
        w = opt.method.weights(gram, losses, opt.generator)
        for g in store.groups:
            _ops.combine(g.rows, w, g.out)

    return statistics.median(time_it(work, device, 2, repeats))


def run_one(provider, args):
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model, x, y, t = build(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, _ = make_step(provider, model, x, y, t)
    time_it(step, device, 1, 2)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(json.dumps({"provider": provider, "peak_mib": peak}))


def time_round_robin(providers, args):
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model, x, y, t = build(args, device)
    steps = {p: make_step(p, model, x, y, t) for p in providers}
    times = {p: [] for p in providers}
    for p, (step, _) in steps.items():
        time_it(step, device, args.warmup, 0)
    for _ in range(args.repeats):
        for p, (step, _) in steps.items():
            times[p] += time_it(step, device, 0, 1)
    balance = {
        p: balancing_share(opt, device, max(3, args.repeats // 2))
        for p, (_, opt) in steps.items() if opt is not None
    }
    return times, balance


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--csv", default=None, help="write the table to this CSV file")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        return run_one(args._one, args)

    try:
        import torchjd  # noqa: F401
        have_torchjd = True
    except ImportError:
        have_torchjd = False
    providers = [p for p in args.providers.split(",") if have_torchjd or not p.startswith("torchjd")]
    if not have_torchjd:
        print("torchjd not installed: skipping its providers (pip install torchjd)")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# ResNet-18, batch {args.batch}x3x{args.size}x{args.size}, K=2 (CE + KL), device {args.device} "
          f"({device_name}), {args.threads} threads, torch {torch.__version__}, {args.repeats} repeats")
    # Memory first: on Linux a child's ru_maxrss starts from its parent's RSS at fork time,
    # so the children must be spawned before this process grows.
    rows = []
    for provider in providers:
        cmd = [sys.executable, __file__, "--_one", provider] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("_one", "csv", "providers")
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{provider}: failed\n{proc.stderr[-2000:]}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    times, balance = time_round_robin([r["provider"] for r in rows], args)
    for row in rows:
        row["times"] = times[row["provider"]]
        if row["provider"] in balance:
            row["balance_ms"] = balance[row["provider"]]
    base = statistics.median(next(r["times"] for r in rows if r["provider"] == "plain"))
    header = f"{'provider':<16} {'median ms':>10} {'p20':>8} {'p80':>8} {'x plain':>8} {'peak MiB':>9} {'balance %':>9}"
    print(header)
    print("-" * len(header))
    table = []
    for r in rows:
        med, p20, p80 = quantiles(r["times"])
        share = 100 * r["balance_ms"] / med if "balance_ms" in r else None
        table.append({"provider": r["provider"], "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                      "ratio_to_plain": med / base, "peak_mib": r["peak_mib"],
                      "balance_pct": share, "device": args.device, "device_name": device_name,
                      "batch": args.batch, "size": args.size, "threads": args.threads,
                      "torch": torch.__version__})
        print(f"{r['provider']:<16} {med:>10.1f} {p20:>8.1f} {p80:>8.1f} {med / base:>8.2f} "
              f"{r['peak_mib']:>9.0f} {'' if share is None else f'{share:.1f}':>9}")
    if args.csv:
        import os

        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
