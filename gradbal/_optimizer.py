"""MultiObjectiveOptimizer: wrap any torch.optim optimizer with gradient balancing."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _ops, distributed
from ._store import GradientStore
from .diagnostics import StepStats
from .methods import Method, get_method
from .methods._common import device_generator, draw_seed

__all__ = ["MultiObjectiveOptimizer"]

NONFINITE_MODES = ("raise", "skip", "ignore")
GRAM_PARAMS = ("shared", "all")
_STATE_KEY = "gradbal"


def _copy_to_host_async(t: Tensor) -> tuple[Tensor, torch.cuda.Event]:
    """Start copying the small CUDA tensor ``t`` into pinned host memory; returns the host
    tensor and an event that completes with the copy (``event.synchronize()`` before reading)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class _ReachRecorder(distributed.ReachRecorder):
    """Tensor hooks that record which parameters each objective's backward reaches.

    Hooks stay registered for the optimizer's lifetime and do nothing outside
    :meth:`MultiObjectiveOptimizer.backward`; they also reject sparse gradients before
    autograd densifies them into the store.
    """

    def _register(self, param: Tensor, index: int) -> Any:
        def hook(grad: Tensor | None) -> None:
            if not self.active or grad is None:  # DDP may call hooks with no gradient
                return
            if grad.layout != torch.strided:
                raise ValueError(
                    f"parameter {index} received a {grad.layout} gradient; gradbal balances "
                    "dense gradients only: build the module with sparse=False (e.g. "
                    "nn.Embedding(..., sparse=False)) and use a dense optimizer"
                )
            self.reached[index] = True

        return param.register_hook(hook)


