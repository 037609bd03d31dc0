"""``MethodWrapper``: a method that runs another method's K x K stage differently (compiled,
replayed from a CUDA graph) and is that method in every other respect.

Subclasses override :meth:`weights` only. Everything else a caller may read (the name, the
class-level flags, options such as ``.c`` or ``.pref``, state, trainable parameters, the
elementwise pass, the loss objective, the after-step update) is the wrapped method's, so a
wrapped method goes wherever a method goes: ``MultiObjectiveOptimizer``, ``aggregate``,
checkpoints.
"""

from __future__ import annotations

import warnings
from typing import Any

from ._base import Method

# Class attributes of Method that the optimizer and aggregate read; mirrored per instance.
_FLAGS = (
    "name", "requires_losses", "stateful", "requires_task_gradients", "needs_gram", "elementwise",
    "draws_random",
)


class MethodWrapper(Method):
    """Delegates everything but :meth:`weights` to ``self.method``."""

    def __init__(self, method: Method):
        if isinstance(method, MethodWrapper):
            raise TypeError(
                f"the method is already wrapped ({method!r}); wrap the plain method once"
            )
        if not isinstance(method, Method):
            raise TypeError(f"expected a gradbal Method, got {type(method).__name__}")
        self.method = method
        # The flags are class attributes of the wrapped method's class; mirror them here so
        # that code reading them from the class-level defaults sees the wrapped values.
        for flag in _FLAGS:
            setattr(self, flag, getattr(method, flag))
        self._failed = False  # set by _eager_from_now_on: run the plain method from then on

    def _eager_from_now_on(self, what: str, err: Exception, gram, losses, generator):
        """After ``what`` failed with ``err``: the eager weights, one RuntimeWarning, and eager
        calls from then on (``self._failed``). If the eager call raises too, the input was
        bad: its error propagates, and nothing is marked failed."""
        w = self.method.weights(gram, losses, generator)
        self._failed = True
        first_line = str(err).splitlines()[0] if str(err) else ""
        warnings.warn(
            f"gradbal: {what} of method {self.name!r} failed ({type(err).__name__}: "
            f"{first_line}); running it eagerly from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return w

    def __getattr__(self, attr: str) -> Any:
        # Only reached for attributes this object lacks: the wrapped method's options
        # (``.c``, ``.pref``, ...). Guard against recursion before ``method`` is set.
        if attr == "method":
            raise AttributeError(attr)
        return getattr(self.method, attr)

    @property
    def requires_nonnegative_losses(self) -> bool:
        return self.method.requires_nonnegative_losses

    def combine(self, *args, **kwargs):
        return self.method.combine(*args, **kwargs)

    def loss_objective(self, *args, **kwargs):
        return self.method.loss_objective(*args, **kwargs)

    def param_group(self):
        return self.method.param_group()

    def build_parameters(self, *args, **kwargs) -> None:
        self.method.build_parameters(*args, **kwargs)

    def parameters(self):
        return self.method.parameters()

    @property
    def uses_losses_after_step(self) -> bool:
        return self.method.uses_losses_after_step

    def update_after_step(self, losses_after):
        self.method.update_after_step(losses_after)

    def check_num_objectives(self, k: int) -> None:
        self.method.check_num_objectives(k)

    def state_dict(self):
        return self.method.state_dict()

    def load_state_dict(self, state) -> None:
        self.method.load_state_dict(state)
