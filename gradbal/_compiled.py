"""``compile_method``: a method whose K x K stage runs as one ``torch.compile``-d program.

Between the two passes over the gradients a method runs only K x K work, as small tensor ops:
the interior-point solvers for K > 8 dispatch 600-1700 of them per step. On a CPU each op
costs a few microseconds whatever its size, on a GPU each is a kernel launch, so the count,
not the arithmetic, is the cost. ``torch.compile`` fuses the elementwise ops of that
fixed-shape, branch-free program into a few generated kernels (the solvers were written for
it: fixed iteration counts, no host synchronisation, no Python branch on a tensor value), and
on CUDA its ``"reduce-overhead"`` mode replays the whole stage as one CUDA graph.

Measured on the 2-core CPU VM (1 thread; ``python benchmarks/bench_weights.py --threads 1
--reps 60 --compile``, eager and compiled calls round-robin; table in benchmarks/RESULTS.md):
at K = 16 the compiled stage is 1.4-3.6x faster (gradvac 3.6x, mgda and mokd 3.4x, cagrad
2.8x, dualproj 2.1x, upgrad 1.5x) and most methods gain 1.1-2.0x at K = 2 and 4; it is
slower for the few-op K = 2 closed forms (pcgrad, imtl_g, config, mgda: 0.64-0.88x, the
wrapper's snapshot and warning filter and Dynamo's guards cost ~15-20 us), for aligned_mtl
at K >= 4 (LAPACK's eigendecomposition is most of it) and for the K = 8 support
enumerations of mgda and dualproj (0.6-0.7x). The price is a compilation on the first call
for each K (up to 30 s: CAGrad's K = 16 interior point took 29.6 s; a second, shorter one when
a method's Python caches fill on its first call), so it pays in training loops, not in
one-off calls. On an H100 (2026-11-26, ``bench_weights.py --device cuda --compile``) the
K = 4 stage of mokd went from 1298 to 427 us (3.0x) and mgda from 814 to 332 us (2.5x).

Only :meth:`Method.weights` is compiled; everything else (state, trainable parameters,
elementwise passes) is the wrapped method's own. A compilation that fails (no C++ compiler
for the CPU backend, an unsupported GPU) warns once and the method runs eagerly from then on;
an error that the eager method raises as well (a bad input) propagates unchanged.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import torch
from torch import Tensor

from .methods import Method, get_method
from .methods._wrapper import MethodWrapper

__all__ = ["CompiledMethod", "compile_method"]


class CompiledMethod(MethodWrapper):
    """A :class:`~gradbal.methods.Method` whose :meth:`weights` is ``torch.compile``-d.

    Built by :func:`compile_method`; behaves as the wrapped method (``.method``) in every
    other respect: same name, flags, state and options (attribute reads fall through).
    """

    def __init__(self, method: Method, mode: str | None = None, **compile_options: Any):
        if isinstance(method, CompiledMethod):
            raise TypeError("the method is already compiled; compile it once")
        super().__init__(method)
        self.mode = mode
        self.compile_options = compile_options
        self._compiled: dict[str | None, Any] = {}  # resolved mode -> compiled weights
        self._working: set[tuple] = set()  # (mode, shape, device, dtype) that ran compiled

    def _mode_for(self, ref: Tensor) -> str | None:
        """``mode``, or with ``mode=None`` (``ref``: the Gram matrix, or the losses): CUDA graphs (``"reduce-overhead"``) for a
        stateless method on a CUDA device, inductor's default elsewhere (a CUDA graph would
        replay a stateful method's state tensors from static buffers that the next replay
        overwrites)."""
        if self.mode is not None:
            return self.mode
        if ref.is_cuda and not self.method.stateful:
            return "reduce-overhead"
        return None

    def weights(self, gram, losses, generator=None):
        if self._failed:
            return self.method.weights(gram, losses, generator)
        ref = gram if gram is not None else losses
        # A bad K raises here, eagerly, before anything is traced.
        self.method.check_num_objectives(ref.shape[-1])
        mode = self._mode_for(ref)
        fn = self._compiled.get(mode)
        if fn is None:
            fn = self._compiled[mode] = torch.compile(
                _own_entry(self.method), mode=mode, **self.compile_options
            )
        # Contiguous inputs: Dynamo guards on strides, and a strided view (a slice of a
        # larger Gram matrix) would otherwise compile the program once more.
        if gram is not None:
            gram = gram.contiguous()
        key = (mode, tuple(ref.shape), ref.device, ref.dtype)
        # What an eager retry must start from: a program with graph breaks runs its first
        # parts (state updates, random draws) before a later part fails to compile, and a
        # recompilation can come at any call (a new value of a Python-int state). State
        # dicts are clones (one small copy per state tensor); stateless methods have none.
        state = self.method.state_dict() if self.method.stateful else None
        gen_state = generator.get_state() if generator is not None else None
        try:
            with warnings.catch_warnings():
                # Dynamo traces through the solvers' lru_cache'd constant builders (pure
                # functions of K, device and dtype, so tracing them is exact) and says so;
                # inductor's lowering warns about its own deprecations. Both can come at any
                # call: a method's Python caches (its target vectors) fill on the first call,
                # so the second compiles once more.
                warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
                w = fn(gram, losses, generator)
            self._working.add(key)
        except Exception as err:  # noqa: BLE001 - a compiler failure of any kind
            if state is not None:
                self.method.load_state_dict(state)
            if gen_state is not None:
                generator.set_state(gen_state)
            return self._eager_from_now_on("torch.compile", err, gram, losses, generator)
        return self._finish(w, mode)

    @staticmethod
    def _finish(w: Tensor, mode: str | None) -> Tensor:
        # A CUDA graph's output lives in a static buffer that the next replay overwrites;
        # the caller (and last_stats) may keep the weights longer than one step.
        return w.clone() if mode == "reduce-overhead" else w

    def __repr__(self) -> str:
        return f"compile_method({self.method!r}, mode={self.mode!r})"


_entries = itertools.count()


def _own_entry(method: Method):
    """``method.weights`` behind an entry function with a code object of its own.

    Dynamo keeps its compiled programs on the code object of the frame it compiles, at most
    ``torch._dynamo.config.recompile_limit`` (8) per code object, and beyond that runs the
    frame eagerly without a word. Every instance of a class shares ``weights``' code object
    (mgda_gn, mgda_l2, mgda_loss and mgda_loss+ are one class), so a few of them at a few K
    would exhaust it and leave the later ones silently eager. With an entry of its own each
    compiled method counts only its own recompilations (one per K; a method whose Python
    state is an int, Nash-MTL's step counter, recompiles once more, after which Dynamo
    treats that int as dynamic)."""

    def weights(gram, losses, generator):
        return method.weights(gram, losses, generator)

    code = weights.__code__
    weights.__code__ = code.replace(co_name=f"{code.co_name}_{method.name}_{next(_entries)}")
    return weights


def compile_method(
    method: str | Method, *, mode: str | None = None, compile_options: dict | None = None, **method_options: Any
) -> CompiledMethod:
    """The method ``method`` (a registered name with its options, or a Method) with its
    K x K stage compiled by ``torch.compile`` (see the module docstring for when it pays).

    Use it wherever a method goes::

        opt = gradbal.MultiObjectiveOptimizer(sgd, method=gradbal.compile_method("upgrad"))
        upgrad = gradbal.compile_method("upgrad")  # keep it: it compiles once per K
        d = gradbal.aggregate(grads, upgrad)

    Args:
        method: a registered name or a :class:`~gradbal.methods.Method`.
        mode: ``torch.compile``'s mode; ``None`` (default) picks ``"reduce-overhead"`` (CUDA
            graphs) for stateless methods on CUDA and inductor's default otherwise.
        compile_options: further keyword arguments of ``torch.compile`` (``backend``, ...).
        **method_options: options of the named method.
    """
    return CompiledMethod(get_method(method, **method_options), mode=mode, **(compile_options or {}))
