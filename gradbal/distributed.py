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

The alternative, a reduce-scatter of the store + an all-reduce of the K x K partial Grams + an
all-gather of the combined gradient, moves (K + 1)/2 DDP steps' bytes instead of K, but needs
K + 2 collectives and measured slower on gloo at every size tried (docs/DISTRIBUTED.md).

FSDP (``fully_shard``): see the section at the end of this module. FSDP's reduce-scatter
averages each objective's gradient into the store's rows (this rank's shards); the Gram
matrix is the all-reduce of the local partial Grams; the combine is local.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._store import GradientStore, ParamGroupStore, flat_offsets

__all__ = [
    "ReachRecorder",
    "ShardedGradientStore",
    "ShardedParamGroupStore",
    "ShardedReachRecorder",
    "all_reduce_sum",
    "average_grads",
    "average_loss_values",
    "average_objectives",
    "broadcast_seed",
    "is_sharded",
    "local_tensor",
    "shard_group",
]


def _device_for(group: Any, fallback: torch.device) -> torch.device:
    """Collectives of the NCCL backend need CUDA tensors; gloo takes CPU ones."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        if fallback.type == "cuda":
            return fallback
        return torch.device("cuda", torch.cuda.current_device())
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


def average_loss_values(loss_values: Tensor, group: Any) -> Tensor:
    """Rank-averaged loss values (loss-based methods weight with these on every rank)."""
    device = _device_for(group, loss_values.device)
    losses = loss_values.to(device)
    dist.all_reduce(losses, op=dist.ReduceOp.SUM, group=group)
    return (losses / dist.get_world_size(group)).to(loss_values.device)


def average_grads(params: list[Tensor], group: Any) -> None:
    """Average ``.grad`` over ranks with one all-reduce per (device, dtype) bucket.

    Used after the single backward of a loss-based method (its weights are identical on every
    rank, so averaging the weighted gradient is exact). A parameter that received a gradient
    on some rank only gets a zero ``.grad`` on the others first, so every rank sends the same
    buckets (one host read of the P reach flags)."""
    world = dist.get_world_size(group)
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                       device=_device_for(group, params[0].device))
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p, anywhere in zip(params, has.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


# --------------------------------------------------------------------------- FSDP (fully_shard)
# With torch's ``fully_shard`` (FSDP2) every parameter is a DTensor sharded over the ranks, and
# FSDP's own reduce-scatter already *averages* each backward's gradient over the ranks into the
# parameter's sharded ``.grad`` (adding in place when ``.grad`` is already a DTensor). So each
# objective's backward writes its rank-averaged gradient shard straight into the store's row,
# through DTensor ``.grad`` views of the local shards:
#
#   * rows[k] on a rank hold the rank's shard of objective k's averaged gradient;
#   * the Gram matrix is the all-reduce (sum) of the K x K local partial Grams;
#   * the weights are computed on every rank from that same matrix; the combine is local.
#
# Communication per step: K reduce-scatters of the gradient (FSDP's own, one per objective's
# backward), K all-gathers of the parameters in backward when FSDP reshards them after
# forward, one all-reduce of K x K float64 numbers and one of K loss values.


def is_sharded(params) -> bool:
    """True when the parameters are DTensors (``fully_shard``); they must then all be."""
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for p in params}
    if kinds == {True, False}:
        raise ValueError(
            "the optimizer mixes DTensor (fully_shard) parameters with plain ones; shard the "
            "whole model (fully_shard on the root module too) or give them separate optimizers"
        )
    return kinds == {True}


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view, no copy); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


_local = local_tensor


def shard_group(params) -> Any:
    """The process group the parameters are sharded over (one 1-D mesh, Shard placements)."""
    from torch.distributed.tensor import Shard

    meshes = [p.device_mesh for p in params]
    mesh = meshes[0]
    if mesh.ndim != 1 or not all(isinstance(pl, Shard) for p in params for pl in p.placements):
        raise ValueError(
            f"gradbal supports FSDP's 1-D sharding (Shard placements on a 1-D mesh), got mesh "
            f"{tuple(mesh.shape)} and placements {sorted({str(p.placements) for p in params})}; "
            "HSDP (replicate x shard) would need the partial Gram matrix reduced over the shard "
            "dimension only"
        )
    # Every fully_shard call builds its own (equal) mesh object: compare their groups.
    group = mesh.get_group()
    if any(m.get_group().group_name != group.group_name for m in meshes[1:]):
        raise ValueError("the parameters are sharded over different process groups; gradbal "
                         "needs one (fully_shard over one mesh)")
    return group


class ShardedParamGroupStore(ParamGroupStore):
    """Rows and ``out`` over this rank's local shards; views handed out as DTensors."""

    def __init__(self, params, indices):
        self.params = list(params)
        self.indices = list(indices)
        locals_ = [_local(p) for p in self.params]
        self.local_shapes = [t.shape for t in locals_]
        self.device = locals_[0].device
        self.dtype = locals_[0].dtype
        self.numels = [t.numel() for t in locals_]
        self.offsets, self.numel = flat_offsets(self.numels)
        total = self.numel
        self.out = torch.zeros(total, device=self.device, dtype=self.dtype)
        self.out_views = self._views(self.out)
        self.rows = torch.empty(0, total, device=self.device, dtype=self.dtype)
        self.row_views = []
        self._coordinates: tuple[Tensor, int] | None = None

    def _views(self, flat: Tensor) -> list[Tensor]:
        from torch.distributed.tensor import DTensor

        return [
            DTensor.from_local(flat[o : o + n].view(shape), p.device_mesh, p.placements,
                               run_check=False, shape=p.shape, stride=p.stride())
            for p, shape, o, n in zip(self.params, self.local_shapes, self.offsets, self.numels)
        ]

    def owns_out_view(self, position: int, grad: Tensor) -> bool:
        view, local = _local(self.out_views[position]), _local(grad)
        return local.data_ptr() == view.data_ptr() and local.shape == view.shape

    def coordinates(self) -> tuple[Tensor, int]:
        """``(index, numel)``: where this rank's entries sit in the one-process flat layout of
        the same parameters (full parameters back to back, in order), and that layout's size.

        Elementwise methods draw their noise over the whole layout and read it at ``index``,
        so that a rank's shards get exactly the one process's values (Method.combine)."""
        if self._coordinates is None:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            parts, start = [], 0
            for p, n in zip(self.params, self.numels):
                shape, offset = compute_local_shape_and_global_offset(
                    p.shape, p.device_mesh, p.placements
                )
                if math.prod(shape) != n:
                    raise RuntimeError(
                        f"a local shard of {n} entries does not match its placement "
                        f"{tuple(shape)} (padded shards?); elementwise methods need the "
                        "unpadded layout"
                    )
                # The global flat positions of the shard: a box of the full tensor.
                full = torch.arange(start, start + p.numel(), device=self.device).view(p.shape)
                box = tuple(slice(o, o + s) for o, s in zip(offset, shape))
                parts.append(full[box].reshape(-1))
                start += p.numel()
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            self._coordinates = (torch.cat(parts) if parts else empty, start)
        return self._coordinates


class ShardedGradientStore(GradientStore):
    """The optimizer's gradient store for ``fully_shard`` parameters: rows and ``out`` hold
    this rank's shards, ``.grad`` are DTensor views of them (FSDP's reduce-scatter adds each
    objective's rank-averaged shard into the row in place). ``group``: the shard group."""

    sharded = True
    group_class = ShardedParamGroupStore
    local = staticmethod(local_tensor)

    def __init__(self, params):
        params = list(params)
        self.group = shard_group(params)
        super().__init__(params)


class ReachRecorder:
    """Base of the optimizer's reach recorders: which parameters an objective's backward reached.

    One hook per parameter, registered by :meth:`attach` (subclasses say which kind, in
    :meth:`_register`) and kept for the optimizer's lifetime; the hooks record only between
    :meth:`begin` and :meth:`end` (one objective's backward), into ``reached``. It lives here
    rather than in ``gradbal._optimizer``, which imports this module.
    """

    def __init__(self) -> None:
        self.active = False
        self.reached: list[bool] = []
        self.handles: list[Any] = []

    def _register(self, param: Tensor, index: int) -> Any:
        """Register the hook that marks parameter ``index`` reached; return its handle."""
        raise NotImplementedError

    def attach(self, params) -> None:
        self.detach()
        for i, p in enumerate(params):
            self.handles.append(self._register(p, i))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def begin(self, num_params: int) -> None:
        self.reached = [False] * num_params
        self.active = True

    def end(self) -> None:
        self.active = False


class ShardedReachRecorder(ReachRecorder):
    """Records which parameters each objective's backward reached, for ``fully_shard`` models.

    FSDP's sharded parameters are not in the autograd graph (their unsharded copies are), so
    tensor hooks never fire on them; FSDP calls their post-accumulate-grad hooks after each
    reduce-scatter instead. The flags are the same on every rank (the reduce-scatter is
    collective), so they need no all-reduce.
    """

    def _register(self, param: Tensor, index: int) -> Any:
        def hook(param) -> None:
            if self.active:
                self.reached[index] = True

        return param.register_post_accumulate_grad_hook(hook)


def all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    """The float64 sum over ``group``'s ranks of a small tensor (a partial K x K Gram matrix,
    the local parts of ``gram_params="shared"``'s diagonal correction), on ``t``'s device."""
    device = _device_for(group, t.device)
    flat = t.to(device=device, dtype=torch.float64).contiguous()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return flat.to(t.device)
