"""Small K x K solvers that run on the Gram matrix's device with no host synchronisation.

Every solver here takes a (batch of) symmetric positive semi-definite Gram matrices
``G[..., K, K]`` and returns weights, using only fixed-shape tensor operations: no
``.item()``, no Python branch on a tensor value, no CPU solver. That keeps a training step
free of device-to-host syncs (the peers call quadprog/cvxpy/scipy on the CPU every step).

The central problem is the min-norm point of the convex hull of K vectors (MGDA, MoKD):

    w* = argmin_{w >= 0, sum(w) = 1}  w^T G w

* K = 2 has a closed form (Sener & Koltun 2018, Alg. 1; DTO-KD Theorem 3.1).
* K <= ``EXACT_MAX_K`` is solved exactly by enumerating supports: the minimiser lies in the
  relative interior of some face S of the simplex, where it solves the KKT system
  ``[[G_SS, 1], [1^T, 0]] [w_S; -lam] = [0; 1]``. All 2^K - 1 systems are solved in one
  batched ``linalg.solve_ex``; the feasible solution of smallest objective is the optimum.
* Larger K uses a primal-dual interior-point method with a fixed number of Mehrotra steps
  to find the support, then a few primal-dual active-set rounds that solve the problem on
  it exactly; the best feasible point seen is returned.
* On CUDA, for 3 <= K <= 32, one Triton launch replaces both (a primal active-set method in
  registers, :mod:`gradbal.kernels.min_norm`): dozens to hundreds of kernel launches become
  one. ``GRADBAL_BACKEND=torch`` keeps the torch ops; a kernel that fails to compile warns
  once and the torch ops run from then on. Its answer differs from the torch ops' within
  the 1e-9 (objective) they are both accurate to, except that of two equal gradients one
  gets the weight the torch ops split between them (the same combined direction).

On a CPU every small tensor op costs ~1-2 us whatever its size, and on a GPU each is a
kernel launch: the solvers are written to keep the op count low (cached constant tensors,
row-vector products, fused ``addcmul``).

A profile on the CPU shows ``aten::item`` inside ``linalg.solve_ex``/``inv_ex``: torch's CPU
``lu_solve`` kernel checks the pivots' range before calling LAPACK. That reads host memory
only; the CUDA kernel has no such check, so the solvers make no device synchronisation.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._solver_kernels import MIN_NORM

__all__ = [
    "EXACT_MAX_K",
    "MIN_NORM_ROUNDS",
    "MIN_NORM_STEPS",
    "min_norm_2",
    "min_norm_simplex",
    "project_simplex",
]

#: Largest K solved by support enumeration (2^K - 1 small linear systems, batched).
EXACT_MAX_K = 8
#: Interior-point steps and active-set rounds for K > EXACT_MAX_K (see _min_norm_large).
MIN_NORM_STEPS = 8
MIN_NORM_ROUNDS = 6

# A ridge relative to the largest diagonal entry (K > 2 only): makes the min-norm weights
# unique when the gradients are linearly dependent (equal rows get equal weights: exactly
# for K <= EXACT_MAX_K, to ~1e-4 relative above it) and changes the optimum far below 1e-5.
_RIDGE = 1e-12


@functools.lru_cache(maxsize=32)
def _k2_coefficients(device: torch.device, dtype: torch.dtype) -> Tensor:
    """Columns giving ``(G22 - G12, G11 + G22 - 2 G12, G11 + G22)`` from the flattened
    [G11, G12, G21, G22] (G12 and G21 averaged: one matrix product for all three)."""
    return torch.tensor(
        [[0.0, 1.0, 1.0], [-0.5, -1.0, 0.0], [-0.5, -1.0, 0.0], [1.0, 1.0, 1.0]],
        dtype=dtype,
        device=device,
    )


@functools.lru_cache(maxsize=32)
def _k2_affine(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(pi_1, 1 - pi_1) = offset + pi_1 * slope``."""
    return (
        torch.tensor([0.0, 1.0], dtype=dtype, device=device),
        torch.tensor([1.0, -1.0], dtype=dtype, device=device),
    )


def min_norm_2(gram: Tensor) -> Tensor:
    """Closed-form min-norm weights for K = 2.

    ``pi_1 = (G22 - G12) / (G11 + G22 - 2 G12)`` clamped to [0, 1], ``pi_2 = 1 - pi_1``.
    When the denominator ``||g1 - g2||^2`` vanishes (g1 = g2) both weights are 1/2.
    Scale invariant, so it needs no normalisation; about ten tensor operations (on a CPU
    each costs ~1-2 us whatever its size, so the count is the cost).
    """
    coef = _k2_coefficients(gram.device, gram.dtype)
    num, den, tot = (gram.reshape(*gram.shape[:-2], 4) @ coef).unbind(-1)
    # Relative test: den is a difference of large numbers when g1 ~ g2.
    pi1 = torch.where(den > 1e-12 * tot, num / den, 0.5)
    # NaN (a non-finite Gram) -> 1/2; +-inf is clamped into [0, 1] next.
    pi1 = torch.nan_to_num(pi1, nan=0.5).clamp_(0.0, 1.0)
    offset, slope = _k2_affine(gram.device, gram.dtype)
    return torch.addcmul(offset, pi1.unsqueeze(-1), slope)


