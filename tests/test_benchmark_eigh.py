"""benchmarks/bench_eigh.py on a CPU machine: one tiny run under Triton's interpreter (the kernels
then run on CPU tensors), which goes through every provider, the error columns, the table and
the CSV; the numbers are the interpreter's, not a GPU's."""

from __future__ import annotations

import csv

import pytest

from tests._benchmarks import load_benchmark

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_eigh")


def test_one_tiny_run(bench, tmp_path, capsys):
    out = tmp_path / "eigh.csv"
    bench.main(["--ks", "2", "3", "--reps", "1", "--device", "cpu", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    names = {(int(r["K"]), r["provider"]) for r in rows}
    for order in ("cyclic", "parallel"):
        assert (3, f"eigh-{order}") in names and (2, f"aligned_mtl-{order}") in names
        assert (3, f"imtl_g-{order}") in names and (3, f"config-{order}") in names
        assert (2, f"imtl_g-{order}") not in names  # K = 2: the closed form runs, not a kernel
    assert {(k, "lapack") for k in (2, 3)} <= names
    # sweeps to convergence, from the kernels' torch twin: K = 2 is one exact rotation
    sweeps = {(int(r["K"]), r["kind"], r["provider"]): (r["sweeps"], r["max_sweeps"]) for r in rows}
    assert sweeps[(2, "random", "reference-cyclic")] == ("1", "1")
    assert all(0 < int(n) <= int(m) for (k, _, p), (n, m) in sweeps.items() if p.startswith("reference-"))
    # Each answer is checked against LAPACK / the method's torch ops as it is timed.
    assert all(float(r["err"]) <= 1e-12 for r in rows if r["err"] != ""), rows
    assert "graded: median us per call" in capsys.readouterr().out


def test_arguments(bench):
    args = bench.parse_args([])
    assert args.ks == [2, 3, 4, 8, 16, 32] and args.graph_calls == 8
    with pytest.raises(SystemExit):
        bench.parse_args(["--ks", "33"])
