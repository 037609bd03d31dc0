"""FSDP (``torch.distributed.fsdp.fully_shard``) on CPU with gloo: R ranks agree with one process.

Each rank holds a shard of every objective's gradient (FSDP's reduce-scatter averages each
backward's gradient over the ranks into the sharded ``.grad``, which gradbal points at the
store's rows); the Gram matrix is the all-reduce of the local partial Grams (K x K), the
combine is local. The model, batches and reference are tests/_dist_worker.py's (one process on
the rank-averaged losses); rank 0's batch gives the auxiliary objective a zero gradient.

``test_sharded_store_*`` checks gradbal.distributed's pieces and runs today.
``test_optimizer_*`` needs MultiObjectiveOptimizer to use them (the optimizer patch listed in
docs/DISTRIBUTED.md); it is skipped until the optimizer does.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

import gradbal._optimizer
from tests import _dist_worker as ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    HAVE_FSDP = torch.distributed.is_available() and torch.distributed.is_gloo_available()
except ImportError:
    HAVE_FSDP = False

OPTIMIZER_SUPPORTS_FSDP = "ShardedGradientStore" in inspect.getsource(gradbal._optimizer)
needs_fsdp = pytest.mark.skipif(not HAVE_FSDP, reason="torch without fully_shard / gloo")
needs_patch = pytest.mark.skipif(
    not OPTIMIZER_SUPPORTS_FSDP,
    reason="MultiObjectiveOptimizer does not use gradbal.distributed.ShardedGradientStore yet "
    "(see the FSDP patch in docs/DISTRIBUTED.md)",
)


def launch(tmp_path, mode, world, method="mokd", device="cpu"):
    init = f"file://{tmp_path / 'rendezvous'}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.reliability._fsdp_worker", mode, str(r), str(world), method,
             init, str(tmp_path / f"rank{r}.pt"), device],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def reference_rows(world):
    """Per-objective gradients of one process on the rank-averaged losses (step 0)."""
    model, _ = ref.make("mokd")
    x, y, t = ref.data(world, 0)
    per_rank = [
        model.losses(x[r * ref.PER_RANK:(r + 1) * ref.PER_RANK], y[r * ref.PER_RANK:(r + 1) * ref.PER_RANK],
                     t[r * ref.PER_RANK:(r + 1) * ref.PER_RANK], r)
        for r in range(world)
    ]
    losses = [sum(ls[k] for ls in per_rank) / world for k in range(3)]
    params = list(model.parameters())
    rows = []
    for loss in losses:
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(rows)


@needs_fsdp
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_store_holds_averaged_shards_and_partial_grams_sum_to_the_gram(tmp_path, world):
    rows = reference_rows(world)
    for got in launch(tmp_path, "store", world):
        torch.testing.assert_close(got["rows"], rows, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(got["gram"], rows @ rows.T, rtol=1e-6, atol=1e-12)
        # trunk (params 0, 1) by all; head (2, 3) by CE and KL; aux (4, 5) by the third only.
        t, f = True, False
        assert got["reached"] == [[t, t, t, t, f, f], [t, t, t, t, f, f], [t, t, f, f, t, t]]


@needs_fsdp
@needs_patch
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", ["mokd", "pcgrad", "gradvac", "dwa"])
def test_optimizer_on_fully_shard_matches_one_process(tmp_path, world, method):
    ranks = launch(tmp_path, "optim", world, method)
    ref.run_reference(world, method, tmp_path / "ref.pt")
    expected = torch.load(tmp_path / "ref.pt")
    for step in range(ref.STEPS):
        for got in ranks:
            torch.testing.assert_close(got[step]["weights"], expected[step]["weights"], rtol=1e-6, atol=1e-12)
            for g, e in zip(got[step]["grads"], expected[step]["grads"]):
                assert (g is None) == (e is None)
                if g is not None:
                    torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-12)
            for a, b in zip(got[step]["params"], expected[step]["params"]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


@pytest.mark.gpu
@needs_patch
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["mokd", "pcgrad"])
def test_optimizer_on_fully_shard_nccl_matches_one_process(tmp_path, method):
    """NCCL on the GPUs present (1 rank on a single GPU: the device path of the collectives)."""
    world = max(1, min(2, torch.cuda.device_count()))
    ranks = launch(tmp_path, "optim", world, method, device="cuda")
    ref.run_reference(world, method, tmp_path / "ref.pt")
    expected = torch.load(tmp_path / "ref.pt")
    for step in range(ref.STEPS):
        for got in ranks:
            torch.testing.assert_close(got[step]["weights"], expected[step]["weights"], rtol=1e-6, atol=1e-12)
            for a, b in zip(got[step]["params"], expected[step]["params"]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
