"""gradbal's device solvers against TorchJD's CPU solvers (quadprog, cvxpy/CLARABEL,
cvxpy/ECOS, scipy), where TorchJD and its optional solvers are installed."""

from __future__ import annotations

import warnings

import pytest
import torch

import gradbal

A = pytest.importorskip("torchjd.aggregation")

F64 = torch.float64


def _torchjd(name, k):
    factories = {
        "upgrad": lambda: A.UPGrad(),
        "dualproj": lambda: A.DualProj(),
        "cagrad": lambda: A.CAGrad(c=0.5),
        "imtl_g": lambda: A.IMTLG(),
        "aligned_mtl": lambda: A.AlignedMTL(),
        "config": lambda: A.ConFIG(),
        "nash_mtl": lambda: A.NashMTL(n_tasks=k),
        "fairgrad": lambda: A.FairGrad(alpha=2.0),
        "gradvac": lambda: A.GradVac(),
    }
    try:
        return factories[name]()
    except ImportError as err:  # optional solver missing
        pytest.skip(str(err))


# gradbal options that select TorchJD's variant of a method
OPTIONS = {
    "cagrad": {"rescale": 0},
    "aligned_mtl": "mean",
    "fairgrad": {"alpha": 2.0},
}
# TorchJD's solvers stop at their own tolerances: CLARABEL (CAGrad) at ~1e-8 on the
# objective, so ~1e-4 on the weights; quadprog/eigh/scipy are near machine precision.
RTOL = {"cagrad": 2e-4, "nash_mtl": 1e-5}


@pytest.mark.parametrize("k", [2, 4, 8, 12])
@pytest.mark.parametrize(
    "name", ["upgrad", "dualproj", "cagrad", "imtl_g", "aligned_mtl", "config", "nash_mtl", "fairgrad"]
)
def test_same_direction_as_torchjd(name, k):
    agg = _torchjd(name, k)
    options = OPTIONS.get(name, {})
    if options == "mean":
        options = {"pref_vector": [1.0 / k] * k}
    for seed in range(2):
        j = torch.randn(k, 3 * k + 4, generator=torch.Generator().manual_seed(seed), dtype=F64)
        if name == "nash_mtl":
            # TorchJD's NashMTL warm-starts its CCP from the previous call and can stop far
            # from the solution (75% off on the second matrix here): compare fresh ones.
            agg = _torchjd(name, k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = agg(j)
        ours = gradbal.aggregate(j, method=name, **options)
        err = (ours - ref).abs().max() / ref.abs().max()
        assert err <= RTOL.get(name, 1e-6), (name, k, seed, float(err))


def test_gradvac_first_step_matches_torchjd():
    # TorchJD shuffles with the global RNG; for K = 2 the order does not matter.
    j = torch.randn(2, 9, generator=torch.Generator().manual_seed(0), dtype=F64)
    agg = _torchjd("gradvac", 2)
    m = gradbal.get_method("gradvac")
    for step in range(4):
        jj = j + 0.3 * step * torch.randn(2, 9, generator=torch.Generator().manual_seed(step), dtype=F64)
        ref = agg(jj)
        ours = gradbal.aggregate(jj, method=m)
        assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)
