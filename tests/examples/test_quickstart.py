"""The quickstart (README's main job) in its reduced CI form: distilled students must win.

Runs ``examples/quickstart.py --quick`` (3 seeds, 400 student steps, nothing downloaded)
in-process and checks, on the mean over the seeds, that classic KD and MoKD each beat the
from-scratch student by more than the larger of the two standard deviations.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def load_quickstart():
    spec = importlib.util.spec_from_file_location("gradbal_quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    result = load_quickstart().main(["--quick", "--quiet", "--out", str(out)])
    result["out"] = out
    return result


def test_distilled_students_beat_scratch_by_more_than_the_spread(quick_result):
    rows = quick_result["rows"]
    assert set(rows) == {"scratch", "kd", "mokd"}
    scratch = rows["scratch"]
    report = {n: (round(100 * r["mean"], 2), round(100 * r["std"], 2)) for n, r in rows.items()}
    for name in ("kd", "mokd"):
        margin = rows[name]["mean"] - scratch["mean"]
        spread = max(rows[name]["std"], scratch["std"])
        assert margin > spread, f"{name}: margin {margin:.4f} <= spread {spread:.4f}; {report}"
        assert rows[name]["diverged"] == 0
    assert quick_result["teacher_acc"] > 0.95


def test_outputs_and_measured_diagnostics(quick_result):
    out = quick_result["out"]
    assert (out / "quickstart.png").stat().st_size > 10_000
    assert (out / "quickstart.json").exists()
    runs = quick_result["runs"]
    assert len(runs["mokd"]) == 3
    steps = int(quick_result["args"]["steps"])
    for run in runs["mokd"]:
        assert len(run.cosines) == len(run.ratios) == len(run.pis) == steps
        assert all(abs(sum(pi) - 1) < 1e-6 and min(pi) >= -1e-9 for pi in run.pis)
        assert all(-1.0001 <= c <= 1.0001 for step in run.cosines for c in step)
        assert all(math.isfinite(r) and r > 0 for step in run.ratios for r in step)
    for rows in quick_result["rows"].values():
        assert rows["ms_per_step"] > 0


def test_bad_arguments_are_refused():
    qs = load_quickstart()
    with pytest.raises(ValueError, match="--n-train"):
        qs.load_data(5)
    with pytest.raises(SystemExit):
        qs.parse_args(["--magnitude", "huge"])
