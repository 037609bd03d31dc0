"""Test-wide setup. Triton kernels run under Triton's CPU interpreter when no GPU is present;
the variable must be set before any kernel module is imported, hence here, at collection."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
