"""Test-wide setup. Triton kernels run under Triton's CPU interpreter when no GPU is present;
the variable must be set before any kernel module is imported, hence here, at collection."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def single_thread():
    """One torch thread for the test: the K x K and small kernel work is tiny, and on a shared
    2-core machine OpenMP-parallel ops (bmm, batched solves) can stall for milliseconds each
    when another process holds a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
