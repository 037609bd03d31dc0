"""Plots of the benchmark CSVs, for looking instead of reading tables.

Reads every ``bench_*.csv`` and ``tune_gram*.csv`` in a results folder (the CPU ones committed in
benchmarks/results/, or a GPU session's copied there) and writes one PNG per CSV next to it
(or into ``--out``):

* ``bench_aggregate*.csv``: heatmaps of ``aggregate / floor`` per method and (K, N), coloured
  around the 1.2x target, and of ``torchjd / gradbal`` (> 1: gradbal faster) around 1;
* ``bench_weights*.csv``: top-level ops of the K x K stage against K per method (log scale),
  and, when the run had ``--compile``, the eager / compiled speed-up per method and K;
* ``bench_kernels*.csv``: each op's share of the measured copy bandwidth against N, one panel
  per dtype, one line per provider and K;
* ``bench_step*.csv``: each provider's step time relative to a plain step, with p20-p80;
* ``tune_gram*.csv``: per dtype, the Gram pass's % of copy bandwidth for each (K, N) with the
  plan that was the default during the sweep and with the sweep's fastest plan.

    python benchmarks/plot_results.py                       # benchmarks/results/*.csv
    python benchmarks/plot_results.py --results gpu_out --out benchmarks/results/plots
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os


def _rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v: str) -> float:
    return float(v) if v not in ("", None) else math.nan


def _heatmap(ax, values, rows, cols, center, title, better="low", fmt="{:.2f}"):
    """Annotated heatmap, green on the good side of ``center`` (``better``: "low" or
    "high"); the colours saturate at 1/3 and 3 times the centre so one outlier (a peer
    100x slower) does not wash out the rest."""
    from matplotlib.colors import TwoSlopeNorm

    finite = [v for line in values for v in line if not math.isnan(v)]
    lo = max(min(finite + [center * 0.9]), center / 3)
    hi = min(max(finite + [center * 1.1]), center * 3)
    cmap = "RdYlGn_r" if better == "low" else "RdYlGn"
    im = ax.imshow(values, cmap=cmap, norm=TwoSlopeNorm(center, lo, hi), aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, line in enumerate(values):
        for j, v in enumerate(line):
            if not math.isnan(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    return im


def plot_aggregate(rows: list[dict], out: str) -> None:
    import matplotlib.pyplot as plt

    configs = sorted({(int(r["N"]), int(r["K"])) for r in rows})
    cols = [f"K={k}, N={n:.0e}" for n, k in configs]
    ours = [r for r in rows if r["provider"] == "gradbal" and r["method"] != "floor"]
    # Gram-based methods only (the others skip the Gram pass and sit below the floor).
    names = sorted({r["method"] for r in ours if _num(r["ratio_to_floor"]) >= 0.9 and r["method"] != "graddrop"})
    cell = {(r["method"], int(r["N"]), int(r["K"])): r for r in ours}
    ratio = [[_num(cell[(m, n, k)]["ratio_to_floor"]) if (m, n, k) in cell else math.nan for n, k in configs] for m in names]
    peer = [[_num(cell[(m, n, k)]["torchjd_over_gradbal"]) if (m, n, k) in cell else math.nan for n, k in configs]
            for m in names]
    has_peer = any(not math.isnan(v) for line in peer for v in line)
    fig, axes = plt.subplots(1, 2 if has_peer else 1, figsize=(13 if has_peer else 7, 0.32 * len(names) + 2.2))
    axes = axes if has_peer else [axes]
    device = rows[0].get("device", "")
    _heatmap(axes[0], ratio, names, cols, 1.2, f"aggregate / floor ({device}; target <= 1.2)")
    if has_peer:
        _heatmap(axes[1], peer, names, cols, 1.0, "torchjd / gradbal (> 1: gradbal faster)", better="high")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def plot_weights(rows: list[dict], out: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ks = sorted({int(r["K"]) for r in rows})
    names = sorted({r["method"] for r in rows})
    by = {(r["method"], int(r["K"])): r for r in rows}
    # A second panel for the speed-up of a wrapper, when the run timed one.
    wrapper = next((c for c in ("compiled_us", "graphed_us") if any(r.get(c, "") not in ("", None) for r in rows)), None)
    compiled = wrapper is not None
    fig, axes = plt.subplots(1, 2 if compiled else 1, figsize=(13 if compiled else 7, 5.5))
    axes = axes if compiled else [axes]
    for name in names:
        # ops = -1: the run skipped counting them (--no-ops).
        pts = [(k, int(by[(name, k)]["ops"])) for k in ks if (name, k) in by and int(by[(name, k)]["ops"]) > 0]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    counted = any(int(r["ops"]) > 0 for r in rows)
    if not counted:
        axes[0].text(0.5, 0.5, "ops not counted in this run (--no-ops)", ha="center", transform=axes[0].transAxes)
    axes[0].set(xscale="log", yscale="log" if counted else "linear", xlabel="K",
                ylabel="top-level ops (GPU: kernel launches)",
                title=f"Method.weights: ops of the K x K stage ({rows[0].get('device', '')})")
    axes[0].set_xticks(ks, [str(k) for k in ks])
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(fontsize=6, ncol=2)
    if compiled:
        speed = [[_num(by[(m, k)]["median_us"]) / _num(by[(m, k)][wrapper]) if (m, k) in by else math.nan
                  for k in ks] for m in names]
        label = "compile_method: eager / compiled" if wrapper == "compiled_us" else "graph_method: eager / graphed"
        _heatmap(axes[1], speed, names, [f"K={k}" for k in ks], 1.0,
                 f"{label} time (> 1: wrapper faster)", better="high", fmt="{:.1f}x")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def plot_kernels(rows: list[dict], out: str) -> None:
    """One panel per (op, dtype): grouped bars of % of the measured copy bandwidth per K, one
    bar per provider, at the largest N of the CSV (the targets are for N >= 1e7); the 85%
    target line on the gram and combine panels."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("pct_of_copy", "") not in ("", None)]
    n_max = max(int(float(r["N"])) for r in rows)
    rows = [r for r in rows if int(float(r["N"])) == n_max]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    dtypes = sorted({r["dtype"] for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    ks = sorted({int(r["K"]) for r in rows})
    value = {(r["op"], r["dtype"], r["provider"], int(r["K"])): _num(r["pct_of_copy"]) for r in rows}
    fig, axes = plt.subplots(len(ops), len(dtypes), figsize=(5.5 * len(dtypes), 2.6 * len(ops)),
                             squeeze=False, sharey="row")
    width = 0.8 / max(1, len(providers))
    colors = {"triton": "tab:green", "torch": "tab:blue", "loop": "tab:grey", "torchjd": "tab:orange"}
    for i, op in enumerate(ops):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            for q, provider in enumerate(providers):
                xs = [x + (q - (len(providers) - 1) / 2) * width for x in range(len(ks))]
                ys = [value.get((op, dtype, provider, k), math.nan) for k in ks]
                ax.bar(xs, ys, width, label=provider, color=colors.get(provider))
            if op in ("gram", "combine"):
                ax.axhline(85, color="tab:red", linestyle="--", linewidth=1, label="target 85%")
            ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
            ax.set_title(f"{op}, {dtype}, N={n_max:.0e}", fontsize=9)
            if j == 0:
                ax.set_ylabel("% of copy bandwidth", fontsize=8)
            if i == 0 and j == len(dtypes) - 1:
                ax.legend(fontsize=7)
    fig.suptitle(f"bench_kernels ({rows[0].get('device', '')}): floor traffic / time, as % of the "
                 "measured device copy bandwidth", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_step(rows: list[dict], out: str) -> None:
    import matplotlib.pyplot as plt

    plain = _num(next(r for r in rows if r["provider"] == "plain")["median_ms"])
    names = [r["provider"] for r in rows]
    med = [_num(r["median_ms"]) / plain for r in rows]
    lo = [m - _num(r["p20_ms"]) / plain for m, r in zip(med, rows)]
    hi = [_num(r["p80_ms"]) / plain - m for m, r in zip(med, rows)]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.5))
    ax.barh(names, med, xerr=[lo, hi], color=["tab:green" if n.startswith("gradbal") else "tab:grey" for n in names])
    ax.axvline(1.8, color="tab:red", linestyle="--", linewidth=1, label="mokd target 1.8x")
    ax.invert_yaxis()
    ax.set(xlabel="step time / plain step (median, p20-p80)",
           title=f"K = 2 KD step ({rows[0].get('device', '')}, batch {rows[0].get('batch', '?')})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def plot_tune_gram(rows: list[dict], out: str) -> None:
    """One panel per dtype: for each (K, N), the default plan's and the fastest plan's % of the
    copy bandwidth, labelled with the fastest plan; the 85% target line."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("pct_of_copy", "") not in ("", None)]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        mine = [r for r in rows if r["dtype"] == dtype]
        configs = sorted({(int(r["K"]), int(float(r["N"]))) for r in mine})
        default, best, labels = [], [], []
        for k, n in configs:
            here = [r for r in mine if (int(r["K"]), int(float(r["N"]))) == (k, n)]
            top = max(here, key=lambda r: _num(r["pct_of_copy"]))
            dflt = [r for r in here if r["default"] in ("True", "true", "1")]
            default.append(_num(dflt[0]["pct_of_copy"]) if dflt else math.nan)
            best.append(_num(top["pct_of_copy"]))
            labels.append(top["plan"].replace("programs_per_sm", "pps").replace(",", "\n"))
        xs = range(len(configs))
        ax.bar([x - 0.2 for x in xs], default, 0.4, label="default plan", color="tab:grey")
        ax.bar([x + 0.2 for x in xs], best, 0.4, label="fastest plan", color="tab:green")
        for x, y, label in zip(xs, best, labels):
            ax.text(x + 0.2, y + 1, label, fontsize=5, ha="center", va="bottom")
        ax.axhline(85, color="tab:red", linestyle="--", linewidth=1, label="target 85%")
        ax.set_xticks(list(xs), [f"K={k}\nN={n:.0e}" for k, n in configs], fontsize=7)
        ax.set_ylabel("% of copy bandwidth", fontsize=8)
        ax.set_title(f"Gram pass plans, {dtype}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"tune_gram ({rows[0].get('device', '')}): the sweep's default plan against its "
                 "fastest plan per (K, N)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


PLOTTERS = {
    "bench_aggregate": plot_aggregate,
    "bench_weights": plot_weights,
    "bench_kernels": plot_kernels,
    "bench_step": plot_step,
    "tune_gram": plot_tune_gram,
}


def plot_folder(results: str, out: str | None = None) -> list[str]:
    """One PNG per recognised CSV in ``results``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    out = out or results
    os.makedirs(out, exist_ok=True)
    written = []
    paths = glob.glob(os.path.join(results, "bench_*.csv")) + glob.glob(os.path.join(results, "tune_gram*.csv"))
    for path in sorted(paths):
        name = os.path.splitext(os.path.basename(path))[0]
        kind = next((k for k in PLOTTERS if name.startswith(k)), None)
        rows = _rows(path)
        if kind is None or not rows:
            continue
        target = os.path.join(out, name + ".png")
        PLOTTERS[kind](rows, target)
        written.append(target)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--out", default=None, help="default: the results folder")
    args = p.parse_args(argv)
    for path in plot_folder(args.results, args.out):
        print(path)


if __name__ == "__main__":
    main()