@functools.lru_cache(maxsize=64)
def _subsets(k: int, device: torch.device, nonempty: bool) -> Tensor:
    """All subsets of range(k) as a bool tensor [2^k (- 1), k]; code 0 (empty) first.
    The support enumerations here and in :mod:`gradbal.solvers_qp` all read these."""
    codes = torch.arange(1 if nonempty else 0, 2**k, device=device)
    bits = 2 ** torch.arange(k, device=device)
    return (codes.unsqueeze(-1) & bits) != 0


@functools.lru_cache(maxsize=32)
def _ridge_eye(k: int, device: torch.device) -> Tensor:
    return _RIDGE * torch.eye(k, dtype=torch.float64, device=device)


def _objective(gram: Tensor, w: Tensor) -> Tensor:
    return ((w.unsqueeze(-2) @ gram).squeeze(-2) * w).sum(-1)


@functools.lru_cache(maxsize=32)
def _enumeration_systems(k: int, device: torch.device, dtype: torch.dtype):
    """The parts of the 2^k - 1 KKT systems that do not depend on G, built once.

    For support S (row s of the masks, m = its indicator) the system is
    ``A_s = pad(G) * keep_s + fixed_s``: ``keep_s`` is 1 on S x S (0 elsewhere, the
    bordered row and column included), ``fixed_s`` holds 1 on the diagonal off S (pins
    w_i = 0) and m in the border row and column; the right-hand side is e_{K+1}.
    Returns (m [S, K], keep [S, K+1, K+1], fixed [S, K+1, K+1], rhs [K+1, 1]).
    """
    m = _subsets(k, device, nonempty=True).to(dtype)
    s = m.shape[0]
    keep = torch.zeros(s, k + 1, k + 1, dtype=dtype, device=device)
    keep[:, :k, :k] = m.unsqueeze(-1) * m.unsqueeze(-2)
    fixed = torch.zeros_like(keep)
    fixed[:, :k, :k] = torch.diag_embed(1 - m)
    fixed[:, :k, k] = m
    fixed[:, k, :k] = m
    rhs = torch.zeros(k + 1, 1, dtype=dtype, device=device)
    rhs[k] = 1
    return m, keep, fixed, rhs


