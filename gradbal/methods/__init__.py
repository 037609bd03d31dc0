"""Balancing methods: each maps the K x K Gram matrix (and loss values) to K weights.

Adding a method: subclass :class:`Method`, implement ``weights(gram, losses, generator)``
with tensor ops only, decorate it with ``@register_method("name")`` and import its module
here. See docs/ADDING_A_METHOD.md.
"""

from ._base import Method
from ._registry import available_methods, get_method, register_method
from .fixed import Mean, Sum, Weighted
from .mgda import MGDA
from .mokd import MoKD
from .pcgrad import PCGrad

__all__ = [
    "MGDA",
    "Mean",
    "Method",
    "MoKD",
    "PCGrad",
    "Sum",
    "Weighted",
    "available_methods",
    "get_method",
    "register_method",
]
