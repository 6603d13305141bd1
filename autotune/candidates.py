"""The schedule search space of one problem, and pruning by compilation (no GPU needed).

A candidate is one kernel's knob values; the kernels searched are the tunable ones the
call's plan launches (`sla_tl.plan.kernels_for`). Every candidate is compiled for the arch
before any trial is timed; one that fails to compile, spills registers (ptxas rejects
spills) or needs more shared memory than the arch gives a CTA is marked pruned, with the
reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from sla_tl import kernels
from sla_tl.kernels import KernelSpec
from sla_tl.parallel import map_in_parallel
from sla_tl.plan import kernels_for
from sla_tl.settings import Settings
from sla_tl.static_check import kernel_facts
from sla_tl.targets import arch_named


class Candidate(NamedTuple):
    """One kernel's knob values, and whether they compiled."""

    kernel: str
    knobs: dict
    pruned: str | None
    """Why the candidate cannot run (None if it compiled within the limits)."""

    @property
    def label(self) -> str:
        """The candidate's name as an Optuna categorical choice."""
        return label(self.knobs)


def label(knobs: dict) -> str:
    """A stable text form of knob values, e.g. "num_stages=2,q_slice=64"."""
    return ",".join(f"{name}={value}" for name, value in sorted(knobs.items()))


def kernels_searched(arch: str, dim: int, dtype: str, s: Settings,
                     backward: bool) -> tuple[str, ...]:
    """The tunable kernels the plan of a forward (and backward) call launches, in order,
    less those with no knob searched in the call's linear mode."""
    tunable = kernels.tunable(arch)
    launched = (spec.kind for spec in kernels_for(arch, dim, dtype, s, backward=backward))
    return tuple(kind for kind in dict.fromkeys(launched) if kind in tunable
                 and kernels.search_space(arch, kind, dim, s.block_q, s.block_kv, s.linear))


def enumerate_candidates(arch: str, kernel: str, dim: int, s: Settings) -> list[dict]:
    """Every combination of the kernel's searched knobs; the default combination first."""
    return kernels.searched_schedules(arch, kernel, dim, s.block_q, s.block_kv, s.linear)


def kernel_spec(kernel: str, knobs: dict, dim: int, dtype: str, s: Settings,
                arch: str) -> KernelSpec:
    """The kernel one candidate builds, as the call's plan launches it."""
    specs = kernels_for(arch, dim, dtype, s, schedule={kernel: knobs})
    return next(spec for spec in specs if spec.kind == kernel)


def _shared_bytes(spec: KernelSpec) -> int:
    """Compile one candidate (raising what the compiler raises) and return its shared memory."""
    return kernel_facts(spec).shared_bytes


def prune_reason(error: str | None, shared_bytes: int | None, limit: int) -> str | None:
    """Why a compile outcome rules a candidate out (None: it can run); `limit` is the shared
    memory a CTA may use."""
    if error is not None:
        if re.search(r"spill", error, re.IGNORECASE):
            return "spills registers"
        if re.search(r"shared memory|smem", error, re.IGNORECASE):
            return "overflows shared memory"
        return "fails to compile: " + error.strip().splitlines()[-1][:160]
    if shared_bytes is not None and shared_bytes > limit:
        return f"overflows shared memory ({shared_bytes} > {limit} bytes)"
    return None


def _compile_one(spec: KernelSpec) -> tuple[str | None, int | None]:
    try:
        return None, _shared_bytes(spec)
    except Exception as error:  # noqa: BLE001  (a failing candidate is data, not a crash)
        return f"{type(error).__name__}: {error}", None


Compiler = Callable[[KernelSpec], tuple[str | None, int | None]]
"""Compiles one spec: (error text or None, shared bytes or None). Module-level for pickling."""


def build_candidates(dim: int, dtype: str, s: Settings, arch: str, backward: bool,
                     compiler: Compiler = _compile_one,
                     workers: int | None = None, progress: bool = False) -> list[Candidate]:
    """Every candidate of every searched kernel, compiled in parallel and marked pruned
    where it cannot run (with `progress`, a line per candidate on stderr)."""
    pairs = [(kernel, knobs) for kernel in kernels_searched(arch, dim, dtype, s, backward)
             for knobs in enumerate_candidates(arch, kernel, dim, s)]
    specs = [kernel_spec(kernel, knobs, dim, dtype, s, arch) for kernel, knobs in pairs]
    outcomes = map_in_parallel(compiler, specs, workers, progress)
    by_spec = dict(zip(dict.fromkeys(specs), outcomes, strict=True))
    limit = arch_named(arch).shared_memory_bytes
    return [Candidate(kernel, knobs, prune_reason(*by_spec[spec], limit))
            for (kernel, knobs), spec in zip(pairs, specs, strict=True)]
