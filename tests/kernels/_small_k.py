"""Shared by the K x K kernels' tests (test_kernel_min_norm, test_kernel_dual_cone,
test_kernel_eigh, test_kernel_fair, test_kernel_surgery, test_kernel_cagrad): Gram matrices
(and their gradient rows) of the degenerate kinds the solvers must survive, and a stand-in for
a CUDA tensor's metadata."""

from __future__ import annotations

import numpy as np


def gram_case(kind: str, k: int, seed: int) -> np.ndarray:
    """A [k, k] Gram matrix X X^T of the given kind (float64): X = :func:`jacobian_case`."""
    x = jacobian_case(kind, k, seed)
    return x @ x.T


def jacobian_case(kind: str, k: int, seed: int) -> np.ndarray:
    """The gradient rows X (float64) of :func:`gram_case`'s matrix of the given kind."""
    rng = np.random.default_rng(100 * seed + k + 7 * len(kind))
    x = rng.standard_normal((k, 3 * k))
    if kind == "random":
        pass
    elif kind == "conflicting":  # correlated rows with norms over 4 decades (real KD gradients)
        x[1:] += 0.5 * x[:1]
        x[1::2] -= 1.5 * x[:1]
        x *= np.logspace(-2, 2, k)[:, None]
    elif kind == "rank_deficient":
        x = rng.standard_normal((k, max(1, k // 2)))
    elif kind == "equal_rows":
        x[-1] = x[0]
    elif kind == "opposite_rows":
        x[-1] = -x[0]
    elif kind == "zero_row":
        x[k // 2] = 0
    elif kind == "mixed_norms":  # norms over 8 decades
        x *= np.logspace(-4, 4, k)[rng.permutation(k)][:, None]
    elif kind == "zero":
        x[:] = 0
    else:
        raise ValueError(kind)
    return x


WELL = ["random", "conflicting"]
DEGENERATE = ["rank_deficient", "equal_rows", "opposite_rows", "zero_row", "mixed_norms", "zero"]


class FakeCuda:
    """Just the metadata the kernels' dispatch checks read (``is_cuda``, ``shape``) of a
    CUDA [k, k] tensor."""

    is_cuda = True

    def __init__(self, k):
        self.shape = (k, k)


def fall_back_once(monkeypatch, call, match: str):
    """Make every K x K kernel fail (``gradbal._solver_kernels.kernel_function`` returns one that
    raises, as on a GPU Triton cannot compile for), then check that ``call()`` warns once
    (``match``), that a second call is silent, that the kernel was tried once, and that both
    calls answer alike (the torch ops). Returns the answer."""
    import warnings

    import pytest
    import torch

    from gradbal import _solver_kernels

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no sm_xx support")

    monkeypatch.setattr(_solver_kernels, "kernel_function", lambda name: broken)
    with pytest.warns(RuntimeWarning, match=match):
        first = call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = call()
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(first),
                                                 torch.utils._pytree.tree_leaves(second)))  # fmt: skip
    return first


def without_sync(call):
    """``call()`` twice on CUDA: once to compile the kernels, then under
    ``torch.cuda.set_sync_debug_mode("error")``, where any host synchronisation raises. Returns
    the second answer."""
    import torch

    call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
