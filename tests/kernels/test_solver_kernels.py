"""gradbal._solver_kernels: the one rule that decides when a K x K kernel (jacobi_eigh, min_norm,
mokd_weights, dual_cone, ..., the spectral methods' kernels) runs, and the one-warning fallback
when it fails."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from _small_k import FakeCuda

from gradbal import _solver_kernels
from gradbal._solver_kernels import (
    ALIGNED_MTL,
    CAGRAD,
    CONFIG,
    DUAL_CONE,
    EIGH,
    FAIR,
    GRADVAC,
    IMTL_G,
    MAX_K,
    MGDA_NORMALIZED,
    MIN_NORM,
    MOKD_WEIGHTS,
    PCGRAD,
    SolverKernel,
)

ALL = [EIGH, MIN_NORM, MOKD_WEIGHTS, MGDA_NORMALIZED, DUAL_CONE, FAIR, PCGRAD, GRADVAC, CAGRAD, ALIGNED_MTL, IMTL_G,
       CONFIG]  # fmt: skip


def test_max_k_is_the_kernels():
    # (the package's names min_norm, dual_cone are the functions: import the modules)
    names = ("eigh", "min_norm", "dual_cone", "fair", "surgery", "cagrad", "spectral")
    mods = [importlib.import_module(f"gradbal.kernels.{m}") for m in names]
    assert {MAX_K, importlib.import_module("gradbal.kernels._launch").KXK_MAX_K} == {32}
    assert all(mod.MAX_K == MAX_K for mod in mods)


@pytest.mark.parametrize("kernel", ALL, ids=lambda s: s.name)
def test_the_rule(monkeypatch, kernel):
    monkeypatch.setattr(kernel, "failed", False)
    monkeypatch.delenv("GRADBAL_BACKEND", raising=False)
    assert kernel.usable(FakeCuda(kernel.k_min)) and kernel.usable(FakeCuda(MAX_K))
    assert not kernel.usable(FakeCuda(kernel.k_min - 1))  # below: the closed form / nothing
    assert not kernel.usable(FakeCuda(MAX_K + 1))
    assert not kernel.usable(torch.eye(4, dtype=torch.float64))  # CPU
    monkeypatch.setenv("GRADBAL_BACKEND", "torch")
    assert not kernel.usable(FakeCuda(4))
    monkeypatch.setenv("GRADBAL_BACKEND", "triton")
    assert kernel.usable(FakeCuda(4))
    monkeypatch.setenv("GRADBAL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GRADBAL_BACKEND"):
        kernel.usable(FakeCuda(4))
    monkeypatch.delenv("GRADBAL_BACKEND")
    # Inside torch.compile (compile_method) the torch ops run: the compiler fuses them.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not kernel.usable(FakeCuda(4))
    monkeypatch.undo()
    # Without Triton: never chosen, and forcing it says what to install.
    monkeypatch.setattr(_solver_kernels, "kernel_function", lambda name: None)
    assert not kernel.usable(FakeCuda(4))
    with pytest.raises(RuntimeError, match=f"kernels.{kernel.name} is unavailable.*'triton' extra"):
        kernel.forced(torch.eye(4))


def test_failure_warns_once_and_only_for_that_kernel(monkeypatch):
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("no sm_xx support")

    for kernel in ALL:
        monkeypatch.setattr(kernel, "failed", False)
    monkeypatch.setattr(_solver_kernels, "kernel_function", lambda name: broken)
    with pytest.warns(RuntimeWarning, match="dual-cone kernel failed.*sm_xx.*torch solvers"):
        assert DUAL_CONE.run(torch.eye(3, dtype=torch.float16), "u") is None
    assert DUAL_CONE.failed and not any(k.failed for k in ALL if k is not DUAL_CONE)
    assert calls[0][0].dtype == torch.float64 and calls[0][1] == "u"  # fp16 read as float64
    assert not DUAL_CONE.usable(FakeCuda(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not DUAL_CONE.usable(FakeCuda(4))
    with pytest.raises(RuntimeError, match="sm_xx"):  # forced: the error is the caller's
        DUAL_CONE.forced(torch.eye(3))


def test_kernel_input_keeps_float32_and_float64_as_they_are():
    g = torch.eye(3).t()
    assert _solver_kernels.kernel_input(g) is g
    assert _solver_kernels.kernel_input(g.double()).dtype == torch.float64
    assert _solver_kernels.kernel_input(g.bfloat16()).dtype == torch.float64
    assert "k_min=3" in repr(SolverKernel("x", "w", "i", 3))
