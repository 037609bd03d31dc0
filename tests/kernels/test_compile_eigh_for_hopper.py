"""The eigendecomposition kernel compiles for an H100 (sm_90) with the installed Triton, on any
machine.

The other CPU tests run it under Triton's interpreter, which accepts code the GPU back end
rejects. This test lowers every K the wrapper is checked at (2, 3, 4, 8, 16, 32; fp64 and fp32
input) to PTX and SASS with Triton's compiler and ptxas, in a subprocess without
``TRITON_INTERPRET`` (tests/kernels/_compile_eigh_for_hopper.py), the way
test_compile_for_hopper.py does for the other kernels. It proves the kernel builds, not that it
is fast or right on the GPU: the ``gpu`` test in test_kernel_eigh.py checks that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_compile_eigh_for_hopper.py")
ROOT = Path(__file__).resolve().parents[2]
NO_PTXAS = 77  # the script's exit status when Triton finds no ptxas


def test_eigh_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = proc.stdout + proc.stderr
    if proc.returncode == NO_PTXAS:
        pytest.skip(report.strip())
    assert proc.returncode == 0, report
    assert "compiled" in report and "FAILED" not in report, report
