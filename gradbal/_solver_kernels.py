"""When the K x K stage's Triton kernels run, and what happens when one fails.

The solvers of :mod:`gradbal.solvers`, :mod:`gradbal.solvers_qp` and MoKD's weights each have
a one-launch kernel in :mod:`gradbal.kernels` (``jacobi_eigh``, ``min_norm``,
``mokd_weights``, ``mgda_normalized_weights``, ``dual_cone``, ``fair_weights``, ``pcgrad_weights``,
``gradvac_weights``, ``cagrad_direction``; Aligned-MTL's, IMTL-G's and ConFIG's whole stage:
``aligned_mtl_weights``, ``imtl_g_weights``, ``config_weights``) beside their torch ops. One rule decides for all of them
(:class:`SolverKernel`): the kernel runs for a Gram matrix that

* lives on a CUDA device (on the CPU the torch ops have no launches to save);
* has ``k_min <= K <= MAX_K`` (below ``k_min`` a closed form of a few ops wins);
* is not being traced by ``torch.compile`` (``gradbal.compile_method``: there the torch ops
  are what the compiler fuses, and the compiled methods' CUDA tests ran them);

unless ``GRADBAL_BACKEND=torch`` forces the torch ops, Triton is missing, or the kernel
failed earlier in this process. A failure (a GPU that Triton cannot compile for) warns once
and the torch ops answer, then and from then on: never silently wrong results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._ops import env_backend, kernel_function, warn_kernel_failure

__all__ = [
    "ALIGNED_MTL", "CAGRAD", "CONFIG", "DUAL_CONE", "EIGH", "FAIR", "GRADVAC", "IMTL_G", "MAX_K", "MGDA_NORMALIZED",
    "MIN_NORM", "MOKD_WEIGHTS", "PCGRAD", "SolverKernel", "kernel_input",
]

#: Largest K of the K x K kernels (``gradbal.kernels._launch.KXK_MAX_K``, kept here so that
#: choosing a path imports no Triton; tests/kernels/test_solver_kernels.py checks they agree).
MAX_K = 32


def kernel_input(gram: Tensor) -> Tensor:
    """``gram`` as the kernels read it: float64 or float32 with any strides (they symmetrise
    and zero non-finite entries themselves, so no torch op runs before the launch)."""
    return gram if gram.dtype in (torch.float64, torch.float32) else gram.to(torch.float64)


class SolverKernel:
    """One K x K kernel of :mod:`gradbal.kernels` as a solver sees it.

    Args:
        name: the kernel's function in :mod:`gradbal.kernels`.
        what: how the one warning names it ("the Triton min-norm kernel").
        instead: what runs after a failure ("the torch solvers").
        k_min: the smallest K it runs for.
    """

    def __init__(self, name: str, what: str, instead: str, k_min: int) -> None:
        self.name = name
        self.what = what
        self.instead = instead
        self.k_min = k_min
        #: Set by the first failure: the torch ops run from then on.
        self.failed = False

    def usable(self, gram: Tensor) -> bool:
        """Whether the kernel runs for ``gram`` (the module docstring's rule)."""
        return (
            gram.is_cuda
            and not torch.compiler.is_compiling()
            and self.k_min <= gram.shape[-1] <= MAX_K
            and not self.failed
            and env_backend() != "torch"
            and kernel_function(self.name) is not None
        )

    def run(self, gram: Tensor, *args, **kwargs):
        """``gradbal.kernels.<name>(gram, *args, **kwargs)``, or None after a failure (warned
        once; the caller then runs its torch ops)."""
        try:
            return self.forced(gram, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any kernel failure: warn once, use torch
            self.failed = True
            # warn_kernel_failure counts from run(): point at the solver's caller.
            warn_kernel_failure(self.what, self.instead, err, stacklevel=3)
            return None

    def forced(self, gram: Tensor, *args, **kwargs):
        """The kernel without the fallback (``sym_eig(method="triton")``): raises where it
        cannot run."""
        fn = kernel_function(self.name)
        if fn is None:
            raise RuntimeError(
                f"gradbal.kernels.{self.name} is unavailable: install the 'triton' extra, "
                "or use the torch solver"
            )
        return fn(kernel_input(gram), *args, **kwargs)

    def __repr__(self) -> str:
        return f"SolverKernel({self.name!r}, k_min={self.k_min}, failed={self.failed})"


#: :func:`gradbal.solvers_qp.sym_eig` (Aligned-MTL, IMTL-G, ConFIG).
EIGH = SolverKernel(
    "jacobi_eigh", "the Triton eigendecomposition kernel", "the torch Jacobi method", k_min=1
)
#: :func:`gradbal.solvers.min_norm_simplex` (MGDA and its variants); K = 2 is a closed form.
MIN_NORM = SolverKernel("min_norm", "the Triton min-norm kernel", "the torch solvers", k_min=3)
#: MoKD's whole weight stage (:class:`gradbal.methods.MoKD`); at K = 2 one launch still
#: replaces its ~19 ops.
MOKD_WEIGHTS = SolverKernel(
    "mokd_weights", "the Triton MoKD weights kernel", "the torch solvers", k_min=2
)
#: :class:`gradbal.methods.MGDANormalized`'s whole stage (normaliser, min-norm, rescaling); at
#: K = 2 one launch still replaces its ~20 ops.
MGDA_NORMALIZED = SolverKernel(
    "mgda_normalized_weights", "the Triton normalised-MGDA kernel", "the torch solvers", k_min=2
)
#: :func:`gradbal.solvers_qp.project_dual_cone` (UPGrad, DualProj); K = 2 is a closed form.
DUAL_CONE = SolverKernel("dual_cone", "the Triton dual-cone kernel", "the torch solvers", k_min=3)
#: :func:`gradbal.solvers_qp.fair_weights` (FairGrad, Nash-MTL); K = 2 with alpha = 1 is a
#: closed form.
FAIR = SolverKernel("fair_weights", "the Triton FairGrad kernel", "the torch solvers", k_min=3)
#: :class:`gradbal.methods.PCGrad`'s rounds; K = 2 is a closed form of three ops.
PCGRAD = SolverKernel("pcgrad_weights", "the Triton PCGrad kernel", "the torch ops", k_min=3)
#: :class:`gradbal.methods.GradVac`'s rounds (its K = 2 form is still ~30 ops).
GRADVAC = SolverKernel("gradvac_weights", "the Triton GradVac kernel", "the torch ops", k_min=2)
#: :class:`gradbal.methods.CAGrad`'s inner problem and direction (its K = 2 form is ~34 ops).
CAGRAD = SolverKernel("cagrad_direction", "the Triton CAGrad kernel", "the torch solvers", k_min=2)
#: :class:`gradbal.methods.AlignedMTL`'s whole stage (eigendecomposition and weights); at K = 2
#: one launch still replaces its closed form's 20 ops.
ALIGNED_MTL = SolverKernel(
    "aligned_mtl_weights", "the Triton Aligned-MTL kernel", "the torch ops", k_min=2
)
#: :class:`gradbal.methods.IMTLG`'s whole stage; K = 2 is a closed form of 9 ops.
IMTL_G = SolverKernel("imtl_g_weights", "the Triton IMTL-G kernel", "the torch ops", k_min=3)
#: :class:`gradbal.methods.ConFIG`'s whole stage; K = 2 with a uniform pref_vector is a closed
#: form of 11 ops (a non-uniform one at K = 2 keeps the torch ops around jacobi_eigh).
CONFIG = SolverKernel("config_weights", "the Triton ConFIG kernel", "the torch ops", k_min=3)
