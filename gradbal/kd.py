r"""Knowledge-distillation building blocks: the KD loss, feature capture, a frozen teacher.

* :func:`kd_loss`: Hinton et al.'s temperature-scaled KL divergence with the ``T^2`` factor
  ("Distilling the Knowledge in a Neural Network", 2015), reduced as mdistiller's
  ``kd_loss`` and torchdistill's ``KDLoss`` do (sum over classes, mean over the batch).
* :class:`FeatureCapture`: intermediate outputs of modules picked by name
  (``model.get_submodule``), through forward hooks, so torchvision and timm models work
  unedited (torchdistill's approach).
* :class:`FrozenTeacher`: a teacher that stays in eval mode, never builds a graph and can run
  in bf16/fp16.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FeatureCapture", "FrozenTeacher", "kd_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    dim: int = 1,
    reduction: str = "mean",
) -> Tensor:
    r"""Temperature-scaled KL divergence from the teacher's to the student's distribution.

    .. math::

        \mathcal{L}_{KD} = T^2 \, \frac{1}{B} \sum_{b} \sum_{c}
            p^t_{bc} \left(\log p^t_{bc} - \log p^s_{bc}\right), \qquad
        p^t = \operatorname{softmax}(z^t / T),\; p^s = \operatorname{softmax}(z^s / T)

    The ``T^2`` factor keeps the gradient's magnitude independent of T (Hinton, Vinyals and
    Dean 2015, section 2), so KD's weight against cross-entropy means the same at any T.
    Computed in float32 at least (logits in bf16/fp16 are upcast). The teacher's logits are
    used as given: produce them under ``torch.no_grad()`` (e.g. with :class:`FrozenTeacher`).

    Args:
        student_logits: ``[B, C]`` or ``[B, C, ...]`` (classes on ``dim``).
        teacher_logits: the same shape.
        temperature: T > 0 (ImageNet protocol: 1; CIFAR-100 protocol: 4; see ANCHORS.md).
        dim: the class dimension (1, as in ``F.cross_entropy``).
        reduction: ``"mean"`` (sum over classes, mean over every other position: the batch,
            and pixels or tokens if any; equals ``F.kl_div(..., reduction="batchmean")`` for
            ``[B, C]``), ``"sum"``, or ``"none"`` (per position, class dim removed).

    Example:
        >>> import torch, gradbal
        >>> s = torch.tensor([[2.0, 0.0, -1.0]]); t = torch.tensor([[1.0, 1.0, 0.0]])
        >>> round(gradbal.kd_loss(s, t, temperature=4.0).item(), 4)
        0.4782
    """
    if not isinstance(student_logits, Tensor) or not isinstance(teacher_logits, Tensor):
        raise TypeError("kd_loss expects two tensors of logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; KD needs the same batch and classes"
        )
    if student_logits.ndim < 2:
        raise ValueError(f"logits must be at least [B, C], got shape {tuple(student_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_ps = F.log_softmax(student_logits.to(dtype) / temperature, dim=dim)
    log_pt = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=dim)
    # p_t (log p_t - log p_s), with 0 where p_t underflows to 0 (its limit).
    per_pos = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=dim)
    per_pos = per_pos * (temperature * temperature)
    if reduction == "mean":
        return per_pos.mean()
    if reduction == "sum":
        return per_pos.sum()
    return per_pos


def _resolve_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    # Wrappers (DistributedDataParallel, FrozenTeacher, torch.compile's OptimizedModule)
    # prefix every name: accept the unwrapped model's names too.
    for prefix in ("module.", "_orig_mod."):
        try:
            return model.get_submodule(prefix + name)
        except AttributeError:
            pass
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"; did you mean {close}?" if close else f"; the model has e.g. {names[:8]}"
    raise ValueError(f"no module named {name!r} in {type(model).__name__}{hint}") from None


class FeatureCapture:
    """Capture the outputs of named submodules during forward passes (forward hooks).

    Usage::

        capture = gradbal.FeatureCapture(student, ["layer2", "layer4"])
        logits = student(images)
        feats = capture.pop()        # {"layer2": tensor, "layer4": tensor}, then cleared

    Names are those of ``model.named_modules()`` (``"layer4.1.conv2"``, ``"blocks.11"``); a
    ``"module."`` prefix added by DDP or :class:`FrozenTeacher` may be left out. Outputs are
    kept as the module returned them (with their graph, so losses on them backpropagate
    into the model). A module that runs several times in one forward keeps its last output.

    :meth:`pop` returns the features in the order the names were given and clears them; it
    raises if a module did not run since the last :meth:`pop` (a stale feature from an
    earlier batch is never returned). Use as a context manager, or call :meth:`remove`, to
    take the hooks off.

    Args:
        model: any ``nn.Module``.
        names: submodule names, in the order :meth:`pop` should return them.
        detach: store ``output.detach()`` (for features that only serve as targets).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, detach: bool = False) -> None:
        if isinstance(names, str):
            names = [names]
        self.names = list(names)
        if not self.names:
            raise ValueError("FeatureCapture needs at least one module name")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"module names repeat: {self.names}")
        self.detach = bool(detach)
        self.features: dict[str, Any] = {}
        self._handles = []
        modules = [_resolve_module(model, n) for n in self.names]  # validate all first
        for name, module in zip(self.names, modules):
            self._handles.append(module.register_forward_hook(self._hook_for(name)))

    def _hook_for(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.detach and isinstance(output, Tensor):
                output = output.detach()
            self.features[name] = output

        return hook

    def pop(self) -> dict[str, Any]:
        """The captured features in the order of ``names``; clears them."""
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise RuntimeError(
                f"module(s) {missing} produced no output since the last pop(): run the "
                "model's forward first, and check that those modules are used by it"
            )
        out = {n: self.features[n] for n in self.names}
        self.features = {}
        return out

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.features = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureCapture(names={self.names}, detach={self.detach})"


class FrozenTeacher(nn.Module):
    """A teacher that is always in eval mode, has no trainable parameters and builds no graph.

    * ``requires_grad`` is switched off on every parameter and :meth:`train` keeps eval mode,
      so ``student_and_teacher.train()`` cannot put the teacher's BatchNorm or dropout into
      training mode.
    * ``forward`` runs under ``torch.no_grad()`` (not ``inference_mode``: its outputs feed
      losses whose backward saves them).
    * ``dtype=torch.bfloat16`` (or ``float16``) casts the weights once and the floating inputs
      at every call; outputs come back in that dtype (:func:`kd_loss` and
      :class:`gradbal.SubspaceProjector` upcast). This halves the teacher's memory and time on
      hardware with fast 16-bit math. fp16 on CPU may be unsupported; prefer bf16 there.
      The teacher keeps that precision inside the student's ``torch.autocast`` region.

    Hooks (:class:`FeatureCapture`) attach to the wrapped model as before; its module names
    work with or without the ``"module."`` prefix.

    Args:
        model: the teacher network, with its weights already loaded.
        dtype: ``None`` (keep) or a floating dtype for the weights and inputs.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"FrozenTeacher wraps an nn.Module, got {type(model).__name__}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype or None, got {dtype}")
        self.module = model
        self.dtype = dtype
        for p in self.module.parameters():
            p.requires_grad_(False)
        if dtype is not None:
            self.module.to(dtype)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        # Always eval: BatchNorm statistics and dropout of a teacher stay fixed.
        return super().train(False)

    def _cast(self, x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            return x.to(self.dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v) for v in x)
        if isinstance(x, dict):
            return {k: self._cast(v) for k, v in x.items()}
        return x

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.dtype is not None:
            args = self._cast(args)
            kwargs = self._cast(kwargs)
        if self.module.training:  # someone called teacher.module.train() directly
            super().train(False)
        with torch.no_grad(), self._precision():
            return self.module(*args, **kwargs)

    def _precision(self):
        """With ``dtype`` set the teacher runs in it: an enclosing autocast region (the
        student's AMP) is switched off inside, or it would re-cast to its own dtype and mix
        dtypes with the 16-bit weights."""
        if self.dtype is None:
            return contextlib.nullcontext()
        tensor = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        if tensor is None:
            return contextlib.nullcontext()
        return torch.autocast(tensor.device.type, enabled=False)
