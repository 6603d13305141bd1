"""Work over many kernels in parallel processes: compiling them ahead of time, or reading
their static facts.

TileLang caches every compiled kernel on disk (`sla_tl.kernel_cache`), so a later process
(or the first call of this one) loads it in well under a second instead of compiling for
tens of seconds. No GPU is needed: kernels are compiled for the arch they name.
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
from .kernels import KernelSpec

T = TypeVar("T")


def _compile(spec: KernelSpec) -> None:
    kernels.compiled(spec)


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
        return _Outcome(None, f"{spec.name}: {type(error).__name__}: {error}",
                        time.perf_counter() - start)


def _report(done: int, total: int, spec: KernelSpec, outcome: _Outcome) -> None:
    status = "failed" if outcome.error else f"{outcome.seconds:.1f} s"
    print(f"[{done}/{total}] {spec.name}  {status}", file=sys.stderr, flush=True)


def map_in_parallel(fn: Callable[[KernelSpec], T], specs: list[KernelSpec],
                    workers: int | None = None, progress: bool = False) -> list[T]:
    """`fn` over the distinct specs, `workers` processes at a time (default: all cores), the
    results in the specs' order; with `progress`, one line on stderr per kernel as it
    finishes ("[n/N] name  seconds", the time a cached kernel takes to load included).

    With one worker it runs in this process. `fn` must be a module-level function. Raises
    RuntimeError listing every failure.
    """
    results = _outcomes(fn, specs, workers, progress)
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError("kernels failed:\n" + "\n".join(failed))
    return [r.value for r in results]


def _outcomes(fn: Callable[[KernelSpec], T], specs: list[KernelSpec], workers: int | None,
              progress: bool) -> list[_Outcome]:
    unique = list(dict.fromkeys(specs))
    workers = max(1, min(workers or os.cpu_count() or 1, len(unique)))
    tasks = [(fn, spec) for spec in unique]
    outcomes: dict[int, _Outcome] = {}
    if workers == 1:
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
    return [outcomes[index] for index in range(len(tasks))]


def compile_in_parallel(specs: list[KernelSpec], workers: int | None = None,
                        progress: bool = False) -> None:
    """Compile each distinct spec once, in parallel processes (see `map_in_parallel`), into
    the kernel cache of its arch."""
    map_in_parallel(_compile, specs, workers, progress)


def compile_ahead(specs: list[KernelSpec], workers: int | None = None,
                  progress: bool = False) -> list[str]:
    """Compile each distinct spec once in parallel, as `compile_in_parallel`, but return the
    failures (as text) instead of raising: for warming the cache ahead of calls that will
    each report their own kernel's failure when they build it (the GPU tests' modules)."""
    return [r.error for r in _outcomes(_compile, specs, workers, progress) if r.error]
