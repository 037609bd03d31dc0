r"""SubspaceProjector: feature distillation in a common n-dimensional space (MoKD's subspace half).

MoKD (Hayder et al., arXiv 2505.08170 v1) projects student and teacher features "into a
high-dimensional space ... a common n-dimensional latent space via two projections P_t
(teacher) and P_s (student)"; its successor DTO-KD (ICLR 2026) uses "multi-scale lightweight
projectors". Neither paper's text gives the layers, n or the loss; the design below is
gradbal's choice, close to VkD (Miles et al., "VkD: Improving Knowledge Distillation using
Orthogonal Projections", CVPR 2024), and specified in docs/MOKD.md section 4.

For each chosen stage s with student features ``z_s`` (C_s channels) and teacher features
``z_t`` (C_t channels):

.. math::

    \ell_s = \operatorname{SmoothL1}_\beta\big(\operatorname{LN}(P_s z_s),\;
              \operatorname{LN}(P_t z_t)\big), \qquad
    \mathcal{L} = \frac{1}{S} \sum_s \ell_s

* ``P_s: R^{C_s} -> R^n`` is learnable (weight and bias); ``P_t: R^{C_t} -> R^n`` has
  orthonormal columns (``P_t^T P_t = I``), so ``||P_t z|| = ||z||``: the pair cannot reach a
  trivial zero loss by shrinking both sides to 0. ``n >= max(C_s, C_t)``.
* Both act on the channel dimension: a 1x1 convolution for feature maps ``[B, C, H, W]``, a
  linear map for tokens ``[B, T, C]`` and pooled features ``[B, C]``.
* ``LN`` is layer normalisation over the n channels at each position/token, without affine
  parameters (a learnable gain could be set to 0, collapsing the loss).
* Student maps whose spatial size differs from the teacher's are resized to the teacher's
  (bilinear by default) before projection.
* SmoothL1 is averaged over every element of a stage; stages are averaged with equal weight.

The projector is training-only: it reads the features it is given and never touches the
student, which ships without it. Its loss is one more objective for
:class:`gradbal.MultiObjectiveOptimizer`: ``opt.backward([ce, kd, projector(zs, zt)])`` (put the
projector's parameters in the wrapped optimizer; only the feature objective reaches them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

__all__ = ["TEACHER_SIDES", "SubspaceProjector"]

#: How P_t is kept norm-preserving: learned under torch's orthogonal parametrization, or a
#: fixed random semi-orthogonal matrix (a buffer, no parameters).
TEACHER_SIDES = ("orthogonal", "fixed")
_RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")


def _as_list(x: int | Sequence[int], name: str) -> list[int]:
    if isinstance(x, int):
        return [x]
    out = list(x)
    if not out or not all(isinstance(c, int) and not isinstance(c, bool) for c in out):
        raise TypeError(f"{name} must be an int or a non-empty sequence of ints, got {x!r}")
    return out


def _features_list(feats: Tensor | Sequence[Tensor] | Mapping[str, Tensor], side: str) -> list:
    if isinstance(feats, Tensor):
        return [feats]
    if isinstance(feats, Mapping):
        return list(feats.values())
    try:
        return list(feats)
    except TypeError:
        raise TypeError(
            f"{side} features must be a tensor, a sequence of tensors or a dict of them "
            f"(e.g. FeatureCapture.pop()), got {type(feats).__name__}"
        ) from None


def _apply_channels(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``weight @ x`` over the channel dimension: dim 1 of ``[B, C, H, W]``, dim -1 otherwise."""
    if x.ndim == 4:
        # A 1x1 convolution; the weight is kept 2-D so the orthogonal parametrization sees
        # one [n, C] matrix (it would treat a [n, C, 1, 1] tensor as n*C 1x1 matrices).
        return F.conv2d(x, weight[:, :, None, None], bias)
    return F.linear(x, weight, bias)


