"""One rank of tests/reliability/test_fsdp.py: a ``fully_shard`` model on gloo (CPU) or NCCL.

Modes:
  store  -- gradbal.distributed's sharded store on its own (no optimizer): each
            objective's backward lands its rank-averaged shard in the store's row through the
            DTensor .grad views; the all-reduced partial Grams give the full Gram matrix.
  optim  -- MultiObjectiveOptimizer on the sharded model, a few steps; weights, full .grad and
            parameters per step, compared by the test with one process on the whole batch.
  scaler -- the same under a torch.amp.GradScaler, with an overflow planted in one rank's shard.
  refused -- HSDP: the errors, nothing changed.

Usage: python -m tests.reliability._fsdp_worker MODE RANK WORLD METHOD INIT OUT [DEVICE]
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import gradbal
from gradbal import _ops, distributed
from tests import _dist_worker as ref

F = nn.functional


def sharded_model(device):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the reference's initial weights (tests._dist_worker.make)
    model = ref.Net().double().to(device)
    for m in (model.trunk, model.head, model.aux):
        fully_shard(m)
    fully_shard(model)
    return model


def losses(model, x, y, t, rank):
    """tests._dist_worker.Net.losses, except that rank 0's auxiliary objective is connected to
    the graph with a zero gradient: under FSDP every rank must run each objective's backward
    through the same sharded modules (a loss with no graph on one rank hangs the others in
    FSDP's reduce-scatter)."""
    _, out, aux_out = model(x)
    ce = F.cross_entropy(out, y)
    kl = F.kl_div(F.log_softmax(out, -1), F.softmax(t, -1), reduction="batchmean")
    aux = (aux_out - 1).pow(2).mean()
    return [ce, kl, 0 * aux if rank == 0 else aux]


def batch(world, step, rank, device):
    x, y, t = ref.data(world, step)
    sl = slice(rank * ref.PER_RANK, (rank + 1) * ref.PER_RANK)
    return x[sl].to(device), y[sl].to(device), t[sl].to(device)


def run_store(rank, world, device, out):
    """The sharded store alone: rows = averaged shards, all-reduced partial Gram = Gram."""
    model = sharded_model(device)
    params = list(model.parameters())
    store = distributed.ShardedGradientStore(params)
    recorder = distributed.ShardedReachRecorder()
    recorder.attach(params)
    x, y, t = batch(world, 0, rank, device)
    ls = losses(model, x, y, t, rank)
    store.allocate(len(ls))
    store.zero_rows()
    reached = []
    for i, loss in enumerate(ls):
        store.point_grads_at_row(i)
        recorder.begin(len(params))
        loss.backward(retain_graph=i < len(ls) - 1)
        recorder.end()
        reached.append(recorder.reached)
    (g,) = store.groups
    gram = distributed.all_reduce_sum(_ops.gram(g.rows), store.group)
    # Full per-objective gradients, gathered from the shards (collective: same order on all).
    full = []
    for i in range(len(ls)):
        store.point_grads_at_row(i)
        full.append(torch.cat([p.grad.full_tensor().reshape(-1).cpu() for p in params]))
    torch.save({"gram": gram.cpu(), "rows": torch.stack(full), "reached": reached}, out)


def run_optim(rank, world, method, device, out, scaler=False):
    """``scaler``: under tests._dist_worker.make_scaler's GradScaler, with its planted overflow
    (an Inf in element 0 of the first parameter's gradient: rank 0's shard) at PLANT_STEP."""
    model = sharded_model(device)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(ref.RANK_SEED + rank)  # ranks draw different seeds; rank 0's is used
    opt = gradbal.MultiObjectiveOptimizer(sgd, method)
    amp = ref.make_scaler(torch.device(device).type) if scaler else None
    results = []
    for step in range(ref.STEPS):
        x, y, t = batch(world, step, rank, device)
        opt.zero_grad()
        opt.backward(losses(model, x, y, t, rank), scaler=amp)
        grads = [None if p.grad is None else p.grad.full_tensor().cpu() for p in model.parameters()]
        params = [p.full_tensor().detach().cpu() for p in model.parameters()]
        # As tests._dist_worker.record: parameters before this step (after the previous ones).
        results.append({"weights": opt.last_stats.weights.cpu(), "grads": grads, "params": params})
        if amp is None:
            opt.step()
            continue
        results[-1]["scale"] = amp.get_scale()
        first = next(model.parameters())
        if step == ref.PLANT_STEP and rank == 0:
            assert distributed.local_tensor(first.grad).numel() > 0  # rank 0 holds element 0
            ref.plant_overflow(distributed.local_tensor(first.grad))
        amp.step(opt)
        amp.update()
    torch.save(results, out)


def run_refused(rank, world, method, device, out):
    """What must be refused, with a clear error and nothing changed: HSDP (a 2-D replicate x
    shard mesh) at construction and at backward. Saves the error messages; raises if anything
    changed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    errors = {}
    torch.manual_seed(0)
    hsdp = ref.Net().double().to(device)
    mesh = init_device_mesh(torch.device(device).type, (1, world),
                            mesh_dim_names=("replicate", "shard"))
    for m in (hsdp.trunk, hsdp.head, hsdp.aux, hsdp):
        fully_shard(m, mesh=mesh)
    try:
        gradbal.MultiObjectiveOptimizer(torch.optim.SGD(hsdp.parameters(), lr=0.1), "mokd")
    except ValueError as err:
        errors["hsdp_init"] = str(err)
    for name, model, how in [("hsdp_backward", hsdp, "mokd")]:
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = gradbal.MultiObjectiveOptimizer(sgd, how, seed=0)  # seed=: no collective here
        before = [p.full_tensor().detach().clone() for p in model.parameters()]
        generator = opt.generator.get_state()
        x, y, t = batch(world, 0, rank, device)
        try:
            opt.backward(losses(model, x, y, t, rank))
        except ValueError as err:
            errors[name] = str(err)
        assert all(p.grad is None for p in model.parameters())
        after = [p.full_tensor().detach() for p in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert torch.equal(opt.generator.get_state(), generator)
        assert opt.last_stats is None and not opt.state
    torch.save(errors, out)


if __name__ == "__main__":
    mode, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    method, init, out = sys.argv[4:7]
    device = sys.argv[7] if len(sys.argv) > 7 else "cpu"
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=init,
                            rank=rank, world_size=world)
    if mode == "store":
        run_store(rank, world, device, out)
    elif mode == "refused":
        run_refused(rank, world, method, device, out)
    else:
        run_optim(rank, world, method, device, out, scaler=mode == "scaler")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort at interpreter teardown (see tests/_dist_worker.py)
