"""Helpers shared by the method modules (private)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def remember(cache: dict, key: Any, value: Tensor) -> Tensor:
    """Keep ``value`` in a method's per-instance cache and return it; while ``torch.compile``
    traces, return it without keeping it. A tensor made inside a compiled region is that
    region's output, and under CUDA graphs (``compile_method``'s "reduce-overhead") the next
    replay overwrites it: a cached one would change under the method's feet."""
    if not torch.compiler.is_compiling():
        cache[key] = value
    return value


def partner_orders(keys: Tensor) -> Tensor:
    """Row i: the other K - 1 indices, in the order of the random ``keys[i]`` ([K, K]
    uniforms; PCGrad's and GradVac's order of the others for objective i). The diagonal of
    ``keys`` is set to 2 in place, so that i sorts last and is cut off."""
    keys.fill_diagonal_(2.0)
    return keys.argsort(dim=1)[:, : keys.shape[0] - 1]


def to_device(cpu_tensor: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without making the host wait.

    Random draws come from the optimizer's CPU generator; on CUDA they are staged through
    pinned memory so the copy is asynchronous (a pageable copy would block the host).
    """
    if cpu_tensor.device == device:
        return cpu_tensor
    if device.type == "cuda" and not torch.compiler.is_compiling():
        # (Under torch.compile the copy is the compiled program's own: pin_memory() has no
        # fake-tensor rule, and a traced call to it fails the whole compilation.)
        return cpu_tensor.pin_memory().to(device, non_blocking=True)
    return cpu_tensor.to(device)


def check_pref_vector(pref_vector: Sequence[float] | Tensor | None) -> Tensor | None:
    """Validate a preference vector (1-D, finite) and keep it as a float64 host tensor."""
    if pref_vector is None:
        return None
    p = torch.as_tensor(pref_vector, dtype=torch.float64).detach().cpu()
    if p.ndim != 1 or p.numel() < 1:
        raise ValueError(f"pref_vector must be a 1-D sequence of numbers, got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise ValueError(f"pref_vector must be finite, got {p.tolist()}")
    return p


class PrefVector:
    """A preference vector with a per-device cache (the host copy happens once per device)."""

    def __init__(self, pref_vector: Sequence[float] | Tensor | None, default: str):
        self.host = check_pref_vector(pref_vector)
        self.default = default  # "mean" (1/K each) or "sum" (ones)
        self._cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def check(self, k: int, method: str) -> None:
        if self.host is not None and self.host.numel() != k:
            raise ValueError(
                f"method {method!r} has a pref_vector of {self.host.numel()} entries but {k} "
                "objectives were given; pass one entry per objective"
            )

    def get(self, k: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The vector on ``like``'s device, in ``dtype`` (default ``like.dtype``); cached, so a
        call dispatches no op (callers must not modify it)."""
        key = (k, like.device, like.dtype if dtype is None else dtype)
        cached = self._cache.get(key)
        if cached is None:
            if self.host is None:
                value = 1.0 / k if self.default == "mean" else 1.0
                cached = torch.full((k,), value, dtype=key[2], device=like.device)
            else:
                cached = to_device(self.host, like.device).to(key[2])
            remember(self._cache, key, cached)
        return cached

    def __repr__(self) -> str:
        return "None" if self.host is None else repr(self.host.tolist())


def num_objectives(gram: Tensor | None, losses: Tensor | None, method: str) -> int:
    if gram is not None:
        return gram.shape[-1]
    if losses is not None:
        return losses.shape[-1]
    raise ValueError(f"method {method!r} needs the Gram matrix or the loss values")


def draw_seed(generator: torch.Generator | None) -> int:
    """A 63-bit seed drawn from a CPU generator (torch's global one when ``None``).

    Reads one value of a *CPU* tensor: no device synchronisation. The optimizer draws it
    before its first backward of a step.
    """
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64)[0])


def device_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (random numbers made where they are used)."""
    return torch.Generator(device=device).manual_seed(seed)
