"""Run the method tests single-threaded (the root conftest's ``single_thread``)."""

import pytest


@pytest.fixture(autouse=True)
def _single_thread(single_thread):
    yield
