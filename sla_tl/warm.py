"""Compile ahead of time the kernels an attention call will use, in parallel processes.

TileLang caches every compiled kernel on disk, so a later process (or the first call of
this one) loads it in well under a second instead of compiling for tens of seconds.
No GPU is needed: kernels are compiled for the arch named.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from . import kernels
from .settings import Settings

T = TypeVar("T")


class KernelSpec(NamedTuple):
    """One kernel: the name of its getter in `sla_tl.kernels` and the getter's arguments."""

    getter: str
    args: tuple


def kernels_for_call(dim: int, dtype: str, s: Settings, arch: str, backward: bool = True,
                     schedule: kernels.Schedule | None = None,
                     gated: bool = False) -> list[KernelSpec]:
    """Every kernel that routing, the forward and (optionally) the backward of one call use,
    with `schedule`'s knobs where it sets any; `gated`: of a call with a gate."""
    scale = float(dim**-0.5 if s.scale is None else s.scale)
    variant = "gated_" if gated else ""

    def tuned(kernel: str, args: tuple, prefix: str = "") -> KernelSpec:
        knobs = kernels.knobs_of(schedule, kernel)
        return KernelSpec(f"{prefix}{kernel}_kernel", (*args, knobs) if knobs else args)

    specs = [
        KernelSpec("pool_kernel", (dim, s.block_q, dtype, s.layout, arch)),
        KernelSpec("pool_kernel", (dim, s.block_kv, dtype, s.layout, arch)),
        tuned("key_pass", (dim, s.block_kv, dtype, s.feature_map, s.layout,
                           s.linear == "marginal", arch)),
        tuned("forward", (dim, s.block_q, s.block_kv, dtype, s.feature_map, s.layout, scale,
                          arch), variant),
    ]
    if backward:
        specs += [
            KernelSpec(f"{variant}backward_query_kernel", (dim, s.block_q, dtype, s.feature_map,
                                                           s.layout, arch)),
            tuned("backward_dq", (dim, s.block_q, s.block_kv, dtype, s.layout, scale, arch)),
            tuned("backward_dkdv", (dim, s.block_q, s.block_kv, dtype, s.feature_map, s.layout,
                                    scale, arch)),
        ]
    return specs


def kernel_name(spec: KernelSpec) -> str:
    """A stable, readable name for a kernel spec, e.g. "forward:128,128,64,bfloat16,softmax,
    bhsd,sm_90a" (the static check's record key; the softmax scale, which follows D, is left
    out)."""
    args = [a for a in spec.args if not isinstance(a, float)]
    return spec.getter.removesuffix("_kernel") + ":" + ",".join(str(a) for a in args)


def _compile(spec: KernelSpec) -> None:
    getattr(kernels, spec.getter)(*spec.args)


class _Outcome(NamedTuple):
    value: object
    error: str | None
    seconds: float


def _guarded(task: tuple[Callable[[KernelSpec], T], KernelSpec]) -> _Outcome:
    """Run one task, timed; its error as text (TileLang's errors do not pickle)."""
    fn, spec = task
    start = time.perf_counter()
    try:
        return _Outcome(fn(spec), None, time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001  (reported to the parent, which raises)
        return _Outcome(None, f"{spec}: {type(error).__name__}: {error}",
                        time.perf_counter() - start)


def _report(done: int, total: int, spec: KernelSpec, outcome: _Outcome) -> None:
    status = "failed" if outcome.error else f"{outcome.seconds:.1f} s"
    print(f"[{done}/{total}] {kernel_name(spec)}  {status}", file=sys.stderr, flush=True)


def map_in_parallel(fn: Callable[[KernelSpec], T], specs: list[KernelSpec],
                    workers: int | None = None, progress: bool = False,
                    fresh: bool = False) -> list[T]:
    """`fn` over the distinct specs, `workers` processes at a time (default: all cores), the
    results in the specs' order; with `progress`, one line on stderr per kernel as it
    finishes ("[n/N] name  seconds", the time a cached kernel takes to load included).

    With one worker it runs in this process, unless `fresh`: then always in new processes,
    which see only the disk cache of the current `TILELANG_CACHE_DIR` (this process's
    in-memory caches would serve a kernel compiled for another directory without writing
    it to this one). `fn` must be a module-level function. Raises RuntimeError listing
    every failure.
    """
    unique = list(dict.fromkeys(specs))
    workers = max(1, min(workers or os.cpu_count() or 1, len(unique)))
    tasks = [(fn, spec) for spec in unique]
    outcomes: dict[int, _Outcome] = {}
    if workers == 1 and not fresh:
        for index, task in enumerate(tasks):
            outcomes[index] = _guarded(task)
            if progress:
                _report(len(outcomes), len(tasks), task[1], outcomes[index])
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(_guarded, task): index for index, task in enumerate(tasks)}
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                outcomes[index] = future.result()
                if progress:
                    _report(len(outcomes), len(tasks), unique[index], outcomes[index])
    results = [outcomes[index] for index in range(len(tasks))]
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError("kernels failed:\n" + "\n".join(failed))
    return [r.value for r in results]


def compile_in_parallel(specs: list[KernelSpec], workers: int | None = None,
                        progress: bool = False, fresh: bool = False) -> None:
    """Compile each distinct spec once, in parallel processes (see `map_in_parallel`)."""
    map_in_parallel(_compile, specs, workers, progress, fresh)
