"""One fresh process of tests/reliability/test_determinism.py: seed torch, train a small
model with a balanced optimizer, print a digest of every bit of the result.

Usage: python -m tests.reliability._determinism_worker METHOD[,METHOD...] SEED DEVICE [STEPS]
(one digest line per method).
"""

from __future__ import annotations

import hashlib
import sys

import torch
from torch import nn

import gradbal

F = nn.functional


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from state_tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from state_tensors(v)
    elif isinstance(obj, (int, float)):
        yield torch.tensor(obj, dtype=torch.float64)


def run(method: str, seed: int, device: str, steps: int = 40) -> str:
    torch.manual_seed(seed)  # the model's initial weights and (seed=None) the optimizer's seed
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5)).to(device)
    proj = nn.Linear(32, 16).to(device)  # only the feature objective reaches it
    opt = gradbal.MultiObjectiveOptimizer(
        torch.optim.SGD([*model.parameters(), *proj.parameters()], lr=0.05, momentum=0.9), method
    )
    x = torch.randn(steps, 24, 8, device=device)
    y = torch.randint(0, 5, (steps, 24), device=device)
    teacher = torch.randn(steps, 24, 5, device=device)
    feats = torch.randn(steps, 24, 16, device=device)
    weights = []
    for i in range(steps):
        h = model[1](model[0](x[i]))
        out = model[2](h)
        losses = [
            F.cross_entropy(out, y[i]),
            F.kl_div(F.log_softmax(out, -1), F.log_softmax(teacher[i], -1), reduction="batchmean", log_target=True),
            (proj(h) - feats[i]).pow(2).mean(),
        ]
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
        weights.append(opt.last_stats.weights)
    return digest([*model.state_dict().values(), *proj.state_dict().values(), *weights,
                   *state_tensors(opt.state_dict())])


if __name__ == "__main__":
    method, seed, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    torch.set_num_threads(1)  # the CPU result may depend on the thread count; fix it
    if device == "cuda":
        torch.use_deterministic_algorithms(True)
    for m in method.split(","):
        print(m, run(m, seed, device, steps))