def _min_norm_enumerate(gram: Tensor) -> Tensor:
    """Exact minimiser for K <= ``EXACT_MAX_K``: the KKT systems of all 2^K - 1 supports in
    one batched solve; among the solutions that are >= 0 the one of least objective.

    Every candidate is clamped to >= 0 and renormalised, so it is a point of the simplex and
    its objective is an upper bound of the optimum; the optimal support's solution attains
    it, hence the least objective among the candidates is the optimum even where a
    near-singular system returned an inaccurate solution (it is then merely one more
    feasible point). Candidates with a clearly negative entry (not a KKT point of their
    face) are skipped so that rounding cannot prefer them; NaN fails every comparison and
    is skipped too. Singletons are always valid, so a candidate always exists.
    """
    k = gram.shape[-1]
    m, keep, fixed, rhs = _enumeration_systems(k, gram.device, gram.dtype)
    a = torch.nn.functional.pad(gram, (0, 1, 0, 1)).unsqueeze(-3) * keep + fixed
    x, _ = torch.linalg.solve_ex(a, rhs)  # [..., S, K + 1, 1]
    w = x[..., :k, 0] * m
    valid = (w >= -1e-12).all(-1)
    w = w.clamp_min(0)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
    obj = _objective(gram.unsqueeze(-3), w)
    key = torch.where(valid, obj, float("inf")).nan_to_num_(nan=float("inf"))
    best = key.argmin(dim=-1, keepdim=True)
    return torch.take_along_dim(w, best.unsqueeze(-1), dim=-2).squeeze(-2)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v[..., K]`` onto the probability simplex.

    Sort-based algorithm of Duchi et al. (ICML 2008); branch free.
    """
    k = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    rho = (u - css / idx > 0).sum(-1, keepdim=True).clamp_min(1)  # >= 1 always
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)


def _max_step(s: Tensor, d: Tensor) -> Tensor:
    """Largest t in (0, 1] with ``s + t d >= 0`` (rowwise over the last dim), for s > 0.

    ``s`` holds the primal and dual variables side by side, so one call bounds both."""
    return (s / (-d).clamp_min(1e-300)).amin(-1, keepdim=True).clamp(max=1.0)


def _chol_solve_columns(chol: Tensor, rhs: Tensor) -> Tensor:
    """``(L L^T)^-1 rhs`` for rhs [..., K, R]: two triangular solves (``cholesky_solve`` may
    check an info flag on the host with MAGMA; ``solve_triangular`` never does)."""
    y = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.linalg.solve_triangular(chol.mT, y, upper=True)


def _min_norm_ipm(q: Tensor, a: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Mehrotra predictor-corrector for ``min 1/2 x^T q x`` s.t. ``a^T x = 1``, ``x >= 0``.

    With ``z`` the multipliers of ``x >= 0`` and ``nu`` that of the equality, each step
    solves the Newton system reduced to ``(q + diag(z / x)) dx = r + dnu a`` with one
    inverse of that matrix shared by the predictor, the corrector and the equality's column
    (``dnu`` then follows from ``a^T dx = 1 - a^T x``). The directions only have to be good
    enough to find the support; the exact answer comes from the active-set rounds after.

    Vectors are rows ``[..., 1, K]`` so that every product is one ``matmul`` (no
    unsqueeze/squeeze pairs), and primal and dual variables live in one ``[..., 1, 2K]``
    tensor so that the step-length rule runs once for both: on a CPU each small op costs
    ~1-2 us whatever its size, so the op count is the cost (about 75 per step).

    Returns (x, support guess ``x > z``), both ``[..., 1, K]``.
    """
    k = q.shape[-1]
    x = (1.0 / a.sum(-1, keepdim=True)).expand_as(a)  # a^T x = 1
    z = torch.ones_like(x)
    nu = (x @ q - z).mean(-1, keepdim=True)
    s = torch.cat([x, z], -1)
    a_t = a.mT
    eye = torch.eye(k, dtype=q.dtype, device=q.device)
    inv_k = 1.0 / k
    for _ in range(iterations):
        x, z = s[..., :k], s[..., k:]
        xz = x * z
        zx = z / x
        rd = torch.addcmul(x @ q - z, nu, a, value=-1.0)  # stationarity residual
        rp = 1.0 - x @ a_t  # equality residual
        # q + diag(z / x) is positive definite (q has the ridge); inv_ex never syncs.
        hinv, _ = torch.linalg.inv_ex(torch.addcmul(q, zx.mT, eye))
        sol = torch.cat([(rd + z).neg_(), a], -2) @ hinv  # rows: predictor, a's column
        p, col = sol[..., :1, :], sol[..., 1:, :]
        a_col = col @ a_t
        dnu = (rp - p @ a_t) / a_col
        dx = torch.addcmul(p, dnu, col)
        d = torch.cat([dx, torch.addcmul(z, zx, dx).neg_()], -1)
        s_aff = torch.addcmul(s, _max_step(s, d), d)
        mu = xz.sum(-1, keepdim=True) * inv_k
        mu_aff = (s_aff[..., :k] @ s_aff[..., k:].mT) * inv_k
        target = ((mu_aff / mu).clamp(0, 1) ** 3 * mu).clamp_min(1e-14)
        rc = torch.addcmul(xz, d[..., :k], d[..., k:]).sub_(target)
        p = (rd + rc / x).neg_() @ hinv
        dnu = (rp - p @ a_t) / a_col
        dx = torch.addcmul(p, dnu, col)
        d = torch.cat([dx, torch.addcmul(rc, z, dx).div_(x).neg_()], -1)
        t = 0.99 * _max_step(s, d)
        nu_new = torch.addcmul(nu, t, dnu)
        # A failed inverse gives NaN everywhere: keep the previous point (no host branch).
        good = torch.isfinite(nu_new)
        s = torch.where(good, torch.addcmul(s, t, d), s).clamp_min_(1e-300)
        nu = torch.where(good, nu_new, nu)
    x, z = s[..., :k], s[..., k:]
    return x, x > z


