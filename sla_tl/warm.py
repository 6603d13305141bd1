"""Compile ahead of time the kernels an attention call will use, in parallel processes.

TileLang caches every compiled kernel on disk, so a later process (or the first call of
this one) loads it in well under a second instead of compiling for tens of seconds.
No GPU is needed: kernels are compiled for the arch named.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from typing import NamedTuple

from . import kernels
from .settings import Settings


class KernelSpec(NamedTuple):
    """One kernel: the name of its getter in `sla_tl.kernels` and the getter's arguments."""

    getter: str
    args: tuple


def kernels_for_call(dim: int, dtype: str, s: Settings, arch: str,
                     backward: bool = True) -> list[KernelSpec]:
    """Every kernel that routing, the forward and (optionally) the backward of one call use."""
    scale = float(dim**-0.5 if s.scale is None else s.scale)
    specs = [
        KernelSpec("pool_kernel", (dim, s.block_q, dtype, s.layout, arch)),
        KernelSpec("pool_kernel", (dim, s.block_kv, dtype, s.layout, arch)),
        KernelSpec("key_pass_kernel", (dim, s.block_kv, dtype, s.feature_map, s.layout,
                                       s.linear == "marginal", arch)),
        KernelSpec("forward_kernel", (dim, s.block_q, s.block_kv, dtype, s.feature_map,
                                      s.linear, s.layout, scale, arch)),
    ]
    if backward:
        specs += [
            KernelSpec("backward_query_kernel", (dim, s.block_q, dtype, s.feature_map, s.layout,
                                                 arch)),
            KernelSpec("backward_dq_kernel", (dim, s.block_q, s.block_kv, dtype, s.layout, scale,
                                              arch)),
            KernelSpec("backward_dkdv_kernel", (dim, s.block_q, s.block_kv, dtype, s.feature_map,
                                                s.linear, s.layout, scale, arch)),
        ]
    return specs


def _compile(spec: KernelSpec) -> str | None:
    """Compile one kernel; its error as text (TileLang's errors do not pickle), or None."""
    try:
        getattr(kernels, spec.getter)(*spec.args)
    except Exception as error:  # noqa: BLE001  (reported to the parent, which raises)
        return f"{spec}: {type(error).__name__}: {error}"
    return None


def compile_in_parallel(specs: list[KernelSpec], workers: int | None = None) -> None:
    """Compile each distinct spec once, `workers` processes at a time (default: all cores).

    Raises RuntimeError listing every kernel that failed to compile.
    """
    unique = list(dict.fromkeys(specs))
    workers = min(workers or os.cpu_count() or 1, len(unique))
    if workers <= 1:
        errors = [_compile(spec) for spec in unique]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            errors = list(pool.map(_compile, unique))
    failed = [e for e in errors if e]
    if failed:
        raise RuntimeError("kernels failed to compile:\n" + "\n".join(failed))
