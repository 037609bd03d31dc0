"""Writer process of tests/reliability/test_checkpoint_kill.py: saves checkpoints in a loop with
the classification example's ``atomic_save`` (torch.save to ``<name>.tmp``, fsync, os.replace,
fsync of the folder) until it is killed.

Usage: python -m tests.reliability._ckpt_writer PATH NUMEL [LOG]   (or ``main`` in a child
process). Appends ``begin N`` before and ``done N`` after each save to LOG (stdout if none),
unbuffered. If PATH holds a checkpoint already, continues from its generation (what a resumed
training run does).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "classification"))  # train_kd imports `models`
from train_kd import atomic_save


def checkpoint(n: int, numel: int) -> dict:
    """A checkpoint shaped like train_kd's, every value derived from its generation ``n``."""
    return {
        "epoch": n,
        "student": {"weight": torch.full((numel,), float(n)), "bias": torch.full((7,), float(n))},
        "optimizer": {
            "optimizer": {
                "state": {0: {"momentum_buffer": torch.full((numel // 4,), -float(n))}},
                "param_groups": [{"lr": 0.1, "params": [0]}],
            },
            "gradbal": {
                "method": "mokd",
                "method_state": {},
                "generator": torch.Generator().manual_seed(n).get_state(),
                "skipped_steps": 0,
                "num_objectives": 2,
            },
        },
        "history": [{"epoch": e, "top1": float(e)} for e in range(1, n + 1)],
        "config": {"method": "mokd", "epochs": 10**6},
    }


def check(ckpt: dict) -> int:
    """Raise if a loaded checkpoint is not exactly ``checkpoint(n)``; return n."""
    n = ckpt["epoch"]
    numel = ckpt["student"]["weight"].numel()
    want = checkpoint(n, numel)
    assert torch.equal(ckpt["student"]["weight"], want["student"]["weight"])
    assert torch.equal(ckpt["student"]["bias"], want["student"]["bias"])
    buf = ckpt["optimizer"]["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(buf, want["optimizer"]["optimizer"]["state"][0]["momentum_buffer"])
    generator = want["optimizer"]["gradbal"]["generator"]
    assert torch.equal(ckpt["optimizer"]["gradbal"]["generator"], generator)
    assert ckpt["history"] == want["history"]
    return n


def main(path: Path, numel: int, log: Path | None = None) -> None:
    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if log else sys.stdout.fileno()
    n = 0
    if path.exists():
        n = check(torch.load(path, weights_only=True))
    while True:
        n += 1
        os.write(fd, f"begin {n}\n".encode())
        atomic_save(checkpoint(n, numel), path)
        os.write(fd, f"done {n}\n".encode())


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
