"""More small K x K solvers, on the Gram matrix's device, with no host synchronisation.

Companions of :mod:`gradbal.solvers` (the simplex min-norm problem) for the other methods of
the zoo. Same rules: fixed-shape tensor operations, a fixed number of iterations, no
``.item()``, no Python branch on a tensor value, no CPU solver; finite output for any finite
input (rank-deficient, zero rows, equal or opposite rows, mixed scales).

* :func:`sym_eig`: symmetric eigendecomposition (Aligned-MTL, IMTL-G, ConFIG). On the CPU it
  is LAPACK's ``syevd`` (``torch.linalg.eigh``: no device to synchronise with). On other
  devices ``torch.linalg.eigh`` synchronises with the host (see its documentation), so a
  cyclic Jacobi method with a fixed number of sweeps runs instead: on CUDA one Triton launch
  for the whole decomposition (:func:`gradbal.kernels.jacobi_eigh`, K <= 32), and the batched
  torch-op version (:func:`jacobi_eigh`, one kernel launch per op) where Triton is
  unavailable, K > 32, or it is forced (``GRADBAL_BACKEND=torch``, ``method="jacobi"``).
* :func:`project_dual_cone`: the weights of the projection of ``J^T u`` onto the dual cone of
  the rows of J, ``argmin_{v >= u} v^T G v`` (UPGrad, DualProj), batched over u. A closed
  form for K = 2; exact support enumeration for K <= ``EXACT_MAX_K``; above, a primal-dual
  interior-point method with a fixed number of Mehrotra steps, then exact active-set rounds
  from the support it found.
* :func:`cagrad_weights`: CAGrad's inner problem
  ``argmin_{w in simplex} w^T G b + phi sqrt(w^T G w)``. K = 2 in closed form; exact face
  enumeration (each face has a closed form) for K <= ``EXACT_MAX_K``; above, an
  interior-point method (``CAGRAD_ITERATIONS`` steps, one ``inv_ex`` each) whose iterate ranks the coordinates,
  the closed form on the K nested faces of that ranking, then active-set rounds.
* :func:`fair_weights`: the positive solution of ``G w = w^(-1/alpha)`` (FairGrad; Nash-MTL is
  alpha = 1), the unique minimiser of the strictly convex
  ``f(w) = 1/2 w^T G w - sum_i phi_alpha(w_i)``, by damped Newton steps with a batched line
  search.

Where an exact answer is found by a final active-set solve, it is kept only if it passes an
exact KKT check; otherwise the iterative answer is returned (it is finite in every case).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._solver_kernels import DUAL_CONE, EIGH, FAIR
from .solvers import EXACT_MAX_K, _chol_solve_columns, _subsets

__all__ = [
    "cagrad_direction_2",
    "cagrad_weights",
    "fair_weights",
    "jacobi_eigh",
    "project_dual_cone",
    "sym_eig",
    "unit_gram_pinv",
]

# Relative ridge that makes the small linear systems solvable on rank-deficient Gram
# matrices; far below the 1e-5 accuracy the solvers promise.
_RIDGE = 1e-10

# cagrad_weights for K > EXACT_MAX_K (see _cagrad_large): interior-point steps and
# active-set rounds. A step costs 62 top-level aten ops (one 16 x 16 inv_ex), a round 49.
# On a 300-problem stress set (K = 9..16: tests' stress_grams(200), i.e. random,
# correlated, graded, shifted-mean, plus 100 rank-deficient and near-opposite; c = 0.1..2),
# against the best of two 300-step + 8-round solves, the objective was missed (by more than
# 1e-12 of its scale) on: 13 problems by the former solver (LU solves, 25 steps + 4 rounds);
# by this one 11 with 25 + 4, 14 with 20 + 4, 13 with 20 + 6, 10 with 16 + 6, 9 with 14 + 6,
# 18 with 12 + 6 or 12 + 8, 24 with 10 + 8, 35 with 8 + 10 (all near Pareto-stationary:
# r -> 0, rank-deficient or near-opposite rows). The steps cannot go below ~18: on graded
# rows (8 decades, full support) the ill-conditioned face solve does not beat the iterate,
# which must then be accurate by itself (test_cagrad_default_iterations_are_converged:
# 1.9e-7 after 16 steps, 1.8e-11 after 18, 1.8e-15 after 20). Hence 20 + 6.
# CAGrad().weights (2-core CPU VM, 1 thread, medians of 40 interleaved runs): 2777 -> 1688
# top-level ops, K = 9: 6.2 -> 4.3 ms, K = 12: 6.3 -> 4.4 ms, K = 16: 6.3 -> 4.5 ms.
CAGRAD_ITERATIONS = 20
CAGRAD_ROUNDS = 6


def _sym(gram: Tensor) -> Tensor:
    """Symmetrised float64 copy with non-finite entries replaced by 0 (never an exception)."""
    g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    # (G + G^T) / 2 in one op instead of two; exact (G itself) on a symmetric G.
    return torch.lerp(g, g.mT, 0.5)


def _trace_normalise(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``(S / trace(S), trace(S))`` for ``S`` the symmetrised float64 ``gram`` with non-finite
    entries read as 0; a zero (or negative-trace) matrix stays zero, its trace reported as 1.
    Symmetrisation and normalisation share one scaling. 2-D ``gram`` only."""
    # (dtype check in Python: a no-op ``.to`` still costs a dispatch in a ~50-op solve.)
    g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    tr = torch.trace(g)
    tr = torch.where(tr > 0, tr, _scalars(g.device)[1])
    return (g + g.mT) * (0.5 / tr), tr


def _pick(candidates: Tensor, key: Tensor) -> Tensor:
    """``candidates[argmin(key)]`` without indexing by a 0-d tensor (which reads its value)."""
    return candidates.index_select(0, key.argmin().reshape(1)).squeeze(0)


@functools.lru_cache(maxsize=64)
def _eye(k: int, device: torch.device) -> Tensor:
    return torch.eye(k, dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=64)
def _scalars(device: torch.device) -> tuple[Tensor, Tensor]:
    """0-d float64 (0, 1): ``torch.where`` with a Python scalar builds a tensor every call."""
    return torch.zeros((), dtype=torch.float64, device=device), torch.ones((), dtype=torch.float64, device=device)


# --------------------------------------------------------------------------- eigen


