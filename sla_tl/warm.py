"""Compile ahead of time the kernels an attention call will use, in parallel processes.

TileLang caches every compiled kernel on disk, so a later process (or the first call of
this one) loads it in well under a second instead of compiling for tens of seconds.
No GPU is needed: kernels are compiled for the arch named.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
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


def _compile(spec: KernelSpec) -> None:
    getattr(kernels, spec.getter)(*spec.args)


def _guarded(task: tuple[Callable[[KernelSpec], T], KernelSpec]) -> tuple[T | None, str | None]:
    """Run one task; its error as text (TileLang's errors do not pickle)."""
    fn, spec = task
    try:
        return fn(spec), None
    except Exception as error:  # noqa: BLE001  (reported to the parent, which raises)
        return None, f"{spec}: {type(error).__name__}: {error}"


def map_in_parallel(fn: Callable[[KernelSpec], T], specs: list[KernelSpec],
                    workers: int | None = None) -> list[T]:
    """`fn` over the distinct specs, `workers` processes at a time (default: all cores).

    `fn` must be a module-level function. Raises RuntimeError listing every failure.
    """
    unique = list(dict.fromkeys(specs))
    workers = min(workers or os.cpu_count() or 1, len(unique))
    tasks = [(fn, spec) for spec in unique]
    if workers <= 1:
        results = [_guarded(task) for task in tasks]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(_guarded, tasks))
    failed = [error for _, error in results if error]
    if failed:
        raise RuntimeError("kernels failed:\n" + "\n".join(failed))
    return [value for value, _ in results]


def compile_in_parallel(specs: list[KernelSpec], workers: int | None = None) -> None:
    """Compile each distinct spec once, in parallel processes (see `map_in_parallel`)."""
    map_in_parallel(_compile, specs, workers)
