"""Worker for tests/test_distributed.py: one rank of a gloo job, or the 1-process reference.

Every rank builds the same model, takes its slice of a fixed global batch, and runs a few
balanced steps; the reference runs one process on the rank-averaged losses, which is what a
single process on the whole batch computes (each loss is a mean over equal-size slices).
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import gradbal

F = nn.functional
STEPS = 3
PER_RANK = 6
RANK_SEED = 1000


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 12), nn.Tanh())
        self.head = nn.Linear(12, 4)
        self.aux = nn.Linear(12, 1)  # only the third objective reaches it

    def forward(self, x):
        z = self.trunk(x)
        return z, self.head(z), self.aux(z)

    def losses(self, x, y, teacher, rank, model=None, alone=False):
        """``alone``: rank 0 is the only rank (world 1). Its auxiliary objective is then
        connected with a zero gradient, as the FSDP worker's is: unconnected on every rank, it
        would reach no parameter at all and the step would (rightly) be refused."""
        _, out, aux_out = (model or self)(x)
        ce = F.cross_entropy(out, y)
        kl = F.kl_div(F.log_softmax(out, -1), F.softmax(teacher, -1), reduction="batchmean")
        aux = (aux_out - 1).pow(2).mean()
        if rank == 0 and alone:
            aux = 0 * aux
        elif rank == 0:
            # This rank's batch gives the auxiliary objective no gradient at all.
            aux = torch.zeros((), dtype=x.dtype, requires_grad=True) * 1.0
        return [ce, kl, aux]


def data(world, step):
    gen = torch.Generator().manual_seed(100 + step)
    n = world * PER_RANK
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=gen)
    t = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return x, y, t


def make(method):
    torch.manual_seed(0)
    model = Net().double()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def record(model, opt):
    return {
        "weights": opt.last_stats.weights.clone(),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
    }


# GradScaler runs (tests/reliability/test_fsdp.py): the scale doubles after every step that
# goes through and halves on an overflow, which is planted at PLANT_STEP as an Inf in element 0
# of the first parameter's gradient (after backward, before scaler.step): under fully_shard it
# lands in rank 0's shard only, and every rank must skip the step as one process does.
PLANT_STEP = 1


def make_scaler(device="cpu"):
    return torch.amp.GradScaler(device, init_scale=1024.0, growth_interval=1)


def plant_overflow(grad):
    grad.reshape(-1)[0] = float("inf")


def run_rank(rank, world, method, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    method, _, wrap = method.partition(":")
    model, sgd = make(method)
    ddp = None
    if wrap == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    torch.manual_seed(RANK_SEED + rank)  # ranks draw different seeds; rank 0's is broadcast
    opt = gradbal.MultiObjectiveOptimizer(sgd, method, process_group=dist.group.WORLD)
    results = []
    for step in range(STEPS):
        x, y, t = data(world, step)
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        opt.zero_grad()
        if ddp is None:
            opt.backward(model.losses(x[sl], y[sl], t[sl], rank))
        else:  # DDP must not reduce each objective itself: backward under no_sync
            with ddp.no_sync():
                opt.backward(model.losses(x[sl], y[sl], t[sl], rank, model=ddp))
        results.append(record(model, opt))
        opt.step()
    torch.save(results, out)
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()


def run_reference(world, method, out, scaler=False):
    """One process: the rank-averaged losses, with the optimizer seed rank 0 drew.

    ``scaler``: under :func:`make_scaler`'s GradScaler, with the overflow of
    :func:`plant_overflow` at PLANT_STEP; each step also records the scale it used."""
    model, sgd = make(method)
    torch.manual_seed(RANK_SEED)
    opt = gradbal.MultiObjectiveOptimizer(sgd, method)
    amp = make_scaler() if scaler else None
    results = []
    for step in range(STEPS):
        x, y, t = data(world, step)
        per_rank = [
            model.losses(x[r * PER_RANK:(r + 1) * PER_RANK], y[r * PER_RANK:(r + 1) * PER_RANK],
                         t[r * PER_RANK:(r + 1) * PER_RANK], r, alone=world == 1)
            for r in range(world)
        ]
        losses = [sum(ls[k] for ls in per_rank) / world for k in range(3)]
        opt.zero_grad()
        if amp is None:
            opt.backward(losses)
            results.append(record(model, opt))
            opt.step()
            continue
        opt.backward(losses, scaler=amp)
        results.append({**record(model, opt), "scale": amp.get_scale()})
        if step == PLANT_STEP:
            plant_overflow(next(model.parameters()).grad)
        amp.step(opt)
        amp.update()
    torch.save(results, out)


if __name__ == "__main__":
    rank, world, (method, init, out) = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:6]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    run_rank(rank, world, method, init, out)
    sys.stdout.flush()
    # gloo's background threads can abort ("terminate called without an active exception")
    # during interpreter teardown; the results are saved, so leave without it.
    os._exit(0)