def _layer_norm_channels(x: Tensor, eps: float) -> Tensor:
    if x.ndim == 4:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + eps)
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class _StudentSide(nn.Module):
    """Learnable ``P_s``: [n, C_s] weight and [n] bias."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return _apply_channels(x, self.linear.weight, self.linear.bias)


class _TeacherSide(nn.Module):
    """Norm-preserving ``P_t``: [n, C_t] with orthonormal columns, no bias."""

    def __init__(self, in_channels: int, dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "orthogonal":
            linear = nn.Linear(in_channels, dim, bias=False)
            # Tall [n, C_t] weights get orthonormal columns: W^T W = I.
            self.linear = parametrizations.orthogonal(linear)
        else:
            q, r = torch.linalg.qr(torch.randn(dim, in_channels, dtype=torch.float64))
            # Sign fix makes Q the Haar-distributed one (QR's signs are otherwise arbitrary).
            q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
            self.register_buffer("fixed_weight", q.to(torch.get_default_dtype()))

    @property
    def weight(self) -> Tensor:
        return self.linear.weight if self.kind == "orthogonal" else self.fixed_weight

    def forward(self, x: Tensor) -> Tensor:
        return _apply_channels(x, self.weight, None)


class SubspaceProjector(nn.Module):
    r"""One ``(P_s, P_t)`` projector pair per stage; returns the feature-distillation loss.

    ``loss = mean_s SmoothL1(LN(P_s z_s^(s)), LN(P_t z_t^(s)))`` with ``P_t`` semi-orthogonal
    (norm-preserving) and ``P_s`` learnable; see the module docstring and docs/MOKD.md
    section 4 for the sources and which parts are gradbal's choice.

    Args:
        student_channels: C_s of each stage (an int for one stage).
        teacher_channels: C_t of each stage, same length.
        dim: n, the common space's dimension: an int for every stage, one int per stage, or
            ``None`` for ``max(C_s, C_t)`` per stage. Must be ``>= max(C_s, C_t)``.
        teacher_side: ``"orthogonal"`` (default; ``P_t`` learned under
            ``torch.nn.utils.parametrizations.orthogonal``, so it stays exactly
            semi-orthogonal) or ``"fixed"`` (a random semi-orthogonal buffer drawn from torch's
            global RNG, no parameters).
        beta: SmoothL1's threshold between the quadratic and linear parts (``F.smooth_l1_loss``).
        eps: layer norm's epsilon.
        resize: interpolation mode used to bring student maps to the teacher's spatial size.

    Forward:
        ``projector(student_features, teacher_features)`` with one tensor per stage (a list,
        a tuple, a dict such as :meth:`gradbal.FeatureCapture.pop`'s, in stage order, or a
        single tensor for one stage). Per stage the two tensors must have the same rank
        (4: ``[B, C, H, W]``, 3: ``[B, T, C]``, 2: ``[B, C]``) and batch size; token counts
        must match. Returns a scalar. :meth:`stage_losses` returns the S per-stage losses.

    Example:
        >>> import torch, gradbal
        >>> _ = torch.manual_seed(0)
        >>> proj = gradbal.SubspaceProjector([16, 32], [64, 128])
        >>> zs = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
        >>> zt = [torch.randn(2, 64, 4, 4), torch.randn(2, 128, 2, 2)]
        >>> loss = proj(zs, zt)
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), True)
    """

    def __init__(
        self,
        student_channels: int | Sequence[int],
        teacher_channels: int | Sequence[int],
        dim: int | Sequence[int] | None = None,
        *,
        teacher_side: str = "orthogonal",
        beta: float = 1.0,
        eps: float = 1e-5,
        resize: str = "bilinear",
    ) -> None:
        super().__init__()
        cs = _as_list(student_channels, "student_channels")
        ct = _as_list(teacher_channels, "teacher_channels")
        if len(cs) != len(ct):
            raise ValueError(
                f"{len(cs)} student stages but {len(ct)} teacher stages; give one channel "
                "count per stage on each side"
            )
        for name, chans in (("student_channels", cs), ("teacher_channels", ct)):
            if any(c < 1 for c in chans):
                raise ValueError(f"{name} must be positive, got {chans}")
        if dim is None:
            dims = [max(a, b) for a, b in zip(cs, ct)]
        else:
            dims = _as_list(dim, "dim")
            if len(dims) == 1:
                dims = dims * len(cs)
            if len(dims) != len(cs):
                raise ValueError(f"dim has {len(dims)} entries for {len(cs)} stages")
        for s, (n, a, b) in enumerate(zip(dims, cs, ct)):
            if n < max(a, b):
                raise ValueError(
                    f"stage {s}: dim={n} is below max(C_s, C_t) = max({a}, {b}); the common "
                    "space must be at least as wide as both sides (MoKD's high-dimensional "
                    "space; a teacher side narrower than C_t cannot preserve norms)"
                )
        if teacher_side not in TEACHER_SIDES:
            raise ValueError(f"teacher_side must be one of {TEACHER_SIDES}, got {teacher_side!r}")
        if resize not in _RESIZE_MODES:
            raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {resize!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.student_channels = cs
        self.teacher_channels = ct
        self.dims = dims
        self.teacher_side = teacher_side
        self.beta = float(beta)
        self.eps = float(eps)
        self.resize = resize
        self.student_proj = nn.ModuleList(_StudentSide(a, n) for a, n in zip(cs, dims))
        self.teacher_proj = nn.ModuleList(
            _TeacherSide(b, n, teacher_side) for b, n in zip(ct, dims)
        )

    @classmethod
    def from_features(
        cls,
        student_features: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
        teacher_features: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
        dim: int | Sequence[int] | None = None,
        **kwargs,
    ) -> SubspaceProjector:
        """Build a projector whose channel counts are read off one batch of features."""
        zs = _features_list(student_features, "student")
        zt = _features_list(teacher_features, "teacher")

        def channels(z: Tensor) -> int:
            return z.shape[1] if z.ndim == 4 else z.shape[-1]

        return cls([channels(z) for z in zs], [channels(z) for z in zt], dim, **kwargs)

    @property
    def num_stages(self) -> int:
        return len(self.dims)

    def _check_stage(self, s: int, zs: Tensor, zt: Tensor) -> None:
        for side, z in (("student", zs), ("teacher", zt)):
            if not isinstance(z, Tensor):
                raise TypeError(f"stage {s}: {side} feature is a {type(z).__name__}, not a tensor")
            if z.ndim not in (2, 3, 4):
                raise ValueError(
                    f"stage {s}: {side} feature has shape {tuple(z.shape)}; expected [B, C, H, W] "
                    "feature maps, [B, T, C] tokens or [B, C] pooled features"
                )
        if zs.ndim != zt.ndim:
            raise ValueError(
                f"stage {s}: student feature has rank {zs.ndim} {tuple(zs.shape)} but teacher "
                f"feature has rank {zt.ndim} {tuple(zt.shape)}; pair features of the same kind "
                "(pool or flatten one side first)"
            )
        if zs.shape[0] != zt.shape[0]:
            raise ValueError(
                f"stage {s}: batch sizes differ (student {zs.shape[0]}, teacher {zt.shape[0]}); "
                "feed the teacher and the student the same batch"
            )
        cdim = 1 if zs.ndim == 4 else -1
        if zs.shape[cdim] != self.student_channels[s]:
            raise ValueError(
                f"stage {s}: student feature has {zs.shape[cdim]} channels (shape "
                f"{tuple(zs.shape)}), the projector was built for {self.student_channels[s]}"
            )
        if zt.shape[cdim] != self.teacher_channels[s]:
            raise ValueError(
                f"stage {s}: teacher feature has {zt.shape[cdim]} channels (shape "
                f"{tuple(zt.shape)}), the projector was built for {self.teacher_channels[s]}"
            )
        if zs.ndim == 3 and zs.shape[1] != zt.shape[1]:
            raise ValueError(
                f"stage {s}: token counts differ (student {zs.shape[1]}, teacher {zt.shape[1]}); "
                "tokens are not resized: select or pool matching tokens first"
            )

    def stage_losses(
        self,
        student_features: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
        teacher_features: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    ) -> Tensor:
        """The S per-stage losses ``[S]`` (the forward pass returns their mean)."""
        zs_all = _features_list(student_features, "student")
        zt_all = _features_list(teacher_features, "teacher")
        if len(zs_all) != self.num_stages or len(zt_all) != self.num_stages:
            raise ValueError(
                f"the projector has {self.num_stages} stage(s); got {len(zs_all)} student and "
                f"{len(zt_all)} teacher feature tensors"
            )
        losses = []
        for s, (zs, zt, ps, pt) in enumerate(
            zip(zs_all, zt_all, self.student_proj, self.teacher_proj)
        ):
            self._check_stage(s, zs, zt)
            dtype = ps.linear.weight.dtype
            # A low-precision teacher hands over bf16/fp16 features; compute in our dtype
            # (autocast, when active, still chooses the matmul precision).
            zs = zs.to(dtype)
            zt = zt.to(dtype)
            if zs.ndim == 4 and zs.shape[-2:] != zt.shape[-2:]:
                kwargs = {"align_corners": False} if self.resize in ("bilinear", "bicubic") else {}
                zs = F.interpolate(zs, size=zt.shape[-2:], mode=self.resize, **kwargs)
            # Normalise and compare in float32 even when autocast ran the projections in 16 bits.
            a = _layer_norm_channels(ps(zs).float(), self.eps)
            b = _layer_norm_channels(pt(zt).float(), self.eps)
            losses.append(F.smooth_l1_loss(a, b, beta=self.beta))
        return torch.stack(losses)

    def forward(
        self,
        student_features: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
        teacher_features: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    ) -> Tensor:
        return self.stage_losses(student_features, teacher_features).mean()

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels="
            f"{self.teacher_channels}, dims={self.dims}, teacher_side={self.teacher_side!r}, "
            f"beta={self.beta}, resize={self.resize!r}"
        )
