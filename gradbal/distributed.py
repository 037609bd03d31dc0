"""Exact per-task gradient averaging across ranks (torch.distributed, any backend).

With R ranks each holding part of the batch, the balanced step must equal the one a single
process computes on the whole batch. Gram-based weights are not linear in the gradients, so
each objective's gradient is averaged across ranks *before* the Gram matrix is formed (a
Gram matrix of per-rank gradients would be wrong), and so are the loss values (MoKD's log
scaling reads them).

Cost: one all-reduce of the flat ``[K, N]`` store per step (K times the bytes of an ordinary
DDP step, in one bucket per (device, dtype) group), one of K loss values, and one of the
K x P reach flags (which objectives reached which parameters on any rank); reading the
latter back is the one host synchronisation of a distributed step.

Use with a DDP-wrapped model by running the K backward passes under ``model.no_sync()`` (DDP
must not reduce each objective's gradient itself)::

    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(ddp_model.parameters(), lr=0.1),
                                          "mokd", process_group=torch.distributed.group.WORLD)
    with ddp_model.no_sync():
        opt.backward([loss_task, loss_kd])
    opt.step()
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["average_objectives", "broadcast_seed"]


def _device_for(group: Any, fallback: torch.device) -> torch.device:
    """Collectives of the NCCL backend need CUDA tensors; gloo takes CPU ones."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return fallback if fallback.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return fallback


def broadcast_seed(seed: int, group: Any) -> int:
    """Every rank uses rank 0's seed, so random methods draw the same order everywhere."""
    t = torch.tensor([seed], dtype=torch.int64, device=_device_for(group, torch.device("cpu")))
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(t.item())


def average_objectives(store, loss_values: Tensor, reached_by: list[list[bool]], group: Any):
    """Average the store's rows and the loss values over ranks; OR the reach flags.

    Returns (averaged loss values, reach flags as lists of bools identical on every rank).
    """
    world = dist.get_world_size(group)
    for g in store.groups:
        dist.all_reduce(g.rows, op=dist.ReduceOp.SUM, group=group)
        g.rows.div_(world)
    device = _device_for(group, loss_values.device)
    losses = loss_values.to(device)
    dist.all_reduce(losses, op=dist.ReduceOp.SUM, group=group)
    reach = torch.tensor(reached_by, dtype=torch.int32, device=device)
    dist.all_reduce(reach, op=dist.ReduceOp.MAX, group=group)
    return (losses / world).to(loss_values.device), reach.bool().tolist()