@functools.lru_cache(maxsize=64)
def _round_robin(k: int, device: torch.device, dtype: torch.dtype) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Jacobi rounds: each a set of disjoint pairs (p, q); one sweep covers every pair once.

    Circle method on n = k (+1 if odd) players; a pair with the dummy player is dropped.
    Per round: ``partner`` [K] (index of i's partner, i itself when unpaired), ``sign`` [K]
    (+1 for the smaller index of a pair, -1 for the larger, 0 when unpaired) and ``perm``
    [K, K] (``perm[i, partner(i)] = 1`` for paired i).
    """
    n = k + (k % 2)
    players = list(range(n))
    rounds = []
    for _ in range(n - 1):
        partner = list(range(k))
        sign = [0.0] * k
        for i in range(n // 2):
            a, b = players[i], players[n - 1 - i]
            if a < k and b < k:
                p, q = min(a, b), max(a, b)
                partner[p], partner[q] = q, p
                sign[p], sign[q] = 1.0, -1.0
        partner_t = torch.tensor(partner, device=device)
        sign_t = torch.tensor(sign, device=device, dtype=dtype)
        perm = torch.zeros(k, k, device=device, dtype=dtype)
        perm[torch.arange(k, device=device), partner_t] = sign_t.abs()
        rounds.append((partner_t, sign_t, perm))
        players = [players[0]] + [players[-1]] + players[1:-1]
    return rounds


def _default_sweeps(k: int) -> int:
    # Cyclic Jacobi converges quadratically; these counts bring the off-diagonal mass of
    # random, rank-deficient and graded (1e-8..1e8) test matrices below ~1e-13 of the norm.
    # K = 2 is one rotation, exact to rounding: one sweep (each sweep is ~40 small ops,
    # kernel launches on a GPU).
    if k == 2:
        return 1
    return 4 if k <= 4 else 8 if k <= 8 else 10 if k <= 12 else 12 + max(0, k - 16) // 4


def jacobi_eigh(a: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of symmetric ``a[..., K, K]`` by parallel cyclic Jacobi rotations.

    Each round applies K/2 disjoint rotations at once (``A <- R^T A R``, ``V <- V R``), each
    zeroing one off-diagonal pair; a sweep visits every pair once. The number of sweeps is
    fixed (4 to 12 for K <= 16), so no convergence test reads a tensor value.

    Returns (eigenvalues ascending [..., K], eigenvectors as columns [..., K, K]), like
    ``torch.linalg.eigh``.
    """
    return _jacobi(_sym(a), sweeps)


def _jacobi(a: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`jacobi_eigh` of an already symmetrised float64 ``a`` (:func:`_sym`)."""
    k = a.shape[-1]
    eye = _eye(k, a.device).expand_as(a)
    if k == 1:
        return a[..., 0], eye.clone()
    sweeps = _default_sweeps(k) if sweeps is None else int(sweeps)
    scale = a.abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    a = a / scale
    v = eye.clone()
    one = torch.ones((), dtype=a.dtype, device=a.device)
    for _ in range(sweeps):
        for partner, sign, perm in _round_robin(k, a.device, a.dtype):
            # Every index i of a pair (p, q) computes that pair's rotation (twice the work of
            # per-pair bookkeeping, but only elementwise ops on [..., K] vectors; ~26 ops per
            # round, each a kernel launch on a GPU).
            diag = a.diagonal(dim1=-2, dim2=-1)
            # a[i, partner(i)] + a[partner(i), i]: both members of a pair must build the same
            # rotation, and R^T A R is symmetric only to rounding. 0 when unpaired.
            apq2 = ((a + a.mT) * perm).sum(-1)
            # "+ 0.0" turns -0.0 into +0.0: both members of a pair with equal diagonal
            # entries (tau = 0 and -0) must rotate the same way.
            tau = (sign * (diag[..., partner] - diag) / apq2).add_(0.0)
            # t = sign(tau) / (|tau| + sqrt(1 + tau^2)), the smaller root. An unpaired index
            # or a pair already zero gives 0/0 = NaN -> t = 0; a tiny a_pq gives |tau| (or
            # tau^2) = inf -> t = 0, so no denormal rotation reaches the matrices.
            t = torch.copysign(
                (tau.abs() + torch.addcmul(one, tau, tau).sqrt_()).reciprocal_(), tau
            ).nan_to_num_(nan=0.0)
            c = torch.addcmul(one, t, t).rsqrt_()
            r = torch.addcmul(torch.diag_embed(c), (sign * t * c).unsqueeze(-1), perm)
            a = r.mT @ a @ r
            v = v @ r
        a = torch.where(a.abs() < 1e-200, torch.zeros_like(a), a)
    evals = a.diagonal(dim1=-2, dim2=-1)
    order = evals.argsort(dim=-1)
    evals = evals.gather(-1, order) * scale.squeeze(-1)
    v = v.gather(-1, order.unsqueeze(-2).expand_as(v))
    return evals, v


#: ``method`` values of :func:`sym_eig`.
SYM_EIG_METHODS = ("auto", "eigh", "jacobi", "triton")

def sym_eig(gram: Tensor, method: str = "auto") -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric ``gram[..., K, K]``.

    ``method="auto"``: LAPACK (``torch.linalg.eigh``) on the CPU, where no device sync
    exists. Elsewhere ``torch.linalg.eigh`` synchronises a CUDA device with the host, so a
    cyclic Jacobi method with a fixed number of sweeps runs: on CUDA with Triton (and K <= 32)
    in one launch (:func:`gradbal.kernels.jacobi_eigh`), otherwise, or with
    ``GRADBAL_BACKEND=torch``, as torch ops (:func:`jacobi_eigh`). If the kernel fails (a GPU
    Triton cannot compile for), one warning and the torch ops from then on.
    ``"eigh"`` / ``"jacobi"`` / ``"triton"`` force LAPACK, the torch Jacobi method or the
    kernel (which raises where it cannot run). Results are float64.
    Non-finite entries are read as 0, so this never raises on a NaN Gram matrix.
    """
    if method not in SYM_EIG_METHODS:
        raise ValueError(
            f"method must be 'auto', 'eigh', 'jacobi' or 'triton', got {method!r}"
        )
    if method == "triton":
        return EIGH.forced(gram)
    if method == "auto" and EIGH.usable(gram):  # CUDA only
        result = EIGH.run(gram)
        if result is not None:
            return result
    g = _sym(gram)
    if method == "jacobi" or (method == "auto" and g.device.type != "cpu"):
        return _jacobi(g)
    return torch.linalg.eigh(g)


def rank_mask(evals: Tensor, rtol: float | None = None) -> Tensor:
    """Eigenvalues counted in the numerical rank: ``lambda > max(lambda) * rtol``.

    Default ``rtol = K * eps(float32)``: the rule of Aligned-MTL's official code (and of
    ``torch.linalg.pinv`` on a float32 Gram matrix); gradients are float32, so smaller
    eigenvalues of their Gram matrix are rounding noise. A zero matrix has rank 0.
    """
    return _kept(evals, rtol)[0]


def _kept(evals: Tensor, rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """(:func:`rank_mask`, ``max(lambda)`` [..., 1]). No separate ``max > 0`` test: where
    ``max <= 0`` every ``lambda <= max <= max * rtol``, so nothing is kept anyway."""
    if rtol is None:
        rtol = evals.shape[-1] * torch.finfo(torch.float32).eps
    top = evals.amax(dim=-1, keepdim=True)
    return evals > top * rtol, top


@functools.lru_cache(maxsize=64)
def _ones(k: int, device: torch.device) -> Tensor:
    return torch.ones(k, dtype=torch.float64, device=device)


def unit_gram_pinv(gram: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    r"""``a = D^-1 C^+ rhs`` for the unit Gram matrix ``C = D^-1 G D^-1``, ``D = diag(||g_k||)``
    (a zero gradient has a zero row and column in C and ``a_k = 0``): the coefficients of
    ``x = sum_k a_k g_k`` with ``<x, g_k / ||g_k||> = rhs_k`` in the least-squares, min-norm
    sense (IMTL-G, ConFIG). 2-D ``gram`` and 1-D ``rhs``.

    ``C^+`` keeps the eigenvalues :func:`rank_mask` counts in the rank. Returns ``(a, ok)``;
    ``ok`` is False where ``rhs`` is orthogonal to the kept eigenvectors (to 1e-9 of its
    norm): ``C^+ rhs`` is then 0 and the computed one only rounding noise (nearly opposite
    gradients, whose common direction the rank cut drops), which a caller that normalises
    ``a`` must not blow up.
    """
    g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
    # 1 / ||g_k||; a zero (or, not from a Gram matrix, negative) diagonal entry gives inf
    # (NaN), read as 0
    inv_n = g.diagonal().rsqrt().nan_to_num_(nan=0.0, posinf=0.0)
    evals, evecs = sym_eig(g * torch.outer(inv_n, inv_n))
    keep = rank_mask(evals)
    coords = rhs @ evecs  # rhs in the eigenbasis
    # sum_kept coords^2 > 1e-18 |rhs|^2, as sum_kept coords^2 - 1e-18 sum_cut coords^2 > 0 (the
    # same test to rounding: |rhs|^2 = sum of all coords^2) in one dot product
    sq = coords * coords
    ok = torch.linalg.vecdot(sq, torch.where(keep, _scalars(g.device)[1], -1e-18)) > 0
    a = inv_n * (evecs @ torch.where(keep, coords / evals, 0.0))
    return a, ok


#: rank_mask's default cut-off at K = 2: ``2 eps(float32)``.
_RTOL_2 = 2 * torch.finfo(torch.float32).eps

#: Cut-off on ``1^T C 1 = 2 (1 + c)`` at K = 2. rank_mask keeps ``1 + c`` when
#: ``1 + c > rtol * max(1 + c, 1 - c)`` (``rtol = _RTOL_2``): always when ``c >= 0``;
#: for ``c < 0``, ``1 + c > rtol (1 - c)``, i.e. ``2 (1 + c) > 4 rtol / (1 + rtol)``.
_KEPT_SUM_2 = 4 * _RTOL_2 / (1 + _RTOL_2)


def _unit_sum_2(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """K = 2: ``(diag G, inv, 1^T C 1)`` with ``inv_k = 1 / ||g_k||`` (0 for a zero gradient) and
    ``1^T C 1 = inv^T G inv``: ``2 (1 + c)`` for two nonzero gradients at cosine c, 1 (up to
    rounding) for one, 0 for none. ``1^T C 1 > _KEPT_SUM_2`` (to rounding) when the general path
    (:func:`~gradbal.solvers_qp.unit_gram_pinv`) keeps an eigenvector not orthogonal to 1:
    ``[1, 1]`` (eigenvalue ``1 + c``) with two gradients (rank_mask never cuts the largest
    eigenvalue, so for ``c >= 0`` always), the nonzero gradient's unit vector with one."""
    diag = g.diagonal()
    inv = diag.rsqrt().nan_to_num_(nan=0.0, posinf=0.0)
    return diag, inv, inv @ g @ inv


# --------------------------------------------------------------- dual-cone projection


@functools.lru_cache(maxsize=64)
def _free_sets(k: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every free set of range(k) for the enumeration, S = 2^k of them (row 0: nothing
    free): free [S, K, 1] bool, then as float64 free and fixed [S, K, 1] and
    ``free_i & free_j`` [S, K, K] bool."""
    free = _subsets(k, device, nonempty=False).unsqueeze(-1)
    m = free.to(torch.float64)
    return free, m, 1 - m, free & free.mT


def _free_solve(q: Tensor, u: Tensor, free: Tensor, fixed: Tensor, both_free: Tensor) -> Tensor:
    """``v`` with ``v_i = u_i`` off the free set F and ``q_FF v_F = -q_FB u_B`` on it.

    Column layout: u [..., K, R] (R right-hand sides), free and fixed (1 - free) [..., K, 1]
    float, both_free [..., K, K] bool (``free_i & free_j``). The system is the symmetric
    positive definite ``[[q_FF, 0], [0, I]] v = [-q_FB u_B; u_B]`` (q is positive definite
    through its ridge), solved by Cholesky and two triangular solves: no LU, whose
    ``lu_solve`` reads pivot checks back to the host on the CPU.
    """
    ub = fixed * u
    rhs = ub - (q @ ub) * free
    chol, _ = torch.linalg.cholesky_ex(torch.where(both_free, q, _eye(q.shape[-1], q.device)))
    return _chol_solve_columns(chol, rhs)


def _free_solve_rows(q_eye: Tensor, eye: Tensor, u: Tensor, free: Tensor) -> Tensor:
    """:func:`_free_solve` for one free set per row (u, free [B, K]; ``q_eye = q - I``)."""
    m = free.to(u.dtype)
    ub = torch.addcmul(u, u, m, value=-1)
    # q ub = (q - I) ub + ub
    rhs = torch.addcmul(ub, torch.addmm(ub, ub, q_eye), m, value=-1)
    mat = torch.addcmul(eye, m.unsqueeze(-1) * m.unsqueeze(-2), q_eye)  # m_i m_j q_ij + (1 - m_i m_j) d_ij
    chol, _ = torch.linalg.cholesky_ex(mat)
    return _chol_solve_columns(chol, rhs.unsqueeze(-1)).squeeze(-1)


def _kkt_key(q: Tensor, u: Tensor, v: Tensor, free: Tensor) -> Tensor:
    """Objective ``v^T q v`` where v (columns [..., K, R]) passes the exact KKT check for
    ``v >= u`` with free set ``free`` (feasible, multipliers ``(q v)_i >= 0`` off F, up to
    ``1e-9 (|u| + |v|)``), +inf elsewhere (NaN included)."""
    lam = q @ v
    tol = 1e-9 * (u.abs().amax(-2, keepdim=True) + v.abs().amax(-2, keepdim=True))
    ok = ((v >= u - tol) & ((lam >= -tol) | free)).all(-2)
    obj = (v * lam).sum(-2)
    return obj.masked_fill(~(ok & (obj < float("inf"))), float("inf"))


def _dual_cone_enumerate(q: Tensor, u: Tensor) -> Tensor:
    """Exact for K <= 8: the minimiser's free set is one of the 2^K; solve them all (one
    batched Cholesky, shared by the B rows of u [B, K]) and keep the KKT-valid one of least
    objective (nothing valid, only on a failed factorisation: v = u, feasible)."""
    k = q.shape[-1]
    free, free_f, fixed_f, both_free = _free_sets(k, q.device)
    ut = u.mT  # [K, B]
    v = _free_solve(q, ut, free_f, fixed_f, both_free)  # [S, K, B]
    best = _kkt_key(q, ut, v, free).argmin(0)  # [B]
    return v.permute(2, 0, 1).gather(1, best.view(-1, 1, 1).expand(-1, 1, k)).squeeze(1)


@functools.lru_cache(maxsize=16)
def _dual_cone_2_map(ridge: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For :func:`_dual_cone_2`: the [4, 7] map of the flattened G = [G11, G12, G21, G22]
    to ``(Q11, Q12, Q21, Q22, -Q11, -Q22, trace G)`` of ``Q = sym(G) + ridge trace(G) I``
    (G12 and G21 averaged), and the unit rows e_1, e_2 as [1, 2] tensors."""
    r1 = 1.0 + ridge
    cols = [
        [r1, 0, 0, ridge],  # Q11
        [0, 0.5, 0.5, 0],  # Q12
        [0, 0.5, 0.5, 0],  # Q21
        [ridge, 0, 0, r1],  # Q22
        [-r1, 0, 0, -ridge],  # -Q11
        [-ridge, 0, 0, -r1],  # -Q22
        [1.0, 0, 0, 1.0],  # trace
    ]
    f64 = {"dtype": torch.float64, "device": device}
    eye = torch.eye(2, **f64)
    return torch.tensor(cols, **f64).T.contiguous(), eye[:1], eye[1:]


def _dual_cone_2(gram: Tensor, u: Tensor, ridge: float, norm_eps: float) -> Tensor:
    """K = 2 in closed form, from G itself: ``argmin_{v >= u} v^T Q v`` for each row of u
    [B, 2], with ``Q = G / trace(G) + ridge I`` (:func:`project_dual_cone`) taken as
    ``trace(G) Q = sym(G) + ridge trace(G) I`` (the minimiser is scale invariant), whose
    entries are linear in G: one product with a constant [4, 7] matrix (UPGrad's whole
    weights call: 29 top-level ops, against 36 when G was normalised first).

    With the multipliers ``lam = u Q``, freeing coordinate i alone moves it by
    ``x_i = max(0, -lam_i / Q_ii)`` (to its minimiser with the other one at its bound) and
    changes the other multiplier to ``lam_j + Q_ij x_i``; that candidate is the minimiser
    when this is >= 0 (x_i = 0 covers ``v = u``), up to ``1e-12 max|u| trace(G)`` of rounding.
    Coordinate 0's candidate is preferred, then coordinate 1's; when neither is valid both
    coordinates are free and v = 0 (then u <= 0). A zero G (or, with ``norm_eps``, one of
    trace below it) gives Q = 0: every candidate is NaN, so v = 0 and the caller's
    ``max(v, u)`` returns ``max(u, 0)``, the projection for ``Q = ridge I``, as before.
    Non-finite entries of G read as 0."""
    coef, e0, e1 = _dual_cone_2_map(ridge, gram.device)
    g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
    flat = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).reshape(4)
    if norm_eps > 0:  # TorchJD's rule: G counts as 0 below a trace of norm_eps
        flat = flat * ((flat[0] + flat[3]) >= norm_eps)
    m = flat @ coef
    q, neg_diag, tr = m[:4].view(2, 2), m[4:6], m[6]
    lam = u @ q
    x = (lam / neg_diag).clamp_min(0)
    tol = u.abs().amax(-1, keepdim=True) * (tr * -1e-12)
    valid = torch.addcmul(lam.flip(-1), x, m[1]) >= tol  # m[1] = Q12
    both_free_or_1 = torch.where(valid[:, 1:], torch.addcmul(u, x, e1), 0.0)  # v = 0: neither valid
    return torch.where(valid[:, :1], torch.addcmul(u, x, e0), both_free_or_1)


#: Interior-point steps and primal-dual active-set rounds for K > EXACT_MAX_K (see
#: :func:`_dual_cone_ipm`).
DUAL_CONE_STEPS = 9
DUAL_CONE_ROUNDS = 6


def _dual_cone_ipm(q: Tensor, u: Tensor, iterations: int, rounds: int = DUAL_CONE_ROUNDS) -> Tensor:
    """``min 1/2 x^T q x + (q u)^T x, x >= 0`` (v = u + x) for each row of u [B, K].

    Mehrotra predictor-corrector steps, then primal-dual active-set rounds (Hintermueller,
    Ito, Kunisch 2002) from the interior point's support guess ``x > z``: each solves the
    KKT system on the current free set exactly (:func:`_free_solve`) and updates the free set
    (a free variable that went below its bound leaves, a fixed one with a negative
    multiplier joins). Of the interior point and the rounds' solutions, the one of least
    objective among those passing the exact KKT check (:func:`_kkt_key`) is returned, the
    interior point when none does. The interior point only has to find the support
    approximately, and a round costs less than a step: on 8000 random K = 9..20 problems
    (the generator of tests/methods/test_solvers_qp.py's stress set: well conditioned, rank
    K/2 and rank 2, norms spread over 2..12 decades, equal/opposite/zero rows; reg_eps 1e-4
    and 0) 9 steps + 6 rounds matched NNLS to 2e-9, as 15 + 4 did, while 8 + 4 and 10 + 4
    were off by up to 5e-2 and 3e-5 on a few rank-2 and badly scaled ones.

    Each step inverts the Newton matrix ``H = q + diag(z / x)`` once (Cholesky, one
    triangular solve for ``L^-1``, ``H^-1 = L^-T L^-1``) and applies it to the predictor
    and the corrector right-hand side as a batched product; primal and dual variables live
    in one [B, 2K] tensor and the step directions are kept negated (``s - t D``, one
    ``addcdiv``), so a step is ~66 aten ops and a round ~42 (the former code: ~150 and ~65).
    """
    k = q.shape[-1]
    eye = _eye(k, q.device)
    c = u @ q
    # Start at x = z = max|u| (1 for u = 0): with q's unit diagonal, x = v - u and the
    # multipliers z = q v are of the size of u; starting at 1 instead (K times too large for
    # u = e_i / K) needed 15 steps + 4 rounds for what 9 + 6 now reach on the stress set.
    s0 = u.abs().amax(-1, keepdim=True)
    s = s0.masked_fill(s0 == 0, 1.0).expand(-1, 2 * k)  # [x | z]
    for _ in range(iterations):
        x, z = s[:, :k], s[:, k:]
        rs = s.reciprocal()
        rx = rs[:, :k]
        xz = x * z
        zx = z * rx
        grad = torch.addmm(c, x, q)  # q x + c; the dual residual is grad - z
        chol, _ = torch.linalg.cholesky_ex(torch.addcmul(q, eye, zx.unsqueeze(-1)))
        linv = torch.linalg.solve_triangular(chol, eye, upper=False)
        hinv = torch.bmm(linv.mT, linv)
        # Predictor (affine) direction, negated: H dx = (grad - z) + z.
        dx = torch.bmm(hinv, grad.unsqueeze(-1)).squeeze(-1)
        dz = torch.addcmul(z, zx, dx, value=-1)
        step = torch.cat([dx, dz], -1)
        s_aff = torch.addcdiv(s, step, (step * rs).amax(-1, keepdim=True).clamp_min(1), value=-1)
        # Centring sigma = (mu_aff / mu)^3 (mu_aff >= 0); the 1/K of both means cancels.
        xz_sum = xz.sum(-1, keepdim=True)
        sigma = ((s_aff[:, :k] * s_aff[:, k:]).sum(-1, keepdim=True) / xz_sum).clamp_max(1)
        target = (sigma * sigma * sigma * xz_sum).mul_(1.0 / k).clamp_min_(1e-13)
        rc = torch.addcmul(xz, dx, dz).sub_(target)
        # Corrector, negated: H dx = (grad - z) + rc / x.
        dx = torch.bmm(hinv, torch.addcmul(grad - z, rc, rx).unsqueeze(-1)).squeeze(-1)
        dz = torch.addcmul(rc, z, dx, value=-1).mul_(rx)
        step = torch.cat([dx, dz], -1)
        s_new = torch.addcdiv(s, step, (step * rs).amax(-1, keepdim=True).clamp_min(1), value=-0.99)
        # A failed factorisation gives NaN: keep the previous value (no host branch).
        s = torch.where(s_new.isnan(), s, s_new)
    x = s[:, :k]
    free = x > s[:, k:]
    cands, frees = [], []
    q_eye = q - eye
    for _ in range(rounds):
        v = _free_solve_rows(q_eye, eye, u, free)
        cands.append(v)
        frees.append(free)
        free = torch.where(free, v > u, (v @ q) < 0)
    ipm = u + x
    cands.append(ipm)
    cands = torch.stack(cands, -1)  # [B, K, rounds + 1]
    # A round's solution is kept only if KKT-valid and no worse than the interior point;
    # the interior point's own key is that bound, so it is the fallback.
    bound = ((ipm @ q) * ipm).sum(-1, keepdim=True) * (1 + 1e-9) + 1e-15
    key = torch.cat([_kkt_key(q, u.unsqueeze(-1), cands[..., :-1], torch.stack(frees, -1)), bound], -1)
    key = key.masked_fill(key > bound, float("inf"))
    best = key.argmin(-1).view(-1, 1, 1).expand(-1, k, 1)
    return cands.gather(-1, best).squeeze(-1)


def project_dual_cone(
    gram: Tensor,
    u: Tensor,
    reg_eps: float = 1e-4,
    norm_eps: float = 0.0,
    iterations: int = DUAL_CONE_STEPS,
) -> Tensor:
    r"""Weights ``v`` with ``J^T v`` the projection of ``J^T u`` onto the dual cone of J's rows.

    Solves ``v = argmin_{v >= u} v^T Q v`` (Rey, Quinton et al., "Jacobian Descent for
    Multi-Objective Optimization", 2024, Proposition 1) for each row of ``u``, with
    ``Q = G / trace(G) + reg_eps I`` (TorchJD's normalisation and regularisation). With
    ``reg_eps = 0`` the result satisfies ``G v >= 0``: ``<g_i, J^T v> >= 0`` for every i.

    Args:
        gram: [K, K] Gram matrix.
        u: [..., K] vectors to project (UPGrad: the rows of ``diag(1/K)``).
        reg_eps: ridge added to the trace-normalised Gram matrix (TorchJD default 1e-4).
        norm_eps: when ``trace(G) < norm_eps``, G is replaced by 0 (as TorchJD does with its
            default 1e-4, which turns UPGrad into the mean for small gradients). Default 0:
            the projection stays scale invariant and only a zero G gives ``v = u``.
        iterations: interior-point steps when K > ``EXACT_MAX_K`` (default
            ``DUAL_CONE_STEPS`` = 9, followed by ``DUAL_CONE_ROUNDS`` = 6 exact active-set
            rounds; see :func:`_dual_cone_ipm` for how they were chosen).

    On CUDA with Triton, for 3 <= K <= 32 and the default ``iterations``, one launch of
    :func:`gradbal.kernels.dual_cone` (a primal active-set method in registers) solves every
    row instead (``GRADBAL_BACKEND=torch`` keeps the torch ops; a kernel that fails warns once
    and the torch ops run from then on).

    Returns:
        v [..., K] (float64), finite for any input.
    """
    k = gram.shape[-1]
    batch = u.shape[:-1]
    uu = (u if u.dtype == torch.float64 else u.to(torch.float64)).reshape(-1, k)
    if iterations == DUAL_CONE_STEPS and DUAL_CONE.usable(gram):  # CUDA, 3 <= K <= 32
        v = DUAL_CONE.run(gram, uu, reg_eps + _RIDGE, norm_eps)
        if v is not None:  # (the kernel stores max(v, u) itself: one launch fewer here)
            return v.reshape(*batch, k)
    if k == 2:
        v = _dual_cone_2(gram, uu, reg_eps + _RIDGE, norm_eps)
    else:
        q, tr = _trace_normalise(gram)
        if norm_eps > 0:
            q = q * (tr >= norm_eps)
        q.diagonal().add_(reg_eps + _RIDGE)
        if k <= EXACT_MAX_K:
            v = _dual_cone_enumerate(q, uu)
        else:
            # Unit diagonal (v = D v'): the interior point then starts well scaled whatever
            # the spread of gradient norms.
            dsc = q.diagonal().rsqrt()
            v = dsc * _dual_cone_ipm(q * dsc.unsqueeze(0) * dsc.unsqueeze(1), uu / dsc, iterations)
    # Rounding (and the checks' tolerances) may leave v a hair below u: clip to feasible. A
    # Gram matrix that is not positive semi-definite (garbage in: the problem is unbounded)
    # may give an infeasible or non-finite v; it reads as 0 here, so v stays finite.
    v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.maximum(v, uu).reshape(*batch, k)


# ------------------------------------------------------------------------- CAGrad


@functools.lru_cache(maxsize=64)
def _cagrad_faces(k: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per (K, device, dtype), built once: the identity, and for the 2^K - 1 faces with
    masks m [F, K] the outer products ``m m^T`` [F, K, K] and ``diag(1 - m)`` [F, K, K]
    (identity rows off the face keep each face's system square and solvable)."""
    m = _subsets(k, device, nonempty=True).to(dtype)
    eye = torch.eye(k, dtype=dtype, device=device)
    return eye, m.unsqueeze(-1) * m.unsqueeze(-2), (1 - m).unsqueeze(-1) * eye


def _cagrad_face_raw(
    g: Tensor, a: Tensor, phi: Tensor, mm: Tensor, off: Tensor, min_norm_points: bool = False
) -> tuple[Tensor, Tensor]:
    """Closed-form stationary point of ``F(w) = a^T w + phi ||J^T w||`` on a batch of faces.

    On the face S (w_i = 0 off S) with ``r = ||J^T w|| > 0`` stationarity reads
    ``a_S + phi G_SS w_S / r = mu 1``. With ``p = G_SS^{-1} 1``, ``q = G_SS^{-1} a_S``,
    ``s_p = 1^T p``, ``s_q = 1^T q``, ``t = a_S^T q``, the constraint ``1^T w = 1`` and
    ``r^2 = w^T G w`` give ``mu^2 s_p - 2 mu s_q + t = phi^2`` and
    ``w_S = (mu p - q) / sqrt(disc)``, ``disc = s_q^2 - s_p (t - phi^2)``.

    g: [K, K] (ridged); a: [K]; phi: []; mm = m m^T and off = diag(1 - m), [F, K, K], for
    the face masks m [F, K]. Returns (raw [F, K]: the stationary points, zero off the face,
    not clamped; solved [F]: each exists and is finite); with ``min_norm_points`` [2F] of each,
    the faces' min-norm points ``p / s_p`` after the stationary points.

    The min-norm points are candidates for gradients that are (nearly) Pareto-stationary:
    there F's minimum sits at its kink ``||J^T w|| = 0``, where no stationary point exists. The
    enumeration (K <= 8) gets within the ridge of it anyway (two opposite rows among 5, c = 0.5:
    ``||g_w*|| = 5e-6``); the nested faces of K > 8 did not (among 12: ``||g_w*|| = 0.11``,
    F = 2.2e-3 above the minimum, and a nonzero direction where it is 0), so they take them.
    """
    ones_a = torch.stack([torch.ones_like(a), a])  # [2, K]
    # Off the face the rows are the identity's and the right-hand side 0 (mm's diagonal is
    # m), so x is exactly 0 there: no masking of p and q needed.
    x, _ = torch.linalg.solve_ex(mm * g + off, (mm.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * ones_a.mT))
    s = ones_a @ x  # [F, 2, 2]: [[s_p, s_q], [., t]]
    s_p, s_q, t = s[:, 0, 0], s[:, 0, 1], s[:, 1, 1]
    disc = s_q * s_q - s_p * (t - phi * phi)
    root = torch.sqrt(disc.clamp_min(0))
    # Unguarded divisions: a face with s_p <= 0 or disc <= 0 gives inf/NaN here and is
    # marked unsolved (torch.where never lets an unselected NaN through).
    mu = (s_q + root) / s_p
    raw = (x @ torch.stack([mu / root, -1 / root], -1).unsqueeze(-1)).squeeze(-1)
    solved = (disc > 0) & (s_p > 0)
    if min_norm_points:
        raw = torch.cat([raw, x[..., 0] / s_p.unsqueeze(-1)])  # [2F, K]: then p / s_p
        solved = torch.cat([solved, s_p > 0])
    return raw, solved & torch.isfinite(raw.sum(-1))


def _cagrad_objective(g: Tensor, a: Tensor, phi: Tensor, w: Tensor) -> Tensor:
    r2 = ((w @ g) * w).sum(-1)
    return w @ a + phi * torch.sqrt(r2.clamp_min(0))


def _cagrad_best(g: Tensor, a: Tensor, phi: Tensor, raw: Tensor, solved: Tensor, extra: Tensor) -> Tensor:
    """The candidate with the smallest objective: face stationary points that exist and are
    >= 0 (``raw``, ``solved``), and the points ``extra`` [E, K] of the simplex (vertices,
    an iterate). Clamped to >= 0 and renormalised (it is a point of the simplex up to
    rounding)."""
    ok = solved & (raw >= -1e-12).all(-1)
    cand = torch.cat([raw, extra])
    obj = _cagrad_objective(g, a, phi, cand)
    # The extra points always have a finite objective, so the pick is a finite row.
    key = torch.where(torch.cat([ok, ok.new_ones(extra.shape[0])]), obj, float("inf"))
    w = _pick(cand, key).clamp_min(0)
    return w / w.sum().clamp_min(1e-300)


@functools.lru_cache(maxsize=16)
def _cagrad_2_consts(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For :func:`_cagrad_2`: the [4, 9] map of the flattened G = [G11, G12, G21,
    G22] (G12 and G21 averaged as s) to ``(tr, alpha, m, c1, 2 c1, c2, G11, s, G22)``; the
    affine map ``t -> (t, 1 - t)``; the mean's weights (1/2, 1/2)."""
    h, q = 0.5, 0.25
    cols = [
        [1.0, 0, 0, 1],  # tr = G11 + G22
        [h, 0, 0, -h],  # alpha = a_1 - a_2, a = G b with b = (1/2, 1/2)
        [q, q, q, q],  # m = b^T G b = mean(a)
        [0, h, h, -1],  # c1 = s - G22
        [0, 1, 1, -2],  # 2 c1
        [1, -1, -1, 1],  # c2 = G11 + G22 - 2 s = ||g_1 - g_2||^2
        [1, 0, 0, 0],  # G11
        [0, h, h, 0],  # s
        [0, 0, 0, 1],  # G22
    ]
    f64 = {"dtype": torch.float64, "device": device}
    return (
        torch.tensor(cols, **f64).T.contiguous(),
        torch.tensor([0.0, 1.0], **f64),
        torch.tensor([1.0, -1.0], **f64),
        torch.tensor([0.5, 0.5], **f64),
    )


def _cagrad_2(gram: Tensor, c: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """K = 2 in closed form, on G itself: ``(w*, ||g_w*||^2, phi^2, trace(G))``, the last three
    in G's units (a zero or negative trace reported as 1, as in the normalisation).

    On the segment ``w = (t, 1 - t)``, ``F(t) = a_2 + alpha t + phi sqrt(c0 + 2 c1 t + c2 t^2)``
    with ``a = G b`` (b = 1/2 each), ``alpha = a_1 - a_2``, ``c0 = G_22``, ``c1 = G_12 -
    G_22``, ``c2 = G_11 - 2 G_12 + G_22 = ||g_1 - g_2||^2``. F is convex; with ``u = c1 + c2 t``
    and ``D = c0 c2 - c1^2 = G_11 G_22 - G_12^2``, ``F'(t) = 0`` reads ``u = -alpha sqrt(D /
    (phi^2 c2 - alpha^2))``, which exists iff ``phi^2 c2 > alpha^2``; otherwise ``|phi (sqrt
    q)'| <= phi sqrt(c2) <= |alpha|`` and F is monotone: t = 1 if alpha < 0 else 0. The
    stationary t is clamped to [0, 1]. t is scale invariant, so G is not normalised: every
    quantity linear in G (``alpha``, ``m = b^T G b`` with ``phi^2 = c^2 m``, ``c1``, ``c2``, the
    trace) comes from one product with a constant [4, 9] matrix, and ``||g_w||^2 = G22 + 2 c1
    t + c2 t^2``. Non-finite entries of G read as 0.
    """
    coef, offset, slope, _ = _cagrad_2_consts(gram.device)
    g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
    flat = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).reshape(4)
    tr, alpha, m, c1, c1x2, c2, g11, s, g22 = (flat @ coef).unbind()
    det = torch.addcmul(g11 * g22, s, s, value=-1).clamp_min(0)
    phi2 = m.clamp_min(0) * (c * c)
    den = torch.addcmul(phi2 * c2, alpha, alpha, value=-1)
    # den > 0 implies c2 > 0: the unguarded divisions are finite where they are taken.
    t_in = (torch.addcmul(c1, alpha, torch.sqrt(det / den)) / c2.neg()).clamp(0, 1)
    t = torch.where(den > 0, t_in, alpha < 0)
    r2 = torch.addcmul(g22, t, torch.addcmul(c1x2, c2, t)).clamp_min(0)
    return torch.addcmul(offset, t, slope), r2, phi2, torch.where(tr > 0, tr, 1.0)


def cagrad_direction_2(gram: Tensor, c: float, norm_eps: float) -> Tensor:
    """CAGrad's direction weights at K = 2, ``w = b + (phi / ||g_w*||) w*`` (0 when
    ``||g_w*|| <= norm_eps sqrt(trace(G))``), before the rescale: what
    :class:`~gradbal.methods.cagrad.CAGrad` computes from :func:`cagrad_weights`, in 34 small
    ops instead of 55: :func:`_cagrad_2` without the normalisation, since ``phi / ||g_w||`` is
    scale invariant and the threshold reads ``||g_w||^2 <= norm_eps^2 trace(G)``."""
    w_opt, r2, phi2, tr = _cagrad_2(gram, c)
    half = _cagrad_2_consts(gram.device)[3]
    small = r2 <= tr * (norm_eps * norm_eps)
    return torch.where(small, 0.0, torch.addcmul(half, torch.sqrt(phi2) / torch.sqrt(r2), w_opt))


def _cagrad_enumerate(g: Tensor, a: Tensor, phi: Tensor) -> Tensor:
    """K <= EXACT_MAX_K: every face's stationary point in one batched solve. The optimum
    solves its face's stationarity equations (or is a vertex), so the smallest objective
    among the candidates is the optimum."""
    k = g.shape[-1]
    eye, mm, off = _cagrad_faces(k, g.device, g.dtype)
    raw, solved = _cagrad_face_raw(g + _RIDGE * eye, a, phi, mm, off)
    return _cagrad_best(g, a, phi, raw, solved, eye)


def _cagrad_ipm(g: Tensor, a: Tensor, phi: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Primal-dual interior point (Mehrotra) for ``min F(w)`` on the simplex.

    With ``z`` the multipliers of ``w >= 0`` and ``nu`` that of ``1^T w = 1``, each step
    inverts the Newton matrix ``H = hess F + diag(z / w) + 1e-12 I`` once (``inv_ex``: the
    Hessian is PSD only up to rounding, and it never syncs) and projects the inverse on
    ``1^T dw = 0``: ``P = H^-1 - H^-1 1 1^T H^-1 / (1^T H^-1 1)``. The predictor and the
    corrector are then one matmul each (``dw = rhs P``, ``dnu = -rhs H^-1 1 / (1^T H^-1 1)``).

    Vectors are rows ``[1, K]`` so that every product is one ``matmul``, and primal and
    dual variables live in one ``[1, 2K]`` tensor so that the step-length rule runs once
    for both: on a CPU each small op costs ~1.5-2 us whatever its size, so the op count is
    the cost (62 top-level ops per step, was 92 with an LU factorisation and two solves).

    Returns (w on the simplex, z), both ``[1, K]``."""
    k = g.shape[-1]
    a = a.unsqueeze(0)
    ones = torch.ones_like(a)
    w = ones / k
    gw = w @ g
    r = torch.sqrt((gw @ w.mT).clamp_min(1e-30))
    nu = (torch.addcmul(a, phi / r, gw) - 1).mean(-1, keepdim=True)  # z = 1
    s = torch.cat([w, ones], -1)
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    ridge = 1e-12 * eye
    e_k = ones.mT / k  # (w * z) @ e_k = w^T z / K
    quad = torch.nn.functional.pad(eye / k, (k, 0, 0, k))  # s quad s^T = w^T z / K
    ones_2k = torch.ones_like(s).mT
    neg1, one, c99 = (torch.full((), v, dtype=g.dtype, device=g.device) for v in (-1.0, 1.0, 0.99))
    for _ in range(iterations):
        w, z = s[:, :k], s[:, k:]
        zw = z / w
        gw = w @ g
        ir = (gw @ w.mT).clamp_min_(1e-30).rsqrt_()  # 1 / r
        pr = phi * ir
        v = gw * ir
        # hess F = phi / r (G - G w w^T G / r^2) = pr (G - v^T v)
        h = torch.addcmul(torch.addcmul(ridge, zw.mT, eye), pr, torch.addmm(g, v.mT, v, alpha=-1))
        hinv, _ = torch.linalg.inv_ex(h)
        col = ones @ hinv
        cs = col.mT / col.sum(-1, keepdim=True)
        hp = torch.addmm(hinv, cs, col, alpha=-1)
        ngn = torch.addcmul(nu - a, pr, gw, value=-1)  # -(grad F - nu)
        nsi = neg1 / s  # the step-length rule: t = 1 / max(1, max(-d / s))
        dw = ngn @ hp
        dz = torch.addcmul(z, zw, dw).neg_()
        d = torch.cat([dw, dz], -1)
        s_aff = torch.addcmul(s, one / (d * nsi).amax(-1, keepdim=True).clamp_min_(1), d)
        mu = (w * z) @ e_k
        mu_aff = (s_aff @ quad) @ s_aff.mT
        target = (mu_aff / mu).clamp_(0, 1).pow_(3).mul_(mu).clamp_min_(1e-13)
        # Corrector: rc = w z + dw_aff dz_aff - target, rhs = ngn + z - rc / w.
        q = torch.addcmul(target, dw, dz, value=-1).div_(w)
        rhs = ngn + q
        dw = rhs @ hp
        dz = torch.addcmul(q - z, zw, dw, value=-1)
        d = torch.cat([dw, dz], -1)
        t = c99 / (d * nsi).amax(-1, keepdim=True).clamp_min_(1)
        nu_new = torch.addcmul(nu, t, rhs @ cs, value=-1)
        s_new = torch.addcmul(s, t, d)
        # A failed inverse or an overflow gives inf/NaN: keep the previous point (no host
        # branch); one check covers s and nu.
        good = torch.isfinite(torch.addmm(nu_new, s_new, ones_2k))
        s = torch.where(good, s_new, s).clamp_min_(1e-300)
        nu = torch.where(good, nu_new, nu)
    w, z = s[:, :k], s[:, k:]
    return w / w.sum(-1, keepdim=True), z


def _cagrad_faces_of(free: Tensor, eye: Tensor) -> tuple[Tensor, Tensor]:
    """``m m^T`` and ``diag(1 - m)`` for face masks ``free`` [F, K] (float)."""
    return free.unsqueeze(-1) * free.unsqueeze(-2), (1 - free).unsqueeze(-1) * eye


def _cagrad_large(g: Tensor, a: Tensor, phi: Tensor, iterations: int, rounds: int = CAGRAD_ROUNDS) -> Tensor:
    """K > EXACT_MAX_K: interior point, then exact face solutions on nested faces and
    primal-dual active-set rounds.

    The interior point's iterate ranks the coordinates by ``w_i / z_i`` (large on the
    optimal support, small off it, long before the iterate itself is accurate). The K
    nested faces "the m best-ranked coordinates", m = 1..K, are solved in closed form in
    one batched solve (:func:`_cagrad_face_raw`); one of them is the optimal face as soon
    as the ranking separates it. Each active-set round then solves the current face,
    drops coordinates whose face solution is negative and adds those whose gradient
    violates the KKT conditions at the best point so far. Every candidate is a point of the
    simplex (the iterate and the vertices compete too) and the one with the smallest
    objective is kept, so each stage can only improve the answer.

    A round is the closed form of :func:`_cagrad_face_raw` for one face with rows ``[1, K]``
    (one ``inv_ex`` and matmuls, 50 top-level ops, was 85): it keeps
    ``u = (s_q + root) p - s_p q = s_p root raw``, a positive multiple of the face's
    stationary point where that exists (``s_p, disc > 0``), which the clamp and
    renormalisation map to the same point; ``w^T grad F(w) = F(w)`` gives the KKT test's
    threshold; ``grad F`` at the best point comes from its tracked ``G w`` and ``r``.
    """
    eye = _eye(g.shape[-1], g.device)
    gr = g + _RIDGE * eye
    w, z = _cagrad_ipm(g, a, phi, iterations)
    key = w / z
    free = (key >= key.sort(descending=True).values.mT).to(g.dtype)
    raw, solved = _cagrad_face_raw(gr, a, phi, *_cagrad_faces_of(free, eye), min_norm_points=True)
    best = _cagrad_best(g, a, phi, raw, solved, torch.cat([eye, w])).unsqueeze(0)
    a_col = a.unsqueeze(-1)
    best_gw = best @ g
    best_r = (best_gw @ best.mT).clamp_min_(0).sqrt_()
    best_f = torch.addcmul(best @ a_col, phi, best_r)
    support = w > z
    scale = a.abs().amax() + phi * torch.sqrt(g.diagonal().amax())
    a_tol = a + 1e-12 * scale  # grad_i + tol < w^T grad = F(w): coordinate i violates KKT
    ones_a = torch.stack([torch.ones_like(a), a])  # [2, K]
    ones_a_t = ones_a.mT
    gme = gr - eye  # face matrix: (G - I) m m^T + I, i.e. G_SS on S, the identity off S
    phi2 = phi * phi
    for _ in range(rounds):
        m = support.to(g.dtype)
        inv, _ = torch.linalg.inv_ex(torch.addcmul(eye, gme, m.mT * m))
        x = (ones_a * m) @ inv  # rows p = G_SS^-1 1, q = G_SS^-1 a_S; 0 off S
        s_p, _, s_q, t = (x @ ones_a_t).reshape(4).unbind()
        disc = torch.addcmul(s_q * s_q, s_p, t - phi2, value=-1)
        root = disc.clamp_min(0).sqrt_()
        x_p, x_q = x.split(1)
        u = torch.addcmul((s_q + root) * x_p, s_p, x_q, value=-1)
        solved = (torch.minimum(disc, s_p) > 0) & torch.isfinite(u.sum())
        cand = torch.where(solved, u, m)
        w = cand.clamp_min(0)
        # No clamp on the sum: an empty face (sum 0) gives NaN, whose objective is never taken.
        w = w / w.sum(-1, keepdim=True)
        gw = w @ g
        r = (gw @ w.mT).clamp_min_(0).sqrt_()
        f = torch.addcmul(w @ a_col, phi, r)
        take = f < best_f
        best = torch.where(take, w, best)
        best_f = torch.where(take, f, best_f)
        best_gw = torch.where(take, gw, best_gw)
        best_r = torch.where(take, r, best_r)
        violated = torch.addcmul(a_tol, phi / best_r.clamp_min(1e-15), best_gw) < best_f
        new = (support & (cand > 0)) | violated
        support = torch.where(new.any(), new, support)
    return best.squeeze(0)


def cagrad_weights(
    gram: Tensor, c: float, iterations: int = CAGRAD_ITERATIONS
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Solve CAGrad's inner problem on the simplex.

    ``w* = argmin_{w in simplex} g_w^T g_0 + phi ||g_w||`` with ``g_w = sum_i w_i g_i``,
    ``g_0`` the mean gradient and ``phi = c ||g_0||`` (Liu et al., NeurIPS 2021, Alg. 1),
    computed on ``G / trace(G)`` (the weights are scale invariant).

    Returns (w* [K], ``||g_w*||`` and ``phi``, both relative to ``sqrt(trace(G))``), float64.
    """
    k = gram.shape[-1]
    if k == 2:
        w, r2, phi2, tr = _cagrad_2(gram, c)
        return w, torch.sqrt(r2 / tr), torch.sqrt(phi2 / tr)
    g, _ = _trace_normalise(gram)
    a = g.mean(-1)  # G b with b = 1 / K
    phi = c * torch.sqrt(a.mean().clamp_min(0))
    if k == 1:
        w = torch.ones_like(a)
    elif k <= EXACT_MAX_K:
        w = _cagrad_enumerate(g, a, phi)
    else:
        w = _cagrad_large(g, a, phi, iterations)
    r = torch.sqrt(((g @ w) * w).sum().clamp_min(0))
    return w, r, phi


# ------------------------------------------------------------------- FairGrad / Nash


#: fair_weights' damped Newton steps (each with a 16-point line search) and the undamped
#: ones after them (see fair_weights for how they were chosen).
FAIR_STEPS = 8
FAIR_NEWTON_STEPS = 4


@functools.lru_cache(maxsize=32)
def _fair_consts(
    k: int, alpha: float, ridge: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """``ridge * I``, ``I / alpha`` and the line-search fractions ``-0.99 * [1, 1/2, ...,
    2^-14, 0]`` as a row [1, 16] (constants: no ops per call). Never modified in place."""
    eye = torch.eye(k, dtype=dtype)
    frac = torch.cat([0.5 ** torch.arange(15, dtype=dtype), torch.zeros(1, dtype=dtype)])
    return (eye * ridge).to(device), (eye / alpha).to(device), (frac * -0.99).unsqueeze(0).to(device)


def _fair_newton(g: Tensor, eye_a: Tensor, w: Tensor, expo: float) -> Tensor:
    """``-dw`` for a column w [K, 1]: the Newton step of f at w, negated (``H^-1 grad f``).

    ``H = G + diag(w^(-1/alpha) / (alpha w))`` is positive definite (G has the ridge).
    Seven ops: the column layout needs no unsqueeze / squeeze; two triangular solves rather
    than ``cholesky_solve``, which may read an info flag on the host (MAGMA) on a GPU.
    """
    wp = w.pow(expo)
    grad = torch.addmm(wp, g, w, beta=-1)  # G w - w^(-1/alpha)
    chol, _ = torch.linalg.cholesky_ex(torch.addcmul(g, eye_a, wp / w))
    return _chol_solve_columns(chol, grad)


def fair_weights(
    gram: Tensor,
    alpha: float = 1.0,
    iterations: int = FAIR_STEPS,
    ridge: float = 1e-8,
    newton: int = FAIR_NEWTON_STEPS,
) -> Tensor:
    r"""Positive solution of ``G w = w^(-1/alpha)`` (elementwise power).

    FairGrad (Ban & Ji, ICML 2024) with fairness parameter ``alpha``; ``alpha = 1`` is
    Nash-MTL's bargaining solution ``G w = 1 / w`` (Navon et al., ICML 2022). The solution
    is the unique minimiser of the strictly convex ``f(w) = 1/2 w^T G w - sum_i phi(w_i)``,
    ``phi'(w) = w^(-1/alpha)``, found by ``iterations`` damped Newton steps and then
    ``newton`` undamped ones (no data-dependent loop).

    Start: the exact answer for orthogonal gradients, ``w_i = G_ii^(-alpha/(1+alpha))``,
    times the scalar c minimising ``f(c w)``
    (``c^(1+1/alpha) = sum_i w_i^(1-1/alpha) / w^T G w``), which puts the start on the
    right scale when the gradients conflict. Each damped step evaluates f at 16 step lengths
    at once, ``t_max 2^-i`` (i < 15) and 0, where ``t_max`` is 0.99 of the largest step keeping
    ``w > 0``, capped at 16: steps longer than Newton's let a weight that has to grow by
    orders of magnitude (a gradient that (nearly) cancels with others) grow 17x per step
    instead of 2x. The step minimising f is kept. Near the solution the values of f at the
    candidates differ by less than its rounding error, so the choice among them is noise at
    the ~1e-8 level; the undamped steps (each weight kept above 1/100 of its value: positive)
    then converge quadratically, to ~1e-15 on well-conditioned problems.

    Measured (2-core CPU VM, 1 thread; 2240 degenerate and 560 well-conditioned problems:
    K = 3..16, alpha in {0.25, 0.5, 1, 2, 5}; rank-deficient, rank 2, mixed-scale (12
    decades), conflicting, opposite / equal / zero rows, nearly opposite pairs, and random
    rows; against the former solver run with 200 steps): the default 8 damped + 4 undamped
    steps reach a worst relative error of 1.6e-15 on the well-conditioned problems and leave
    107 degenerate problems unconverged (backward error above 1e-10), against 193 for the
    former 10 damped + 1 undamped steps (1.3e-15 well-conditioned); 8 + 3: 181, 9 + 2 (with
    a common step length): 165, 10 + 4: 15, 7 + 4: 289; a common step length instead of
    the per-weight floor changes nothing measurable. Fewer damped steps do not converge: 4 +
    5 misses 1e-5 on well-conditioned problems (the undamped steps start outside Newton's
    region) and leaves ~900 degenerate ones, as does moving along ``w exp(t dw / w)``
    instead. Cost at K = 3..16: 215 top-level aten ops for alpha = 1 (former: 334) with
    ``cholesky_solve`` in each Newton step, 240 with the two triangular solves used now
    (``python benchmarks/bench_weights.py --threads 1 --methods fairgrad nash_mtl``: ~0.6-0.8
    ms against ~0.75-0.85 ms before); medians of 40 interleaved calls with
    ``cholesky_solve``, K = 4: 1.37 -> 0.98 ms, K = 16: 1.39 -> 1.01 ms (a loaded machine).
    ``iterations`` buys more accuracy on the degenerate problems (10 + 4: ~40 ops more).

    G is divided by ``s = trace(G) / K`` first and the answer multiplied back by
    ``s^(-alpha / (1 + alpha))`` (the exact scaling law), and ``ridge * I`` is added to the
    normalised matrix so a solution exists when G is singular with a positive null vector
    (opposite gradients) or a zero row: such weights then grow towards
    ``ridge^(-alpha/(1+alpha))`` (1e4 for alpha = 1) instead of diverging, and multiply
    gradients whose combination is zero. For K = 2 and alpha = 1 the closed form
    ``w_i = 1 / (||g_i|| sqrt(1 + cos(g_1, g_2)))`` is used.

    On CUDA with Triton, for 3 <= K <= 32, one launch of :func:`gradbal.kernels.fair_weights`
    runs the same steps in registers (``GRADBAL_BACKEND=torch`` keeps the torch ops; a kernel
    that fails warns once and the torch ops run from then on); its answer differs from the
    torch ops' by rounding (1e-15 relative on well-conditioned G in the tests).

    Returns w [K] float64, positive and finite.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if FAIR.usable(gram):  # CUDA, 3 <= K <= 32: the same steps in one launch
        w = FAIR.run(gram, float(alpha), int(iterations), float(ridge), int(newton))
        if w is not None:
            return w
    g0 = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
    g0 = torch.nan_to_num(g0, nan=0.0, posinf=0.0, neginf=0.0)
    k = g0.shape[-1]
    ridge_eye, eye_a, frac = _fair_consts(k, float(alpha), float(ridge), g0.dtype, g0.device)
    # trace(G) equals that of the symmetrised G; a zero matrix keeps s = 1.
    tr = g0.trace()
    s = torch.where(tr > 0, tr / k, 1.0)
    g = torch.add(ridge_eye, torch.add(g0, g0.mT).div_(s), alpha=0.5)  # sym(G) / s + ridge I
    p = alpha / (1 + alpha)
    out_scale = s.pow(-p)
    if k == 2 and alpha == 1.0:
        n = g.diagonal().sqrt()
        # Row sums of [[1, cos], [cos, 1]] (g is exactly symmetric): 1 + cos twice, without
        # indexing out the scalars (four selects).
        one_cos = (g / torch.outer(n, n)).fill_diagonal_(1.0).sum(0)
        # A Gram matrix of fp32 gradients can miss PSD by ~1e-7 relative, more than the
        # ridge: for (nearly) opposite gradients 1 + cos would go negative (NaN weights).
        return out_scale / (n * torch.sqrt(one_cos.clamp_min(ridge)))
    expo = -1.0 / alpha
    e = 1.0 - 1.0 / alpha
    # Orthogonal-gradient answer G_ii w_i = w_i^(-1/alpha) (diagonal >= ridge), then scaled.
    w0 = g.diagonal().pow(-p)
    if alpha == 1.0:  # c = (K / w^T G w)^(1/2)
        c = torch.dot(torch.addmv(w0, g, w0, beta=0, alpha=1.0 / k), w0).pow(-p)
    else:
        c = (w0.pow(e).sum() / torch.dot(torch.mv(g, w0), w0)).pow(p)
    w = w0.unsqueeze(1) * c  # a column [K, 1] from here on
    for _ in range(iterations):
        neg_dw = _fair_newton(g, eye_a, w, expo)
        # t_max = 0.99 / max(1 / 16, max_i (-dw_i / w_i)): all 16 candidates are > 0.
        m = (neg_dw / w).amax().clamp_min(0.99 / 16)
        cand = torch.addcmul(w, neg_dw, frac / m)  # [K, 16]
        # 2 f at each candidate (the factor 2 leaves the argmin as it is).
        quad = ((g @ cand) * cand).sum(0)
        if alpha == 1.0:
            vals = torch.sub(quad, cand.log().sum(0), alpha=2.0)
        else:
            vals = torch.sub(quad, cand.pow(e).sum(0), alpha=2.0 / e)
        # argmin without reading it on the host (index_select by a 1-element tensor).
        w = cand.index_select(1, torch.nan_to_num(vals, nan=float("inf")).argmin(0, keepdim=True))
    for _ in range(newton):
        # Undamped Newton step, each weight kept at >= 1/100 of its value (positive).
        w = torch.sub(w, _fair_newton(g, eye_a, w, expo)).maximum(w * 0.01)
    return (w * out_scale).view(k)
