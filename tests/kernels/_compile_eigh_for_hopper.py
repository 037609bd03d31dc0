"""Compile gradbal's eigendecomposition kernel (``gradbal.kernels.eigh``) ahead of time for an
H100 (sm_90), without a GPU.

Run as a script in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces
``@triton.jit`` functions with objects that cannot be compiled), like
tests/kernels/_compile_for_hopper.py for the other kernels: Triton's compiler and its bundled
``ptxas`` lower the kernel to PTX and SASS for every K the wrapper launches here, which catches
what the interpreter lets through (float64 scalar/constant mixes in ``tl.where``, loops whose
carried values change type, ops without a lowering). Prints one line per variant and exits
non-zero if any failed.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 64)


def variants():
    """(name, kernel, signature, constexprs, options) for the launches jacobi_eigh makes."""
    eigh = importlib.import_module("gradbal.kernels.eigh")
    next_pow2 = importlib.import_module("gradbal.kernels._launch").next_pow2
    for k in [2, 3, 4, 8, 16, 32]:
        kp = max(2, next_pow2(k))
        for dt in (["fp64", "fp32"] if k in (4, 32) else ["fp64"]):
            sig = {
                "a_ptr": f"*{dt}", "stride_b": "i64", "stride_r": "i64", "stride_c": "i64",
                "w_ptr": "*fp64", "v_ptr": "*fp64", "sweeps": "i32",
                "K": "constexpr", "KP": "constexpr",
            }
            yield f"eigh {dt} K={k}", eigh._eigh_kernel, sig, {"K": k, "KP": kp}, \
                {"num_warps": eigh._num_warps(kp)}


#: Exit status when Triton finds no ptxas (a Triton build without the NVIDIA back end's tools):
#: the test skips rather than fails, since nothing about the kernel is then known.
NO_PTXAS = 77


def _have_ptxas() -> bool:
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path is not None
    except Exception:  # noqa: BLE001 - no NVIDIA back end, or a layout this script does not know
        return False


def main() -> int:
    if not _have_ptxas():
        print("SKIP: Triton finds no ptxas")
        return NO_PTXAS
    failed = 0
    count = 0
    for name, fn, sig, consts, options in variants():
        count += 1
        start = time.perf_counter()
        try:
            triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts), target=HOPPER, options=options
            )
        except Exception as err:  # noqa: BLE001 - report every failing variant, then fail
            failed += 1
            print(f"FAILED {name}: {type(err).__name__}: {str(err)[:500]}")
        else:
            print(f"ok {name} ({time.perf_counter() - start:.1f} s)")
    print(f"compiled {count - failed} of {count} kernel variants for sm_90 (triton {triton.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
