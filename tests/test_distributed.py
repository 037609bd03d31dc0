"""Distributed balancing on gloo: R ranks agree with one process on the whole batch."""

import os
import subprocess
import sys

import pytest
import torch

from tests import _dist_worker as worker


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    "method", ["mokd", "pcgrad", "gradvac", "mokd:ddp", "dwa", "famo", "graddrop", "graddrop:ddp"]
)
def test_ranks_match_one_process(tmp_path, world, method):
    init = f"file://{tmp_path / 'rendezvous'}"  # no TCP port to race for
    path = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests._dist_worker", str(r), str(world), method,
                          init, str(tmp_path / f"rank{r}.pt")],
                         env=env, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    worker.run_reference(world, method.partition(":")[0], tmp_path / "ref.pt")
    ref = torch.load(tmp_path / "ref.pt")
    for step in range(worker.STEPS):
        for r in range(world):
            got = ranks[r][step]
            torch.testing.assert_close(got["weights"], ref[step]["weights"], rtol=1e-6, atol=1e-12)
            for g, e in zip(got["grads"], ref[step]["grads"]):
                assert (g is None) == (e is None)
                if g is not None:
                    torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-12)
            for a, b in zip(got["params"], ref[step]["params"]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
