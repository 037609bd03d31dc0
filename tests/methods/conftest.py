"""Run the method tests single-threaded: the K x K work is tiny, and on a shared 2-core
machine OpenMP-parallel batched float64 ops (bmm, batched solves) can stall for milliseconds
each when another process holds a core."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
