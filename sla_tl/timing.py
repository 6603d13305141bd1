"""GPU timing: CUDA events around each call, fresh inputs per call, median of many.

Two ways to time a call (`TIMINGS`):

- "call": each call's events bracket what a user waits for, including the host's work
  where the host, not the GPU, is the bottleneck (short sequences);
- "kernels": each call is captured once per input set in a CUDA graph and the graphs
  are replayed, so the events bracket GPU work alone. Host speed differs between machines
  that have the same GPU, so this is what a kernel regression gate compares.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

TIMINGS: tuple[str, ...] = ("call", "kernels")


def graphed(fn: Callable[..., object], input_sets: Sequence[tuple]) -> list[tuple]:
    """One CUDA graph of `fn(*inputs)` per input set, as argument tuples for timing
    `replay` (warmed up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for inputs in input_sets:
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for inputs in input_sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*inputs)
        graphs.append((graph,))
    return graphs


def replay(graph: torch.cuda.CUDAGraph) -> None:
    """Run a captured graph (the function timed in kernel timing)."""
    graph.replay()


def call_times_ms(
    fn: Callable[..., object],
    input_sets: Sequence[tuple],
    count: int,
    warmup: int = 0,
) -> list[float]:
    """Milliseconds of each of `count` calls of `fn(*inputs)`.

    Calls rotate through `input_sets` so that no call finds its inputs in L2 from the
    previous one. Each call is bracketed by its own pair of CUDA events.
    """
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    for i in range(count):
        inputs = input_sets[i % len(input_sets)]
        starts[i].record()
        fn(*inputs)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def median_ms(
    fn: Callable[..., object],
    input_sets: Sequence[tuple],
    repeats: int,
    warmup: int = 3,
) -> float:
    """Median milliseconds of `fn(*inputs)` over `repeats` calls (see `call_times_ms`)."""
    return statistics.median(call_times_ms(fn, input_sets, repeats, warmup))


def peak_memory_mb(fn: Callable[..., object], inputs: tuple) -> float:
    """Peak GPU memory allocated during one call of `fn(*inputs)`, above what was held before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(*inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
