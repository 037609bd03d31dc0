"""Balancing methods: each maps the K x K Gram matrix (and loss values) to K weights.

Adding a method: subclass :class:`Method`, implement ``weights(gram, losses, generator)``
with tensor ops only, decorate it with ``@register_method("name")`` and import its module
here. See docs/ADDING_A_METHOD.md.
"""

from ._base import Method
from ._registry import available_methods, get_method, register_method
from .aligned_mtl import AlignedMTL
from .cagrad import CAGrad
from .config import ConFIG
from .dual_cone import DualProj, UPGrad
from .dwa import DWA
from .fairgrad import FairGrad
from .famo import FAMO, MoKDAmortized
from .fixed import Mean, Sum, Weighted
from .graddrop import GradDrop
from .gradvac import GradVac
from .imtl import IMTLG
from .mgda import MGDA
from .mgda_normalized import MGDAL2, MGDALoss, MGDALossPlus, MGDANormalized
from .mokd import MoKD
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .random_weighting import RLW
from .uw import UW

__all__ = [
    "DWA",
    "FAMO",
    "IMTLG",
    "MGDA",
    "MGDAL2",
    "RLW",
    "UW",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "MGDALoss",
    "MGDALossPlus",
    "MGDANormalized",
    "Mean",
    "Method",
    "MoKD",
    "MoKDAmortized",
    "NashMTL",
    "PCGrad",
    "Sum",
    "UPGrad",
    "Weighted",
    "available_methods",
    "get_method",
    "register_method",
]
