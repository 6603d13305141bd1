"""Compiled kernels: what to build (`KernelSpec`), and building it once per process.

A kernel is a kind from its arch's kernel table (`sla_tl.schedules.<arch>`, see
`sla_tl.schedules.archs`) with its compile-time arguments and its schedule knobs: knobs
change speed only, never the numbers, and override the kernel's defaults. TileLang also
caches the binary on disk (`sla_tl.kernel_cache`). Which kernels a call runs, and in which
order, is its plan's business (`sla_tl.plan`).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import tilelang

from . import kernel_cache, targets
from .schedules import archs
from .schedules.archs import KernelDef
from .schedules.compile import compile_program

# TileLang logs every compile at INFO ("TileLang begins to compile kernel `main`"); sla-tl
# reports its own progress, so TileLang's lines show only when asked, through this variable
# (inherited by the compile worker processes).
TILELANG_LOG_VARIABLE = "SLA_TL_TILELANG_LOG"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _apply_tilelang_log_level() -> None:
    level = os.environ.get(TILELANG_LOG_VARIABLE, "WARNING").upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"{TILELANG_LOG_VARIABLE} must be one of {', '.join(_LOG_LEVELS)}; "
                         f"got {os.environ[TILELANG_LOG_VARIABLE]!r}")
    tilelang.set_log_level(level)


def show_tilelang_log() -> None:
    """Let TileLang's INFO lines through, in this process and the workers it starts."""
    os.environ[TILELANG_LOG_VARIABLE] = "INFO"
    _apply_tilelang_log_level()


_apply_tilelang_log_level()

Knobs = tuple[tuple[str, int | bool | str], ...]
"""Schedule knobs of one kernel, hashable: sorted (name, value) pairs."""

Schedule = Mapping[str, Mapping[str, int | bool | str]]
"""Schedule knobs of several kernels, by the tunable kernel's kind (`tunable`); absent ones
take their defaults."""


def freeze(knobs: Mapping[str, int | bool | str]) -> Knobs:
    """Hashable form of one kernel's knobs."""
    return tuple(sorted(knobs.items()))


def knobs_of(schedule: Schedule | None, kernel: str) -> Knobs:
    """One tunable kernel's knobs from a schedule (none: the kernel's defaults)."""
    return freeze((schedule or {}).get(kernel, {}))


class KernelSpec(NamedTuple):
    """One kernel to build."""

    kind: str
    """Its kind in the arch's kernel table, e.g. "forward" or "gated_forward"."""
    args: tuple[tuple[str, Any], ...]
    """Its compile-time arguments, (name, value) in a stable order."""
    arch: str
    """TileLang's arch, e.g. "sm_90a"."""
    knobs: Knobs = ()
    """Schedule knobs over the defaults (tunable kernels only)."""

    @property
    def name(self) -> str:
        """A stable, readable name, e.g. "forward:128,128,64,bfloat16,softmax,bhsd,sm_90a"
        (the static record's key; the softmax scale, which follows D, is left out). A flag
        is named with its value ("float_map=True"): two flags' values alone would not say
        which kernel it is."""
        values = [f"{name}={value}" if isinstance(value, bool) else value
                  for name, value in self.args if not isinstance(value, float)]
        values += [self.arch, *([self.knobs] if self.knobs else [])]
        return f"{self.kind}:" + ",".join(str(v) for v in values)

    def definition(self) -> KernelDef:
        """The arch's definition of this kind of kernel."""
        return targets.arch_named(self.arch).kernel(self.kind)

    def merged_knobs(self) -> dict:
        """Every schedule knob this kernel is built with (its defaults, then `knobs`)."""
        tuning = self.definition().tuning
        if tuning is None:
            if self.knobs:
                raise ValueError(f"{self.kind} has no schedule knobs; got {dict(self.knobs)}")
            return {}
        return archs.merged_knobs(self.kind, tuning, dict(self.args), dict(self.knobs))


