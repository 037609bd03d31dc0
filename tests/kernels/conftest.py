"""Fixtures for the kernel tests. The kernel modules are imported lazily, inside fixtures, so
that the root conftest has set TRITON_INTERPRET (CPU-only machines) before Triton sees them."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

# Without Triton the kernel package only raises (gradbal.kernels.AVAILABLE is False): there is
# nothing here to test. find_spec does not import Triton.
if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def gram_mod():
    return importlib.import_module("gradbal.kernels.gram")


@pytest.fixture(scope="session")
def combine_mod():
    return importlib.import_module("gradbal.kernels.combine")


@pytest.fixture(scope="session")
def graddrop_mod():
    return importlib.import_module("gradbal.kernels.graddrop")


@pytest.fixture(scope="session")
def device():
    """CUDA when present (compiled kernels), else CPU (Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _poisoned_empty(*shape, dtype=None, device=None, **kwargs):
    """torch.empty stand-in that fills new buffers with garbage: NaN for floats, a huge
    negative value for integers, so a result that reads an unwritten entry shows it."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    t = torch.empty(*shape, dtype=dtype, device=device, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-(2**62) if t.dtype == torch.int64 else -7)
    return t


@pytest.fixture
def poison(monkeypatch, gram_mod, combine_mod):
    """Make every buffer the kernels allocate start out as garbage."""
    monkeypatch.setattr(gram_mod, "_alloc", _poisoned_empty)
    monkeypatch.setattr(combine_mod, "_alloc", _poisoned_empty)


def make_rows(k: int, n: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """Random [k, n] rows with a heavier last column: a kernel that drops the masked tail
    block is then off by far more than the error bound (checked in the gram tests)."""
    g = torch.Generator().manual_seed(seed * 1000 + k * 10 + n % 997)
    x = torch.randn(k, n, generator=g, dtype=torch.float64)
    if n:
        x[:, -1] *= 8.0
    return x.to(dtype).to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so NaNs compare equal to themselves)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.contiguous().view(ints[t.element_size()])


@pytest.fixture(scope="session")
def rows_of():
    return make_rows


@pytest.fixture(scope="session")
def bits_of():
    return bits
