"""gradbal: multi-objective gradient balancing for PyTorch, built for knowledge distillation.

Three lines to adopt::

    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                          method="mokd")
    opt.backward([loss_task, loss_kd])
    opt.step()
"""

from ._aggregate import aggregate
from ._optimizer import MultiObjectiveOptimizer
from .diagnostics import StepStats
from .methods import Method, available_methods, get_method, register_method

__version__ = "0.1.0"

__all__ = [
    "Method",
    "MultiObjectiveOptimizer",
    "StepStats",
    "aggregate",
    "available_methods",
    "get_method",
    "register_method",
]
