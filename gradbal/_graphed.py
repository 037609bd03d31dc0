"""``graph_method``: a method whose K x K stage is replayed from a CUDA graph.

On a GPU every small tensor op of the K x K stage is a kernel launch: measured on an H100
(2026-11-26, ``python3 benchmarks/bench_weights.py --device cuda``), a median 15 us each, so MoKD's
19-op K = 2 closed form takes 0.25 ms and the K = 16 interior point (822 ops) 13 ms, while
the two passes over a [2, 1e7] store take 0.13 ms. The stage has fixed shapes, fixed
iteration counts and no host synchronisation (``tests/methods/test_no_sync.py``), which is
exactly what a CUDA graph needs: captured once per input shape, it replays every launch of
the stage as one.

Per (Gram shape, losses shape, dtypes, device) the first call warms the method up twice on a
side stream (its constant tensors and library handles are made there, outside the graph) and
captures one call into a ``torch.cuda.CUDAGraph`` that reads static input buffers. Every call
then copies G and the losses into those buffers, replays, and returns a clone of the static
output (the next replay overwrites it; the caller and ``last_stats`` may keep the weights).

Only methods whose weights are a function of (G, losses) alone can be replayed: stateless
(no state read or written across steps: a graph would bake in the first step's state) and
drawing nothing from the generator (``Method.draws_random``; a graph would replay the first
step's draw). Others are refused with an error that says so; for them use
:func:`gradbal.compile_method`. On CPU tensors the method runs as it is (graphs are CUDA's).
A capture that fails (an op that synchronises or allocates in a way capture forbids, on some
torch/CUDA version) warns once, and the method runs eagerly from then on.

Measured on an H200 (2026-11-26, ``python3 benchmarks/bench_weights.py --device cuda --graph
--no-ops``; benchmarks/RESULTS.md): a replay costs 50-81 us at K = 2 and 85-201 us at K = 4-8,
3.0-7.2x less than the eager stage of the solver methods; the GPU tests
(``tests/test_graphed.py``) passed there. The first call per shape synchronises the device
once (``torch.cuda.graph`` does before capturing).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .methods import Method, get_method
from .methods._wrapper import MethodWrapper

__all__ = ["GraphedMethod", "graph_method"]

_WARMUP_CALLS = 2  # the first call fills the caches; the second runs as every later one


class GraphedMethod(MethodWrapper):
    """A :class:`~gradbal.methods.Method` whose :meth:`weights` replays a CUDA graph on CUDA
    inputs. Built by :func:`graph_method`; the wrapped method (``.method``) in every other
    respect."""

    def __init__(self, method: Method):
        refused = [why for flag, why in (
            (method.stateful, "keeps state across steps"),
            (method.draws_random, "draws from the generator"),
            (method.elementwise, "runs its own pass over the gradients"),
        ) if flag]
        if refused:
            raise ValueError(
                f"method {method.name!r} {' and '.join(refused)}, so its weights are not a "
                "function of (G, losses) that a CUDA graph can replay; use "
                f"gradbal.compile_method({method.name!r}) instead"
            )
        super().__init__(method)
        # key -> (graph, static gram, static losses, static output)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor | None, Tensor | None, Tensor]] = {}

    @staticmethod
    def _key(gram: Tensor | None, losses: Tensor | None) -> tuple:
        return tuple(
            None if t is None else (tuple(t.shape), t.dtype, t.device) for t in (gram, losses)
        )

    def _capture(self, gram: Tensor | None, losses: Tensor | None):
        static_gram = None if gram is None else gram.detach().clone()
        static_losses = None if losses is None else losses.detach().clone()
        device = (gram if gram is not None else losses).device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_CALLS):
                self.method.weights(static_gram, static_losses, None)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.method.weights(static_gram, static_losses, None)
        return graph, static_gram, static_losses, static_out

    def weights(self, gram, losses, generator=None):
        ref = gram if gram is not None else losses
        if self._failed or ref is None or not ref.is_cuda:
            return self.method.weights(gram, losses, generator)
        # A bad K raises here, eagerly, before anything is captured.
        self.method.check_num_objectives(ref.shape[-1])
        key = self._key(gram, losses)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(gram, losses)
            except Exception as err:  # noqa: BLE001 - a capture failure of any kind
                return self._eager_from_now_on("CUDA graph capture", err, gram, losses, generator)
            self._graphs[key] = entry
        graph, static_gram, static_losses, static_out = entry
        if static_gram is not None:
            static_gram.copy_(gram)
        if static_losses is not None:
            static_losses.copy_(losses)
        graph.replay()
        return static_out.clone()

    def __repr__(self) -> str:
        return f"graph_method({self.method!r})"


def graph_method(method: str | Method, **method_options: Any) -> GraphedMethod:
    """The method ``method`` (a registered name with its options, or a Method) with its K x K
    stage replayed from a CUDA graph on CUDA inputs (see the module docstring)::

        opt = gradbal.MultiObjectiveOptimizer(sgd, method=gradbal.graph_method("upgrad"))

    Raises ValueError for a stateful or random method (use :func:`gradbal.compile_method`).
    """
    return GraphedMethod(get_method(method, **method_options))
