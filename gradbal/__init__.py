"""gradbal: multi-objective gradient balancing for PyTorch, built for knowledge distillation.

Three lines to adopt::

    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                          method="mokd")
    opt.backward([loss_task, loss_kd])
    opt.step()
"""

from ._aggregate import aggregate
from ._compiled import CompiledMethod, compile_method
from ._graphed import GraphedMethod, graph_method
from ._optimizer import MultiObjectiveOptimizer
from .diagnostics import StepStats
from .kd import FeatureCapture, FrozenTeacher, kd_loss
from .methods import Method, available_methods, get_method, register_method
from .projector import SubspaceProjector

__version__ = "0.1.0"

__all__ = [
    "CompiledMethod",
    "FeatureCapture",
    "FrozenTeacher",
    "GraphedMethod",
    "Method",
    "MultiObjectiveOptimizer",
    "StepStats",
    "SubspaceProjector",
    "aggregate",
    "available_methods",
    "compile_method",
    "get_method",
    "graph_method",
    "kd_loss",
    "register_method",
]
