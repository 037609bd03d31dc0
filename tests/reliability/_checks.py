"""Shared helpers of the reliability tests: bit-exact snapshots of everything a step may touch."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested containers of tensors (NaN equals NaN, -0 != +0)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if a.is_floating_point():
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
        return torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def snapshot(params, opt) -> dict[str, Any]:
    """Everything a MultiObjectiveOptimizer call may change, copied (and .grad objects kept,
    to check their identity)."""
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
        "grad_objects": [p.grad for p in params],
        "inner": copy.deepcopy(opt.optimizer.state_dict()),
        "method": copy.deepcopy(opt.method.state_dict()),
        "generator": opt.generator.get_state().clone(),
        "counters": (opt.skipped_steps, opt.num_objectives),
    }


def differences(a: dict[str, Any], b: dict[str, Any], keys=None) -> list[str]:
    """Names of the snapshot entries that differ (``grad_objects`` by identity)."""
    out = []
    for key in keys or a:
        if key == "grad_objects":
            if any(x is not y for x, y in zip(a[key], b[key])):
                out.append(key)
        elif not same(a[key], b[key]):
            out.append(key)
    return out
