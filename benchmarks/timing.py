"""GPU timing: CUDA events around each call, fresh inputs per call, median of many.

Two ways to time a call:

- as called (`queue_ahead_s=0`): each call's events bracket what a user waits for,
  including the host's work where the host, not the GPU, is the bottleneck;
- kernels only (`queue_ahead_s>0`): the GPU first sleeps while the host queues every call,
  so the events bracket GPU work alone. A host slower than the GPU (short sequences)
  cannot show in the time; this is what a kernel regression gate compares, since host
  speed differs between machines that have the same GPU.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence

import torch

# "call": as called; "kernels": GPU work alone, the host queued ahead.
TIMINGS: tuple[str, ...] = ("call", "kernels")


class HostFellBehindError(RuntimeError):
    """The GPU caught up with the host and waited for it between calls (the times would
    hold host work); a longer queue-ahead, or a call that synchronises, is the cause."""


# Kernel timing fails when the GPU waited for the host this share of the time it worked.
IDLE_SHARE_ALLOWED = 0.02


@functools.cache
def _sleep_cycles_per_second(device: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 50_000_000
    torch.cuda._sleep(cycles)  # first launch outside the timing
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def gpu_sleep(seconds: float) -> None:
    """Keep the current stream busy for about `seconds`."""
    rate = _sleep_cycles_per_second(torch.cuda.current_device())
    torch.cuda._sleep(int(rate * seconds))


def median_ms(
    fn: Callable[..., object],
    input_sets: Sequence[tuple],
    repeats: int,
    warmup: int = 3,
    queue_ahead_s: float = 0.0,
) -> float:
    """Median milliseconds of `fn(*inputs)` over `repeats` calls.

    Calls rotate through `input_sets` so that no call finds its inputs in L2 from the
    previous one. Each call is bracketed by its own pair of CUDA events. With
    `queue_ahead_s`, the GPU sleeps that long first so the host queues the calls ahead
    (kernel time only); HostFellBehindError if the GPU still waited for the host between
    calls (the gap between one call's end event and the next call's start event).
    """
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    if queue_ahead_s > 0:
        gpu_sleep(queue_ahead_s)
    for i in range(repeats):
        inputs = input_sets[i % len(input_sets)]
        starts[i].record()
        fn(*inputs)
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    if queue_ahead_s > 0:
        idle = sum(e.elapsed_time(s) for e, s in zip(ends, starts[1:], strict=False))
        if idle > IDLE_SHARE_ALLOWED * sum(times):
            raise HostFellBehindError(f"the GPU waited {idle:.2f} ms for the host over "
                                      f"{repeats} calls ({queue_ahead_s:.3f} s queued ahead)")
    return statistics.median(times)


def peak_memory_mb(fn: Callable[..., object], inputs: tuple) -> float:
    """Peak GPU memory allocated during one call of `fn(*inputs)`, above what was held before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(*inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
