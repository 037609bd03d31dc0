"""Timing shared by the benchmark scripts (bench_kernels.py, bench_aggregate.py).

``time_ms`` runs ``fn`` ``warmup`` times untimed, then ``reps`` timed times and returns the
per-call milliseconds: CUDA events around each call on a GPU (optionally with the L2 cache
flushed before every repetition, so a memory-bound op reads from HBM each time), perf_counter
on CPU. ``interleaved_ms`` times several functions round-robin (for ratios). ``quantiles`` turns
times into (median, p20, p80). ``host_syncs`` says whether a CUDA call synchronised with the
host.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["Timer", "host_syncs", "interleaved_ms", "quantiles", "time_ms"]

# Larger than any current L2 (H100: 50 MB, H200: 60 MB).
_FLUSH_BYTES = 256 * 2**20


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    reps: int,
    warmup: int,
    flush: torch.Tensor | None = None,
) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed calls.

    On CUDA each call is timed by a pair of events (the GPU time of the work it queued, the
    host waiting on the end event); ``flush`` (a CUDA byte buffer) is zeroed before each call,
    outside the timed region. On CPU: wall time by perf_counter."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            if flush is not None:
                flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_ms(
    fns: list[Callable[[], object]], device: torch.device, reps: int, warmup: int
) -> list[list[float]]:
    """Per-call milliseconds of each of ``fns``, timed round-robin (``fns[0]``, ``fns[1]``,
    ..., then again ``reps`` times) after ``warmup`` untimed calls of each: a ratio of two
    timings taken minutes apart carries the drift of a shared machine's load, one of
    timings taken side by side does not."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, acc in zip(fns, times):
            acc += time_ms(fn, device, 1, 0)
    return times


class Timer:
    """``time_ms`` with fixed device, repetitions and warm-up; ``flush_l2`` allocates the flush
    buffer once (CUDA only)."""

    def __init__(self, device: torch.device, reps: int, warmup: int, flush_l2: bool = False):
        self.device, self.reps, self.warmup = torch.device(device), reps, warmup
        self.flush = None
        if flush_l2 and self.device.type == "cuda":
            self.flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=self.device)

    def __call__(self, fn: Callable[[], object], reps: int | None = None) -> list[float]:
        return time_ms(fn, self.device, reps or self.reps, self.warmup, self.flush)


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in the same unit (inclusive quantiles; one sample is all three)."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def host_syncs(fn: Callable[[], object], device: torch.device) -> str:
    """'yes' if fn synchronises with the host (CUDA sync debug mode), 'no', or 'n/a' on CPU."""
    if torch.device(device).type != "cuda":
        return "n/a"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "no"
    except RuntimeError:
        return "yes"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def write_csv(path: str, fields: list[str], rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the keys ``fields``) to the CSV file ``path``, making its
    folder; says how many rows went where."""
    import csv
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")


def graph_ms(fn: Callable[[], object], device: torch.device, reps: int, calls: int) -> list[float] | None:
    """Milliseconds per call of ``fn`` when ``calls`` calls are captured back to back in one
    CUDA graph and each of ``reps`` replays is timed by events (``elapsed / calls``); None
    when the capture fails (the caller then times eager calls).

    Why: a call whose GPU work is shorter than its host-side launch path (a Triton launch from
    Python is tens of microseconds) is timed by events as the host's time, not the kernel's;
    replaying a graph launches all of them at once. ``fn`` must have run before (compiled,
    allocator warmed), outside the capture."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError:
        return None
    times = time_ms(graph.replay, device, reps, 1)
    del graph
    return [t / calls for t in times]
