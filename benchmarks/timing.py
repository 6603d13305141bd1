"""GPU timing: CUDA events around each call, fresh inputs per call, median of many."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch


def median_ms(
    fn: Callable[..., object],
    input_sets: Sequence[tuple],
    repeats: int,
    warmup: int = 3,
) -> float:
    """Median milliseconds of `fn(*inputs)` over `repeats` calls.

    Calls rotate through `input_sets` so that no call finds its inputs in L2 from the
    previous one. Each call is bracketed by its own pair of CUDA events.
    """
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        inputs = input_sets[i % len(input_sets)]
        starts[i].record()
        fn(*inputs)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def peak_memory_mb(fn: Callable[..., object], inputs: tuple) -> float:
    """Peak GPU memory allocated during one call of `fn(*inputs)`, above what was held before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(*inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