def _min_norm_large(gram: Tensor, iterations: int, rounds: int) -> Tensor:
    """K > ``EXACT_MAX_K``: interior point, then primal-dual active-set rounds.

    The interior point runs on the unit-diagonal matrix ``D G D`` (``w = D x``,
    ``D = diag(G)^(-1/2)``, so the constraint reads ``a^T x = 1`` with ``a = diag(D)``): it
    then starts well scaled whatever the spread of gradient norms. It only has to find the
    support approximately. Each active-set round (Hintermueller, Ito & Kunisch 2002) solves
    the problem on the current support S exactly: ``G_SS y = 1``, ``v = y / 1^T y`` with
    objective ``v^T G v = 1 / 1^T y`` (G_SS is positive definite thanks to the ridge); it
    then drops from S the indices whose weight went negative and adds the outside ones
    whose KKT condition ``(G v)_i >= v^T G v`` fails.

    Every candidate (the interior point's iterate and each round's ``v``, clamped to >= 0
    and renormalised) is a point of the simplex, so its objective bounds the optimum from
    above and the least one is returned: a round can only improve the answer, and a
    near-singular solve merely adds one more feasible point. At the optimal support the
    round's ``v`` is the minimiser (to rounding).

    Steps and rounds (``MIN_NORM_STEPS`` = 8, ``MIN_NORM_ROUNDS`` = 6) were chosen against
    exact support enumeration on 1,500 problems at K = 9..16 (well conditioned,
    rank-deficient, equal/opposite/zero rows, norms spread over 4 and 12 decades,
    correlated and conflicting rows): all matched the enumeration's objective to 1e-9
    relative (+1e-15 absolute, G with unit largest diagonal) except 8 with norms over 12
    decades (objective ~1e-13, below the ridge's resolution). 12 steps + 4 rounds found
    the same, 6 steps + 8 rounds missed one rank-deficient problem.
    """
    k = gram.shape[-1]
    dsc = torch.rsqrt(gram.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)  # diag >= ridge > 0
    q = gram * (dsc.mT * dsc)
    x, support = _min_norm_ipm(q, dsc, iterations)
    best = (x * dsc).clamp_min(0)
    best = best / best.sum(-1, keepdim=True)
    best_obj = (best @ gram) @ best.mT
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    tol = 1e-12  # gram has unit largest diagonal (see min_norm_simplex)
    for _ in range(rounds):
        m = support.to(gram.dtype)
        # G on S x S, the identity off S: y_S = G_SS^-1 1, y = 0 off S.
        mat = torch.addcmul(gram * (m.mT * m), (1 - m).mT, eye)
        y = torch.linalg.solve_ex(mat, m.mT)[0].mT
        total = y.sum(-1, keepdim=True)
        v_raw = y / total
        gv = v_raw @ gram
        obj = total.reciprocal()
        v = v_raw.clamp_min(0)
        v = v / v.sum(-1, keepdim=True).clamp_min(1e-300)
        obj_v = (v @ gram) @ v.mT
        take = obj_v < best_obj  # NaN compares False: never taken
        best = torch.where(take, v, best)
        best_obj = torch.where(take, obj_v, best_obj)
        new = (support & (v_raw > 0)) | (~support & (gv < obj - tol))
        support = torch.where(new.any(-1, keepdim=True), new, support)
    return best.squeeze(-2)


def min_norm_simplex(gram: Tensor, iterations: int | None = None) -> Tensor:
    """Weights of the min-norm point of the convex hull of the vectors whose Gram is ``gram``.

    Args:
        gram: [..., K, K] symmetric PSD matrix (any float dtype; solved in float64).
        iterations: interior-point steps used when K > ``EXACT_MAX_K`` (default
            ``MIN_NORM_STEPS``), each followed by ``MIN_NORM_ROUNDS`` exact active-set rounds.

    Returns:
        w [..., K] on the simplex minimising ``w^T G w``, finite for any finite input
        (rank-deficient, zero rows and zero matrices included). Exact (to rounding) for
        K <= ``EXACT_MAX_K``. On CUDA with Triton and 3 <= K <= 32 (``iterations`` not given)
        one kernel launch solves it (see the module docstring).
    """
    if gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be square in its last two dims, got {tuple(gram.shape)}")
    k = gram.shape[-1]
    out_dtype = gram.dtype
    if iterations is None and MIN_NORM.usable(gram):  # CUDA, 3 <= K <= 32
        w = MIN_NORM.run(gram)
        if w is not None:
            return w if w.dtype == out_dtype else w.to(out_dtype)
    # (dtype checks in Python: a no-op ``.to`` still costs a dispatch in a 13-op K = 2 solve.)
    g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
    if k == 1:
        w = torch.ones(g.shape[:-1], dtype=g.dtype, device=g.device)
    elif k == 2:  # scale invariant and symmetrising: needs neither step below
        w = min_norm_2(g)
    else:
        # (G + G^T) / 2 divided by its largest diagonal entry (the minimiser is scale
        # invariant; a zero matrix stays zero), plus the ridge.
        scale = g.diagonal(dim1=-2, dim2=-1).amax(dim=-1)
        scale = torch.where(scale > 0, 2 * scale, 2.0)[..., None, None]
        g = torch.add(g, g.mT).div_(scale).add_(_ridge_eye(k, g.device))
        if k <= EXACT_MAX_K:
            w = _min_norm_enumerate(g)
        else:
            steps = MIN_NORM_STEPS if iterations is None else iterations
            w = _min_norm_large(g, steps, MIN_NORM_ROUNDS)
    return w if w.dtype == out_dtype else w.to(out_dtype)
