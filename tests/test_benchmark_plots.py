"""benchmarks/plot_results.py: every kind of benchmark CSV becomes a PNG (the committed CPU,
H100 and H200 results, with the H100 bench_kernels CSV replaced by a small synthetic one)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from tests._benchmarks import ROOT, load_benchmark

pytest.importorskip("matplotlib")



def _plot_results():
    return load_benchmark("plot_results")


def _kernels_csv(path: Path) -> None:
    fields = ["device", "op", "provider", "dtype", "K", "N", "median_ms", "p20_ms", "p80_ms",
              "bytes", "GBps", "copy_GBps", "pct_of_copy", "host_sync"]  # fmt: skip
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for dtype in ("fp32", "bf16"):
            for provider, pct in (("triton", 88.0), ("torch", 61.0)):
                for n in (1e6, 1e7):
                    w.writerow({"device": "cuda", "op": "gram", "provider": provider, "dtype": dtype, "K": 8,
                                "N": n, "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "bytes": 1,
                                "GBps": 1.0, "copy_GBps": 2.0, "pct_of_copy": pct, "host_sync": 0})


def _graphed_weights_csv(path: Path) -> None:
    """bench_weights --graph --no-ops: no op counts (-1), a graphed time for some rows."""
    fields = ["device", "threads", "K", "method", "ops", "median_us", "p20_us", "p80_us", "compiled_us",
              "compile_s", "graphed_us"]  # fmt: skip
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for k in (2, 4):
            for method, graphed in (("mokd", 20.0), ("pcgrad", "")):
                w.writerow({"device": "cuda", "threads": 1, "K": k, "method": method, "ops": -1, "median_us": 250.0,
                            "p20_us": 240.0, "p80_us": 260.0, "compiled_us": "", "compile_s": "",
                            "graphed_us": graphed})


def test_every_benchmark_csv_becomes_a_png(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    _kernels_csv(results / "bench_kernels_gpu.csv")
    _graphed_weights_csv(results / "bench_weights_graphed.csv")
    (results / "bench_unknown.csv").write_text("a,b\n1,2\n")  # not a benchmark this script knows
    written = _plot_results().plot_folder(str(results), str(tmp_path / "plots"))
    names = sorted(Path(p).name for p in written)
    found = [*results.glob("bench_*.csv"), *results.glob("tune_gram*.csv")]
    csvs = sorted(p.stem + ".png" for p in found if p.name != "bench_unknown.csv")
    assert "tune_gram_h200.png" in csvs  # the committed H200 sweep exercises its plotter
    assert names == csvs
    for p in written:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, p
