"""The Triton kernels compile for an H100 (sm_90) with the installed Triton, on any machine.

Every other CPU test runs the kernels under Triton's interpreter, which accepts code the GPU
back end rejects (dtype mixes, ops without a lowering, constexpr misuse). This test lowers
every launch variant the wrappers make to PTX and SASS with Triton's compiler and bundled
ptxas, in a subprocess without ``TRITON_INTERPRET`` (tests/kernels/_compile_for_hopper.py).
It proves the kernels build, not that they are fast or right on the GPU: the ``gpu`` tests
check that where a GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("_compile_for_hopper.py")
ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "compiled" in report and "FAILED" not in report, report
