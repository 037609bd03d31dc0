"""FSDP (``torch.distributed.fsdp.fully_shard``) on CPU with gloo: R ranks agree with one process.

Each rank holds a shard of every objective's gradient (FSDP's reduce-scatter averages each
backward's gradient over the ranks into the sharded ``.grad``, which gradbal points at the
store's rows); the Gram matrix is the all-reduce of the local partial Grams (K x K), the
combine is local. The model, batches and reference are tests/_dist_worker.py's (one process on
the rank-averaged losses); rank 0's batch gives the auxiliary objective a zero gradient.

``test_sharded_store_*`` checks gradbal.distributed's pieces on their own, ``test_optimizer_*``
MultiObjectiveOptimizer on the sharded model (also under a GradScaler; GradDrop included), and
``test_refused_*`` the clear error (HSDP) that changes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests import _dist_worker as ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    HAVE_FSDP = torch.distributed.is_available() and torch.distributed.is_gloo_available()
except ImportError:
    HAVE_FSDP = False

needs_fsdp = pytest.mark.skipif(not HAVE_FSDP, reason="torch without fully_shard / gloo")


def launch(tmp_path, mode, world, method="mokd", device="cpu"):
    init = f"file://{tmp_path / 'rendezvous'}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.reliability._fsdp_worker", mode, str(r), str(world),
             method, init, str(tmp_path / f"rank{r}.pt"), device],
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
    per_rank = []
    for r in range(world):
        sl = slice(r * ref.PER_RANK, (r + 1) * ref.PER_RANK)
        per_rank.append(model.losses(x[sl], y[sl], t[sl], r))
    losses = [sum(ls[k] for ls in per_rank) / world for k in range(3)]
    params = list(model.parameters())
    rows = []
    for loss in losses:
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        full = [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]
        rows.append(torch.cat([g.reshape(-1) for g in full]))
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


def assert_matches(ranks, expected):
    """Every rank's weights, full .grad and parameters (and GradScaler's scale) match one
    process's at every step."""
    for step in range(ref.STEPS):
        for got in ranks:
            torch.testing.assert_close(got[step]["weights"], expected[step]["weights"],
                                       rtol=1e-6, atol=1e-12)
            for g, e in zip(got[step]["grads"], expected[step]["grads"]):
                assert (g is None) == (e is None)
                if g is not None:
                    torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-12)
            for a, b in zip(got[step]["params"], expected[step]["params"]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
            assert got[step].get("scale") == expected[step].get("scale")


@needs_fsdp
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", ["mokd", "pcgrad", "gradvac", "dwa", "graddrop"])
def test_optimizer_on_fully_shard_matches_one_process(tmp_path, world, method):
    """graddrop: each rank draws the one process's noise over the whole gradient and reads it
    at its shards' coordinates (ShardedParamGroupStore.coordinates)."""
    ranks = launch(tmp_path, "optim", world, method)
    ref.run_reference(world, method, tmp_path / "ref.pt")
    assert_matches(ranks, torch.load(tmp_path / "ref.pt"))


@needs_fsdp
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", ["mokd", "pcgrad", "dwa"])
def test_optimizer_on_fully_shard_with_grad_scaler_matches_one_process(tmp_path, world, method):
    """torch.amp.GradScaler (CPU) on fully_shard: each objective's scaled backward lands in its
    row, the weights come from the unscaled all-reduced Gram, ``.grad`` carries the scale, and
    ``scaler.step`` unscales the DTensor ``.grad``. The scale doubles after every step; at
    PLANT_STEP an Inf is put in rank 0's shard of the first gradient only: every rank must skip
    that step and halve the scale, as one process does (GradScaler's found-Inf flag is reduced
    over the ranks for DTensor gradients)."""
    ranks = launch(tmp_path, "scaler", world, method)
    ref.run_reference(world, method, tmp_path / "ref.pt", scaler=True)
    expected = torch.load(tmp_path / "ref.pt")
    # The reference did what the test is about: scaled, grew, skipped the planted step.
    plant = ref.PLANT_STEP
    assert [e["scale"] for e in expected] == [1024.0, 2048.0, 1024.0]
    assert all(torch.equal(a, b) for a, b in zip(expected[plant]["params"],
                                                  expected[plant + 1]["params"]))
    assert not all(torch.equal(a, b) for a, b in zip(expected[0]["params"],
                                                      expected[1]["params"]))
    # ...and the scale changed nothing but .grad's scale: the first step without a scaler.
    ref.run_reference(world, method, tmp_path / "plain.pt")
    plain = torch.load(tmp_path / "plain.pt")[0]
    torch.testing.assert_close(expected[0]["weights"], plain["weights"], rtol=1e-6, atol=1e-12)
    for g, e in zip(expected[0]["grads"], plain["grads"]):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, 1024.0 * e, rtol=1e-6, atol=1e-12)
    assert_matches(ranks, expected)


@needs_fsdp
def test_refused_on_fully_shard_with_a_clear_error_and_nothing_changed(tmp_path):
    """HSDP (2-D replicate x shard mesh) is refused at construction (the seed broadcast looks
    for the shard group) and, with a seed given, at the first backward. The worker checks
    that parameters, .grad, the generator and the optimizer state are unchanged."""
    for errors in launch(tmp_path, "refused", 2):
        assert set(errors) == {"hsdp_init", "hsdp_backward"}
        for name in ("hsdp_init", "hsdp_backward"):
            assert "HSDP" in errors[name] and "1-D" in errors[name], errors[name]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["optim", "scaler"])
@pytest.mark.parametrize("method", ["mokd", "pcgrad"])
def test_optimizer_on_fully_shard_nccl_matches_one_process(tmp_path, method, mode):
    """NCCL on the GPUs present (1 rank on a single GPU: the device path of the collectives),
    without and with a CUDA GradScaler, against the CPU one-process reference."""
    world = max(1, min(2, torch.cuda.device_count()))
    ranks = launch(tmp_path, mode, world, method, device="cuda")
    ref.run_reference(world, method, tmp_path / "ref.pt", scaler=mode == "scaler")
    assert_matches(ranks, torch.load(tmp_path / "ref.pt"))
