"""Fused Triton kernels for the two memory-bound passes of a balanced step (``gradbal.kernels``).

A step over K task gradients stored as the rows of a [K, N] matrix reads the rows twice and
writes one row: the floor is (2K + 1) x N x element size bytes.

* :func:`gram` / :func:`gram_with_nonfinite` (:mod:`.gram`): all K(K+1)/2 dot products in one
  read, fp32 accumulation, deterministic two-stage reduction, float64 [K, K] result (and a
  per-row count of inf/NaN entries from the same read).
* :func:`combine` (:mod:`.combine`): ``out (+)= scale * sum_k w_k rows[k]`` in one read and one
  write, in place into a row of the store if asked.
* :func:`graddrop` (:mod:`.graddrop`): GradDrop's elementwise pass (sign purity against
  caller-made uniforms, the surviving sum) in one read of the rows and one write, bit-identical
  to the torch pass in ``gradbal._ops``.
* :func:`jacobi_eigh` (:mod:`.eigh`): the K x K stage's symmetric eigendecomposition (batched,
  K <= 32) by cyclic Jacobi rotations in registers, one launch, sorted ascending.
* :func:`aligned_mtl_weights`, :func:`imtl_g_weights`, :func:`config_weights` (:mod:`.spectral`):
  the whole K x K stage of Aligned-MTL, IMTL-G and ConFIG (the same Jacobi sweeps, then the
  weights from the eigenpairs), one launch.
* :func:`min_norm` (:mod:`.min_norm`): the min-norm simplex weights of MGDA and MoKD (batched,
  K <= 32) by a primal active-set method on a swept matrix in registers, one launch;
  :func:`mokd_weights` fuses MoKD's loss scaling, magnitude and clipping around it,
  :func:`mgda_normalized_weights` MGDA's gradient normalisers (l2, loss, loss+).
* :func:`dual_cone` (:mod:`.dual_cone`): UPGrad's and DualProj's projections onto the dual cone
  (one program per projected vector, K <= 32), the same active-set machinery, one launch.
* :func:`pcgrad_weights`, :func:`gradvac_weights` (:mod:`.surgery`): PCGrad's and GradVac's
  K - 1 rounds of gradient surgery in coefficient space, one launch.
* :func:`cagrad_direction` (:mod:`.cagrad`): CAGrad's inner problem (a primal active-set
  method over the faces of the simplex, each face in closed form) and its direction, one launch.
* :func:`fair_weights` (:mod:`.fair`): FairGrad's and Nash-MTL's ``G w = w^(-1/alpha)`` by damped
  and undamped Newton steps (each solve a swept [K, K] tile in registers), one launch.

``gradbal._ops`` dispatches to the passes, ``gradbal.solvers_qp.sym_eig`` to
:func:`jacobi_eigh`, ``gradbal.methods.AlignedMTL`` / ``IMTLG`` / ``ConFIG`` to the :mod:`.spectral`
kernels, ``gradbal.solvers.min_norm_simplex`` to :func:`min_norm`, ``gradbal.methods.MGDANormalized`` to
:func:`mgda_normalized_weights` and
``gradbal.solvers_qp.project_dual_cone`` to :func:`dual_cone`, ``gradbal.solvers_qp.fair_weights``
to :func:`fair_weights`, ``gradbal.methods.PCGrad`` / ``GradVac`` / ``CAGrad`` to :func:`pcgrad_weights` /
:func:`gradvac_weights` / :func:`cagrad_direction` and ``gradbal.methods.MoKD`` to :func:`mokd_weights`
(``gradbal._solver_kernels`` says when), for CUDA tensors when :data:`AVAILABLE`. This package
imports without Triton; then ``AVAILABLE`` is False and the functions raise ``RuntimeError``.
Under ``TRITON_INTERPRET=1`` (set before this import) the kernels run on CPU tensors.
"""

from __future__ import annotations

__all__ = [
    "AVAILABLE", "aligned_mtl_weights", "cagrad_direction", "combine", "config_weights", "dual_cone",
    "fair_weights", "graddrop", "gradvac_weights", "gram", "gram_with_nonfinite", "imtl_g_weights",
    "jacobi_eigh", "mgda_normalized_weights", "min_norm", "mokd_weights", "pcgrad_weights",
]

try:
    from .cagrad import cagrad_direction
    from .combine import combine
    from .dual_cone import dual_cone
    from .eigh import jacobi_eigh
    from .fair import fair_weights
    from .graddrop import graddrop
    from .gram import gram, gram_with_nonfinite
    from .min_norm import mgda_normalized_weights, min_norm, mokd_weights
    from .spectral import aligned_mtl_weights, config_weights, imtl_g_weights
    from .surgery import gradvac_weights, pcgrad_weights
except ImportError as _err:  # only a missing Triton is expected; anything else is a bug
    if not (_err.name or "").startswith("triton"):
        raise
    AVAILABLE = False
    _REASON = f"gradbal.kernels needs Triton ({_err}); install the 'triton' extra"

    def gram(rows, plan=None):
        raise RuntimeError(_REASON)

    def gram_with_nonfinite(rows, plan=None):
        raise RuntimeError(_REASON)

    def combine(rows, weights, out, accumulate=False, scale=None):
        raise RuntimeError(_REASON)

    def graddrop(rows, noise, out, accumulate=False, leak=None):
        raise RuntimeError(_REASON)

    def jacobi_eigh(a, sweeps=None):
        raise RuntimeError(_REASON)

    def aligned_mtl_weights(gram, pref, scale_mode="min", sweeps=None, order="cyclic"):
        raise RuntimeError(_REASON)

    def imtl_g_weights(gram, sweeps=None, order="cyclic"):
        raise RuntimeError(_REASON)

    def config_weights(gram, pref, sweeps=None, order="cyclic"):
        raise RuntimeError(_REASON)

    def min_norm(gram, max_iter=None):
        raise RuntimeError(_REASON)

    def dual_cone(gram, u, reg, norm_eps=0.0, max_iter=None):
        raise RuntimeError(_REASON)

    def fair_weights(gram, alpha=1.0, iterations=8, ridge=1e-8, newton=4):
        raise RuntimeError(_REASON)

    def cagrad_direction(gram, c, norm_eps, divisor=1.0, max_iter=None):
        raise RuntimeError(_REASON)

    def pcgrad_weights(gram, order):
        raise RuntimeError(_REASON)

    def gradvac_weights(gram, target, order, beta, eps, on_conflict=False):
        raise RuntimeError(_REASON)

    def mgda_normalized_weights(gram, losses, normalization="l2", apply_to="normalized",
                                loss_floor=1e-6, max_iter=None):
        raise RuntimeError(_REASON)

    def mokd_weights(gram, losses, log_scale=True, loss_floor=1e-6, mean_loss=True,
                     max_norm=None, max_iter=None):
        raise RuntimeError(_REASON)

else:
    AVAILABLE = True