class MultiObjectiveOptimizer(torch.optim.Optimizer):
    r"""Balance K objectives' gradients, then step any ``torch.optim`` optimizer.

    Usage (three lines change in a training loop)::

        opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                              method="mokd")
        opt.zero_grad()
        opt.backward([loss_task, loss_kd])
        opt.step()

    :meth:`backward` runs one backward pass per objective, each writing straight into its row
    of a flat ``[K, N]`` store (parameters' ``.grad`` are views into it), computes the K x K
    Gram matrix in one pass, the method's weights ``w`` from it on the device, and writes
    ``d = sum_k w_k g_k`` into the parameters' ``.grad`` in a second pass. No host
    synchronisation happens between the first backward and :meth:`step`.

    Which parameters: the balanced gradient of a parameter is ``sum_k w_k g_k`` restricted to
    it. A parameter only one objective reaches therefore gets that objective's gradient times
    its weight; a parameter no objective reaches keeps ``.grad`` as it was (``None`` after
    ``zero_grad``). With ``gram_params="all"`` (default) the Gram matrix, and so the weights,
    describe the update actually applied (every parameter); ``"shared"`` restricts it to the
    parameters that more than one objective reaches. ``"all"`` is the default by measurement:
    on the quickstart, MoKD with a SubspaceProjector (whose parameters only the feature loss
    reaches) reached 85% test accuracy with ``"all"`` and 58% with ``"shared"``, because
    dropping the projector from the Gram matrix makes the feature objective look cheap to
    improve and it takes almost all the weight.

    The wrapper *is* the optimizer for everything built on ``torch.optim``: it shares
    ``param_groups``, ``state`` and ``defaults`` with the wrapped one, so LR schedulers,
    ``torch.amp.GradScaler`` (pass ``scaler=`` to :meth:`backward`, then ``scaler.step(opt)``),
    gradient clipping between ``backward`` and ``step`` and checkpointing work unchanged.

    Methods with trainable parameters (``"uw"``'s log-variances): the wrapper adds one param
    group for them to the wrapped optimizer when it is built (its options come from the
    method, the rest from the optimizer's defaults), and puts the parameters in it on the
    first :meth:`backward`, when K and the device are known. Build LR schedulers after the
    wrapper so they see that group (a scheduler given one value per group, e.g.
    ``LambdaLR`` with a list, needs one for it too).

    Methods that learn from the losses after the parameter step (``"famo"`` and
    ``"mokd_amortized"`` with ``update="after_step"``, the published rule): after
    :meth:`step`, re-evaluate the same batch's losses and pass them to
    :meth:`update_after_step`.

    Args:
        optimizer: the ``torch.optim.Optimizer`` that applies the balanced gradient.
        method: a registered method name (``gradbal.available_methods()``) or a
            :class:`gradbal.methods.Method` instance.
        nonfinite: what :meth:`step` does when an objective's gradient has a NaN/Inf:
            ``"raise"`` (default; ``FloatingPointError`` naming the objective, parameters and
            optimizer state untouched), ``"skip"`` (no update; counted in
            ``last_stats.skipped_steps``) or ``"ignore"``. Checking costs one host sync inside
            ``step()``, as GradScaler's does. Under a GradScaler the scaler handles it.
        gram_params: ``"all"`` or ``"shared"`` (see above).
        seed: seed of the optimizer's own generator (random methods such as PCGrad); ``None``
            draws it from torch's global RNG, so ``torch.manual_seed`` makes runs repeatable.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the two passes.
        process_group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``):
            every objective's gradient and loss value is averaged over its ranks before
            balancing, so each rank takes the step one process would take on the whole batch.
            With DDP, call :meth:`backward` under ``model.no_sync()``
            (see :mod:`gradbal.distributed`). Not needed with ``fully_shard`` parameters
            (DTensors): FSDP's reduce-scatter averages each objective's gradient into this
            rank's shards, and the shard group reduces the partial Gram matrices (1-D meshes
            only: HSDP is refused).
        **method_options: options of the named method (e.g. ``max_norm=1.0`` for MoKD).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        method: str | Method = "mokd",
        *,
        nonfinite: str = "raise",
        gram_params: str = "all",
        seed: int | None = None,
        backend: str = "auto",
        process_group: Any = None,
        **method_options: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "MultiObjectiveOptimizer wraps a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}; e.g. MultiObjectiveOptimizer(torch.optim.SGD(...))"
            )
        if isinstance(optimizer, MultiObjectiveOptimizer):
            raise TypeError("the optimizer is already a MultiObjectiveOptimizer; wrap it once")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if gram_params not in GRAM_PARAMS:
            raise ValueError(f"gram_params must be one of {GRAM_PARAMS}, got {gram_params!r}")
        if backend not in _ops.BACKENDS:
            raise ValueError(f"backend must be one of {_ops.BACKENDS}, got {backend!r}")
        self.method = get_method(method, **method_options)
        # The base initialiser sets up the hook dictionaries and step patching that
        # schedulers and profilers rely on; its own param_groups/state are then replaced
        # by the wrapped optimizer's, so both objects see one set of groups and one state.
        super().__init__([torch.zeros(0, requires_grad=True)], {})
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self.nonfinite = nonfinite
        self.gram_params = gram_params
        self.backend = backend
        self.process_group = process_group
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            group = process_group
            if group is None:  # fully_shard: the ranks must draw the same random orders too
                every = [p for g in optimizer.param_groups for p in g["params"]]
                sharded = [p for p in every if distributed.is_sharded([p])]
                group = distributed.shard_group(sharded) if sharded else None
            if group is not None:
                seed = distributed.broadcast_seed(seed, group)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_stats: StepStats | None = None
        self.skipped_steps = 0
        self.num_objectives: int | None = None
        self._store: GradientStore | None = None
        self._recorder = _ReachRecorder()
        self._pending_nonfinite: Tensor | None = None
        # None: no update_after_step expected; else "pending" (backward done), "stepped"
        # (the wrapped optimizer stepped) or "skipped" (step skipped: non-finite gradients).
        self._after_step: str | None = None
        self._device_generators: dict[torch.device, torch.Generator] = {}
        self._method_group: dict[str, Any] | None = None
        group_options = self.method.param_group()
        if group_options is not None:
            optimizer.add_param_group({**group_options, "params": list(self.method.parameters())})
            self._method_group = optimizer.param_groups[-1]

    # ----------------------------------------------------------------- validation
    def _check_losses(self, losses: Any) -> list[Tensor]:
        if isinstance(losses, Tensor):
            raise TypeError(
                "backward expects a list of scalar losses, one per objective, got a single "
                "tensor; pass [loss_task, loss_kd, ...] (or list(t) for a 1-D tensor of losses)"
            )
        try:
            losses = list(losses)
        except TypeError:
            raise TypeError(
                f"backward expects a list of scalar losses, got {type(losses).__name__}"
            ) from None
        if len(losses) < 2:
            raise ValueError(
                f"backward needs at least 2 losses to balance, got {len(losses)}; for one "
                "objective call loss.backward() and the wrapped optimizer directly"
            )
        for k, loss in enumerate(losses):
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss {k} is a {type(loss).__name__}, expected a torch.Tensor")
            if loss.numel() != 1:
                raise ValueError(
                    f"loss {k} has shape {tuple(loss.shape)}; each loss must be a scalar "
                    "(reduce it with .mean() or .sum())"
                )
            if not loss.requires_grad:
                raise ValueError(
                    f"loss {k} does not require grad: it was computed without a graph "
                    "(under torch.no_grad(), from detached tensors, or from frozen modules)"
                )
            if loss.device != losses[0].device:
                raise ValueError(
                    f"loss {k} is on {loss.device} but loss 0 is on {losses[0].device}; "
                    "compute all losses on one device"
                )
        self.method.check_num_objectives(len(losses))
        if self.method.stateful and self.num_objectives not in (None, len(losses)):
            raise ValueError(
                f"method {self.method.name!r} keeps state for {self.num_objectives} objectives "
                f"but {len(losses)} losses were given; pass the same losses every step or "
                "build a new optimizer"
            )
        return losses

    def _trainable_params(self) -> list[torch.nn.Parameter]:
        seen: set[int] = set()
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params:
            raise ValueError("the optimizer holds no parameter that requires grad")
        return params

    def _attach_recorder(self, params: list[torch.nn.Parameter]) -> None:
        key = tuple(id(p) for p in params)
        if getattr(self, "_recorder_key", None) != key:
            # fully_shard: the sharded parameters are not in the autograd graph (tensor hooks
            # never fire); FSDP calls their post-accumulate-grad hooks after its reduce-scatter.
            sharded = any(distributed.is_sharded([p]) for p in params)
            recorder = distributed.ShardedReachRecorder() if sharded else _ReachRecorder()
            self._recorder.detach()
            self._recorder = recorder
            self._recorder.attach(params)
            self._recorder_key = key

    def _get_store(self, params: list[torch.nn.Parameter]) -> GradientStore:
        key = tuple(id(p) for p in params)
        if self._store is None or self._store.key != key:
            if distributed.is_sharded(params):  # fully_shard: DTensor views of local shards
                self._store = distributed.ShardedGradientStore(params)
            else:
                self._store = GradientStore(params)
        self._attach_recorder(params)
        return self._store

    # ----------------------------------------------------------------- the step
    def _refuse_negative(self, negative: Tensor, loss_values: Tensor) -> None:
        """Raise if any of the (host or device) flags ``negative`` is set."""
        if bool(negative.any()):
            bad = [i for i, v in enumerate(negative.tolist()) if v]
            raise ValueError(
                f"loss {bad[0]} is negative ({loss_values[bad[0]].item():.4g}); method "
                f"{self.method.name!r} scales gradients by 1/loss and needs losses >= 0. "
                "Use a non-negative loss or pass log_scale=False"
            )

    def backward(self, losses: Sequence[Tensor], scaler: Any = None) -> None:
        """Compute every objective's gradient, balance them, write the result into ``.grad``.

        Args:
            losses: K >= 2 scalar losses (the task loss and one or more distillation losses).
            scaler: a ``torch.amp.GradScaler``; each loss is scaled for its backward, the
                weights come from the unscaled Gram matrix (divided by scale^2) and are applied
                to the scaled gradients, so ``.grad`` carries the scale ``scaler.step`` expects.

        On any error nothing changes: parameters, ``.grad``, optimizer and method state are
        as they were before the call.
        """
        losses = self._check_losses(losses)
        k = len(losses)
        params = self._trainable_params()
        loss_values = torch.stack([loss.detach().reshape(()) for loss in losses]).to(
            torch.float64
        )
        enabled_scaler = scaler is not None and scaler.is_enabled()
        # A negative loss must be refused with nothing changed. On a CUDA device the signs are
        # copied to pinned host memory without waiting and read after the K backward passes
        # have been queued (their writes are undone on refusal, as for any error there): a
        # read before the first backward would stall the host until the forward pass ends,
        # leaving the GPU idle while the backward kernels are queued (H100, ResNet-18 batch
        # 128: MoKD's step took 2 ms longer than PCGrad's). Elsewhere it is read at once.
        pending_signs = None
        if self.method.requires_nonnegative_losses:
            negative = loss_values < 0
            if loss_values.is_cuda and self.method.requires_task_gradients:
                pending_signs = _copy_to_host_async(negative)
            else:
                self._refuse_negative(negative, loss_values)
        if not self.method.requires_task_gradients:
            self._backward_weighted_sum(losses, loss_values, scaler if enabled_scaler else None)
            return
        to_backward = [scaler.scale(loss) for loss in losses] if enabled_scaler else losses

        store = self._get_store(params)
        sharded = getattr(store, "sharded", False)
        snapshot = store.snapshot_grads()
        # Everything below may advance the method's state and the generator: put them back
        # if anything fails before the end.
        generator_state = self.generator.get_state()
        method_state = copy.deepcopy(self.method.state_dict()) if self.method.stateful else None
        seed = None
        if self.method.elementwise:
            # Its noise comes from a generator on the rows' device seeded from ours; the seed
            # is read here, before the first backward (a CPU value: no device sync).
            seed = draw_seed(self.generator)
        reached_by: list[list[bool]] = []
        try:
            store.allocate(k)
            store.zero_rows()
            for i, loss in enumerate(to_backward):
                store.point_grads_at_row(i)
                self._recorder.begin(len(params))
                try:
                    # fully_shard: FSDP's hooks reduce-scatter the unsharded gradients into the
                    # sharded parameters, which are not in the graph: no inputs= there.
                    torch.autograd.backward(
                        loss, inputs=None if sharded else params, retain_graph=i < k - 1
                    )
                finally:
                    self._recorder.end()
                reached_by.append(self._recorder.reached)
            if pending_signs is not None:
                host_flags, copied = pending_signs
                copied.synchronize()  # the copy queued before the backward passes
                self._refuse_negative(host_flags, loss_values)
            if sharded:
                # FSDP's reduce-scatter already averaged every row over the ranks.
                loss_values = distributed.average_loss_values(loss_values, store.group)
            elif self.process_group is not None:
                # A rank whose batch gives an objective no gradient is fine: the reach flags
                # are OR-ed over ranks before the check below.
                loss_values, reached_by = distributed.average_objectives(
                    store, loss_values, reached_by, self.process_group
                )
            for i, reached in enumerate(reached_by):
                if not any(reached):
                    raise ValueError(
                        f"loss {i} does not depend on any parameter of the optimizer; check that "
                        "it is computed from the model being trained and that those parameters "
                        "were passed to the optimizer"
                    )
        except RuntimeError as err:
            store.restore_grads(snapshot)
            self.generator.set_state(generator_state)
            if "mark a variable ready only once" in str(err):
                raise RuntimeError(
                    "DistributedDataParallel reduced an objective's gradient by itself: call "
                    "opt.backward(...) inside `with ddp_model.no_sync():` and pass "
                    "process_group= to MultiObjectiveOptimizer (see gradbal.distributed)"
                ) from err
            raise
        except BaseException:
            store.restore_grads(snapshot)
            self.generator.set_state(generator_state)
            raise

        try:
            gram = self._gram(store, k, loss_values.device)
            # A NaN/Inf anywhere in row k makes G_kk non-finite: the check costs no pass.
            # A non-finite loss value is as bad for the methods that read it.
            nonfinite = ~(torch.isfinite(gram.diagonal()) & torch.isfinite(loss_values))
            counts = [sum(col) for col in zip(*reached_by)]
            if self.gram_params == "shared":
                gram = self._drop_unshared(store, gram, reached_by, counts)
            if enabled_scaler:
                scale = scaler._get_scale_async().to(device=gram.device, dtype=torch.float64)
                gram = gram / (scale * scale)
            weights = self.method.weights(gram, loss_values, self.generator)

            # (When .grad was not zeroed and already points into ``out``, the pass adds to it
            # in place: a pass that fails half-way leaves that sum partly added.)
            accumulate = store.prepare_out(snapshot)
            for g in store.groups:
                if seed is not None:
                    gen = self._device_generator(seed, g.device)
                    # fully_shard: the one process's noise, read at this rank's coordinates
                    where = g.coordinates() if sharded else None
                    self.method.combine(
                        g.rows, g.out, accumulate, gen, backend=self.backend, coordinates=where
                    )
                else:
                    w = weights if weights.device == g.device else weights.to(g.device)
                    _ops.combine(g.rows, w, g.out, accumulate=accumulate, backend=self.backend)
            store.point_grads_at_out([c > 0 for c in counts], snapshot)
            stats = StepStats.from_gram(weights, gram, loss_values, nonfinite, self.skipped_steps)
        except BaseException:
            store.restore_grads(snapshot)
            self.generator.set_state(generator_state)
            if method_state is not None:
                self.method.load_state_dict(method_state)
            raise

        self.num_objectives = k
        check = self.nonfinite != "ignore" and not enabled_scaler
        # Finite inputs can still give non-finite weights (a solver on a degenerate Gram).
        flags = torch.cat([nonfinite, ~torch.isfinite(weights).all().reshape(1)])
        self._pending_nonfinite = (flags, method_state, generator_state) if check else None
        self.last_stats = stats
        self._after_step = "pending" if self.method.uses_losses_after_step else None

    def _device_generator(self, seed: int, device: torch.device) -> torch.Generator:
        """This step's generator on ``device`` (one per device, reseeded every step)."""
        gen = self._device_generators.get(device)
        if gen is None:
            gen = self._device_generators[device] = device_generator(seed, device)
        else:
            gen.manual_seed(seed)
        return gen

    def _backward_weighted_sum(
        self, losses: list[Tensor], loss_values: Tensor, scaler: Any
    ) -> None:
        """Loss-based methods: one backward of the method's objective (default
        ``sum_k w_k L_k``, weights detached; UW's also trains its log-variances)."""
        # weights() advances the method's state: put it back if anything below fails.
        saved_state = copy.deepcopy(self.method.state_dict())
        generator_state = self.generator.get_state()
        added = self._attach_method_parameters(len(losses), losses[0])
        params = self._trainable_params()
        snapshot = [p.grad for p in params]
        try:
            sharded = [p for p in params if distributed.is_sharded([p])]
            group = distributed.shard_group(sharded) if sharded else self.process_group
            if group is not None:
                # Same weights on every rank (from the rank-averaged losses), then the
                # weighted gradient is averaged: exactly one process's step on the whole batch.
                loss_values = distributed.average_loss_values(loss_values, group)
            total, weights = self.method.loss_objective(losses, loss_values, self.generator)
            if scaler is not None:
                total = scaler.scale(total)
            self._attach_recorder(params)
            self._recorder.begin(len(params))
            try:
                # fully_shard: FSDP averages into the sharded parameters (not in the graph).
                torch.autograd.backward(total, inputs=None if sharded else params)
            finally:
                self._recorder.end()
            if group is None and not any(self._recorder.reached):
                raise ValueError(
                    "none of the losses depends on any parameter of the optimizer; check that "
                    "they are computed from the model being trained and that its parameters "
                    "were passed to the optimizer"
                )
            if group is not None:  # the plain ones (a method's own); FSDP averaged the rest
                plain = [p for p in params if not distributed.is_sharded([p])]
                distributed.average_grads(plain, group)
        except BaseException:
            for p, g in zip(params, snapshot):
                p.grad = g
            if added:
                self._method_group["params"][:] = [
                    p for p in self._method_group["params"] if not any(p is a for a in added)
                ]
            self.method.load_state_dict(saved_state)
            self.generator.set_state(generator_state)
            raise
        self._after_step = "pending" if self.method.uses_losses_after_step else None
        self.num_objectives = len(losses)
        nonfinite = ~torch.isfinite(loss_values)
        check = self.nonfinite != "ignore" and scaler is None
        if check:
            # One backward of a weighted sum: a NaN/Inf gradient cannot be traced to an
            # objective, so it is flagged on the combined gradient (one small pass).
            grads = [distributed.local_tensor(p.grad) for p in params if p.grad is not None]
            norms = torch.stack([torch.linalg.vector_norm(g).float() for g in grads])
            bad = ~torch.isfinite(norms).all() | ~torch.isfinite(weights).all()
            combined_bad = bad.reshape(1)
            if sharded:  # each rank checked its shards: refuse on every rank or on none
                combined_bad = distributed.all_reduce_sum(combined_bad.double(), group) > 0
            flags = torch.cat([nonfinite, combined_bad.to(nonfinite.device)])
            self._pending_nonfinite = (flags, saved_state, generator_state)
        else:
            self._pending_nonfinite = None
        self.last_stats = StepStats(
            weights=weights,
            gram=None,
            losses=loss_values,
            nonfinite=nonfinite,
            skipped_steps=self.skipped_steps,
        )

    def _attach_method_parameters(self, k: int, like: Tensor) -> list[Tensor]:
        """Build the method's parameters (first backward) and put them in its param group.

        Returns the parameters newly added to the group (to take out again on failure)."""
        if self._method_group is None:
            return []
        self.method.build_parameters(k, like.device, like.dtype)
        return self._sync_method_group()

    def _sync_method_group(self) -> list[Tensor]:
        """Make the method's param group hold exactly ``method.parameters()``; return the new."""
        group = self._method_group
        if group is None:
            return []
        current = list(self.method.parameters())
        added = [p for p in current if not any(p is q for q in group["params"])]
        if added or len(current) != len(group["params"]):
            group["params"][:] = current
        return added

    def _gram(self, store: GradientStore, k: int, device: torch.device) -> Tensor:
        gram = None
        for g in store.groups:
            part = _ops.gram(g.rows, backend=self.backend)
            part = part if part.device == device else part.to(device)
            gram = part if gram is None else gram + part
        if getattr(store, "sharded", False):  # local partial Grams -> the Gram matrix
            gram = distributed.all_reduce_sum(gram, store.group)
        return gram

    def _drop_unshared(
        self,
        store: GradientStore,
        gram: Tensor,
        reached_by: list[list[bool]],
        counts: list[int],
    ) -> Tensor:
        """Remove parameters only one objective reaches from the Gram matrix.

        Such a parameter's rows are zero for every other objective, so it only adds
        ``||g_k||^2`` over its segment to ``G_kk``: subtracting that (one small read of those
        segments) gives the Gram matrix of the shared parameters.
        """
        unshared = [i for i, c in enumerate(counts) if c == 1]
        if not unshared:
            return gram
        correction = torch.zeros(gram.shape[0], dtype=torch.float64, device=gram.device)
        for i in unshared:
            owner = next(k for k, reached in enumerate(reached_by) if reached[i])
            seg = store.row_segment(i, owner).double()
            correction[owner] += (seg @ seg).to(gram.device)
        if getattr(store, "sharded", False):
            correction = distributed.all_reduce_sum(correction, store.group)
        return gram - torch.diag(correction)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply the balanced gradient with the wrapped optimizer.

        ``closure``, if given, is called with grad enabled and must call
        :meth:`backward` itself; its return value is returned.
        """
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        pending, self._pending_nonfinite = self._pending_nonfinite, None
        if pending is not None and bool(pending[0].any()):  # one sync, like GradScaler's
            flags, method_state, generator_state = pending
            # A refused step leaves no trace: the method's state and the generator go back
            # to where they were before this step's backward.
            if method_state is not None:
                self.method.load_state_dict(method_state)
            self.generator.set_state(generator_state)
            *per_objective, _ = flags.tolist()  # the last flag: weights / combined gradient
            bad = [i for i, v in enumerate(per_objective) if v]
            if self.nonfinite == "raise":
                what = (
                    f"objective(s) {bad} produced non-finite gradients or loss values (NaN or Inf)"
                    if bad
                    else "the balanced gradient or its weights are not finite (NaN or Inf)"
                )
                raise FloatingPointError(
                    f"{what}; nothing was updated. Check those losses, lower the learning rate, "
                    "or pass nonfinite='skip' to skip such steps"
                )
            self.skipped_steps += 1
            if self.last_stats is not None:
                self.last_stats.skipped_steps = self.skipped_steps
            if self._after_step is not None:
                self._after_step = "skipped"
            return result
        self.optimizer.step()
        if self._after_step is not None:
            self._after_step = "stepped"
        return result

    @torch.no_grad()
    def update_after_step(self, losses_after: Sequence[Tensor] | Tensor) -> None:
        """Pass the losses re-evaluated after :meth:`step` to the method (FAMO's published rule).

        For methods that learn from the progress the step made (``"famo"`` and
        ``"mokd_amortized"`` built with ``update="after_step"``)::

            opt.zero_grad()
            opt.backward(losses(model, batch))
            opt.step()
            with torch.no_grad():
                opt.update_after_step(losses(model, batch))  # same batch, new parameters

        Call it once per step, after :meth:`step` (or ``scaler.step(opt)``). When the step
        did not happen (skipped for non-finite gradients, or a GradScaler skipped it) it does
        nothing: the parameters did not move. No host synchronisation.

        Args:
            losses_after: the K losses (scalar tensors, or one tensor of K values).
        """
        if not self.method.uses_losses_after_step:
            raise RuntimeError(
                f"method {self.method.name!r} takes no losses after the step; FAMO and "
                "mokd_amortized do when built with update='after_step'"
            )
        if self._after_step is None:
            raise RuntimeError(
                "update_after_step must follow backward() and step(), once per step"
            )
        if isinstance(losses_after, Tensor):
            values = losses_after.detach().reshape(-1)
        else:
            values = [torch.as_tensor(v).detach().reshape(()) for v in losses_after]
            values = torch.stack(values) if values else torch.zeros(0)
        if values.shape[0] != self.num_objectives:
            raise ValueError(
                f"update_after_step expects the {self.num_objectives} losses of the step, got "
                f"{values.shape[0]}"
            )
        status, self._after_step = self._after_step, None
        if status != "stepped":
            return  # skipped step or a step GradScaler skipped (step() never called)
        self.method.update_after_step(values.to(torch.float64))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Same as the wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._pending_nonfinite = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Called once by the base initialiser before self.optimizer exists.
        if "optimizer" not in self.__dict__:
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus the method's state and the generator."""
        return {
            "optimizer": self.optimizer.state_dict(),
            _STATE_KEY: {
                "method": self.method.name,
                "method_state": self.method.state_dict(),
                "generator": self.generator.get_state(),
                "skipped_steps": self.skipped_steps,
                "num_objectives": self.num_objectives,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or _STATE_KEY not in state_dict:
            raise ValueError(
                "not a MultiObjectiveOptimizer state dict (no 'gradbal' entry); a plain "
                "optimizer's state dict loads with opt.optimizer.load_state_dict(...)"
            )
        ours = state_dict[_STATE_KEY]
        if ours["method"] != self.method.name:
            raise ValueError(
                f"the checkpoint was saved with method {ours['method']!r}, this optimizer "
                f"uses {self.method.name!r}"
            )
        generator = torch.Generator()
        generator.set_state(ours["generator"])  # validate before changing anything
        # The method first: a method with parameters (UW) materialises them, so that the
        # wrapped optimizer's state finds them in their param group.
        method_before = copy.deepcopy(self.method.state_dict())
        group_before = None if self._method_group is None else list(self._method_group["params"])
        group_list = None if self._method_group is None else self._method_group["params"]
        try:
            self.method.load_state_dict(ours["method_state"])
            self._sync_method_group()
            self.optimizer.load_state_dict(state_dict["optimizer"])
        except BaseException:
            self.method.load_state_dict(method_before)
            if group_before is not None:
                self._method_group["params"][:] = group_before
            raise
        self.generator.set_state(ours["generator"])
        self.skipped_steps = int(ours["skipped_steps"])
        self.num_objectives = ours["num_objectives"]
        # The wrapped optimizer may rebind its state dict; keep sharing it.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        if group_list is not None:
            # torch rebuilds the group dicts around the same "params" lists.
            self._method_group = next(
                g for g in self.optimizer.param_groups if g["params"] is group_list
            )
        self._after_step = None

    def __repr__(self) -> str:
        return f"MultiObjectiveOptimizer({self.method!r}, {self.optimizer!r})"