@functools.cache
def compiled(spec: KernelSpec):
    """The compiled kernel of `spec`, built on first use and kept for the life of the process
    (ValueError for knobs the kernel does not take; what TileLang raises if it fails)."""
    definition = spec.definition()
    spec.merged_knobs()  # refuses knobs the kernel does not take, before anything is built
    knobs = {"knobs": dict(spec.knobs)} if definition.tuning is not None else {}
    program = definition.program(**dict(spec.args), **knobs)
    with kernel_cache.compiling_for(spec.arch):
        return compile_program(program, spec.arch, fast_arithmetic=definition.fast_arithmetic)


@functools.cache
def launcher(spec: KernelSpec) -> Callable[..., None]:
    """The entry function of `compiled(spec)`, called on every argument, outputs included
    (`compile_program` has TileLang allocate none). The host code TileLang generates checks
    each argument's shape, dtype and device and takes torch's current stream itself; the
    Python wrapper TileLang puts around it allocates outputs and otherwise passes the
    arguments on, at ~8 us a launch on the H200 machine's host (`host_time --profile`), so
    the plans call this instead."""
    kernel = compiled(spec)
    if kernel.adapter.result_idx:  # the wrapper would allocate these: not ours to skip
        raise ValueError(f"{spec.name}: kernels are compiled with no output of their own; "
                         f"this one has {kernel.adapter.result_idx}")
    return kernel.adapter.get_exportable_executable()["main"]


def _tuning(arch: str, kernel: str):
    tuning = targets.arch_named(arch).kernel(kernel).tuning
    if tuning is None:
        raise ValueError(f"{kernel} has no schedule knobs")
    return tuning


def default_knobs(arch: str, kernel: str, dim: int, block_q: int, block_kv: int) -> dict:
    """The knobs a tunable kernel is built with when nothing overrides them."""
    tuning = _tuning(arch, kernel)
    return tuning.default_schedule(**archs.sizes_for(
        tuning.default_schedule, dict(dim=dim, block_q=block_q, block_kv=block_kv)))


def search_space(arch: str, kernel: str, dim: int, block_q: int, block_kv: int,
                 linear: str = "marginal") -> dict[str, tuple]:
    """The autotuner's choices for each searched knob of a tunable kernel, for calls in the
    linear mode `linear`: a knob that changes speed only in one mode (the key pass's `group`
    sets the order of the global sum) is searched only there."""
    tuning = _tuning(arch, kernel)
    return tuning.search_space(**archs.sizes_for(
        tuning.search_space,
        dict(dim=dim, block_q=block_q, block_kv=block_kv, linear=linear)))


def searched_schedules(arch: str, kernel: str, dim: int, block_q: int, block_kv: int,
                       linear: str = "marginal") -> list[dict]:
    """Every combination of a tunable kernel's searched knobs (what the autotuner may pick
    in linear mode `linear`), the default combination first."""
    space = search_space(arch, kernel, dim, block_q, block_kv, linear)
    default = default_knobs(arch, kernel, dim, block_q, block_kv)
    names = sorted(space)
    combos = [dict(zip(names, values, strict=True))
              for values in itertools.product(*(space[n] for n in names))]
    first = {n: default[n] for n in names}
    return [first] + [c for c in combos if c != first]


def alternatives(arch: str, kernel: str, dim: int, block_q: int,
                 block_kv: int) -> list[dict]:
    """Schedules of a tunable kernel that compute the same function but round differently:
    timed by the benchmarks and checked by the GPU tests, never tuned (none if its module
    declares none)."""
    tuning = _tuning(arch, kernel)
    found = getattr(tuning, "alternatives", None)
    if found is None:
        return []
    return found(**archs.sizes_for(found, dict(dim=dim, block_q=block_q, block_kv=block_kv)))


def every_schedule(arch: str, kernel: str, dim: int, block_q: int,
                   block_kv: int) -> list[dict]:
    """`searched_schedules` (the default first), then the `alternatives`: every schedule the
    benchmarks time and the GPU tests check against float64."""
    return (searched_schedules(arch, kernel, dim, block_q, block_kv)
            + alternatives(arch, kernel, dim, block_q, block_kv))


def tunable(arch: str) -> tuple[str, ...]:
    """The kernels of an arch whose schedule knobs the autotuner searches."""
    return targets.arch_named(arch).tunable()
