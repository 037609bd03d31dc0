"""The package surface gradbal._ops and the solvers rely on: AVAILABLE, gram,
gram_with_nonfinite, combine, graddrop, jacobi_eigh, min_norm, mokd_weights, dual_cone, fair_weights,
pcgrad_weights, gradvac_weights, cagrad_direction; importable without Triton; the ops layer's backend="triton" reaches these kernels."""

from __future__ import annotations

import subprocess
import sys

import torch


def test_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, gradbal.kernels as k\n"
        "assert k.AVAILABLE is False\n"
        "for call in (lambda: k.gram(torch.ones(2, 3)), lambda: k.gram_with_nonfinite(torch.ones(2, 3)),\n"
        "             lambda: k.combine(torch.ones(2, 3), torch.ones(2), torch.empty(3)),\n"
        "             lambda: k.graddrop(torch.ones(2, 3), torch.rand(3), torch.empty(3)),\n"
        "             lambda: k.jacobi_eigh(torch.eye(3)), lambda: k.min_norm(torch.eye(3)),\n"
        "             lambda: k.dual_cone(torch.eye(3), torch.eye(3).double(), 1e-4),\n"
        "             lambda: k.fair_weights(torch.eye(3)),\n"
        "             lambda: k.pcgrad_weights(torch.eye(3), torch.zeros(3, 2).long()),\n"
        "             lambda: k.cagrad_direction(torch.eye(3), 0.5, 1e-4),\n"
        "             lambda: k.mokd_weights(torch.eye(3), torch.ones(3))):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as err:\n"
        "        assert 'Triton' in str(err)\n"
        "    else:\n"
        "        raise AssertionError('no RuntimeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ops_layer_reaches_the_kernels(device, gram_mod, combine_mod, rows_of):
    from gradbal import _ops, kernels

    assert kernels.AVAILABLE is True
    rows = rows_of(3, 4097, torch.bfloat16, device)
    g = _ops.gram(rows, backend="triton")
    assert torch.equal(g, kernels.gram(rows))
    assert ((g - gram_mod.gram_reference(rows)).abs() <= gram_mod.gram_error_bound(rows)).all()
    w = torch.tensor([0.25, -1.0, 2.0], dtype=torch.float64, device=device)
    out = torch.full((4097,), float("nan"), dtype=torch.bfloat16, device=device)
    _ops.combine(rows, w, out, backend="triton")
    err = (out.double() - combine_mod.combine_reference(rows, w)).abs()
    assert (err <= combine_mod.combine_error_bound(rows, w, torch.bfloat16)).all()
