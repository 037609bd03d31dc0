"""benchmarks/tune_gram.py on a CPU machine: its argument parsing and plan grid, the "needs
CUDA" exit, and one tiny sweep under Triton's interpreter (hidden --device cpu), which runs
the whole loop (timing, comparison with the default plan, budget stop, CSV) without a GPU."""

from __future__ import annotations

import csv
import importlib

import pytest
import torch

from tests._benchmarks import load_benchmark

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def tune():
    return load_benchmark("tune_gram")


@pytest.fixture(scope="module")
def gram_mod():
    return importlib.import_module("gradbal.kernels.gram")


def test_parse_args(tune):
    args = tune.parse_args([])
    assert args.ks == [2, 4, 8, 16] and args.ns == [10**7, 10**8]
    assert args.dtypes == ["fp32", "bf16"] and args.unrolls == [1, 2, 4, 8]
    assert args.programs_per_sm == [1, 2, 4, 8] and args.fma_lanes == [4096, 8192, 16384]
    assert args.dot == "both" and args.budget_s == 120.0 and args.graph_calls == 8
    args = tune.parse_args(["--ns", "1e3, 20011", "--dtypes", "bf16", "--dot", "auto"])
    assert args.ns == [1000, 20011] and args.dtypes == ["bf16"] and args.dot == "auto"
    with pytest.raises(SystemExit):
        tune.parse_args(["--dtypes", "fp64"])


def test_plan_grid(tune, gram_mod, monkeypatch):
    monkeypatch.delenv("GRADBAL_GRAM_PLAN", raising=False)
    args = tune.parse_args([])
    # fma default, K < 8: the default plan, then 4 unrolls x 4 programs/SM x 3 lane counts.
    grid = tune.plan_grid(gram_mod, 2, torch.float32, args)
    assert grid[0] == {} and len(grid) == 1 + 48
    # bf16 K = 16 (dot by default): 16 dot plans (fma_lanes does not apply) + 48 forced fma.
    grid = tune.plan_grid(gram_mod, 16, torch.bfloat16, args)
    assert len(grid) == 1 + 16 + 48
    assert sum(ov.get("use_dot") is False for ov in grid) == 48
    assert not any("fma_lanes" in ov for ov in grid if "use_dot" not in ov)
    # Every entry is a valid plan_gram override set.
    for ov in grid:
        gram_mod.plan_gram(16, 10**7, torch.bfloat16, **ov)
    args = tune.parse_args(["--dot", "off", "--unrolls", "2"])
    assert tune.plan_grid(gram_mod, 32, torch.float32, args) == [{}]  # no fma above K = 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only exit")
def test_needs_cuda(tune, capsys):
    assert tune.main(["--ks", "2"]) == 0
    assert "needs CUDA" in capsys.readouterr().out


def test_tiny_sweep_under_the_interpreter(tune, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADBAL_GRAM_PLAN", "unroll=2")  # ignored: the default is the code's
    out = tmp_path / "tune.csv"
    argv = ["--device", "cpu", "--ks", "2,8", "--ns", "3001", "--dtypes", "fp32,bf16",
            "--unrolls", "1,4", "--programs-per-sm", "1", "--fma-lanes", "4096",
            "--reps", "1", "--warmup", "1", "--csv", str(out)]  # fmt: skip
    assert tune.main(argv) == 0
    text = capsys.readouterr().out
    assert "GRADBAL_GRAM_PLAN is ignored" in text
    assert text.count("best") == 4 and "every plan's G within" in text
    rows = list(csv.DictReader(out.open()))
    # K = 2: default + 2 plans; K = 8: default + 2 fma + 2 dot (--dot both), per dtype.
    assert len(rows) == 2 * (3 + 5)
    assert all(r["ok"] == "True" and r["timing"] == "eager" for r in rows)
    assert {r["plan"] for r in rows} >= {"default", "unroll=4,programs_per_sm=1,fma_lanes=4096"}
    # A budget already spent: nothing is timed, the CSV is still written (header only).
    assert tune.main([*argv[:-1], str(tmp_path / "empty.csv"), "--budget-s", "1e-9"]) == 0
    assert "stopped after" in capsys.readouterr().out
    assert list(csv.DictReader((tmp_path / "empty.csv").open())) == []
