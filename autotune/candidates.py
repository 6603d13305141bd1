"""The schedule search space of one problem, and pruning by compilation (no GPU needed).

A candidate is one kernel's knob values. Every candidate is compiled for the arch before
any trial is timed; one that fails to compile, spills registers (ptxas rejects spills) or
needs more shared memory than an SM has is marked pruned, with the reason.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import NamedTuple

from sla_tl import kernels
from sla_tl.settings import Settings
from sla_tl.static_check import kernel_facts
from sla_tl.warm import KernelSpec, kernels_for_call, map_in_parallel

# Hopper: 227 KB of shared memory per block.
SHARED_MEMORY_LIMIT = 227 * 1024


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


def kernels_searched(backward: bool) -> tuple[str, ...]:
    """The tunable kernels a forward (and backward) call runs."""
    forward_only = ("key_pass", "forward")
    return kernels.TUNABLE if backward else forward_only


def enumerate_candidates(kernel: str, dim: int, s: Settings) -> list[dict]:
    """Every combination of the kernel's searched knobs; the default combination first."""
    space = kernels.search_space(kernel, dim, s.block_q, s.block_kv)
    default = kernels.default_knobs(kernel, dim, s.block_q, s.block_kv)
    names = sorted(space)
    combos = [dict(zip(names, values, strict=True))
              for values in itertools.product(*(space[n] for n in names))]
    first = {n: default[n] for n in names}
    return [first] + [c for c in combos if c != first]


def kernel_spec(kernel: str, knobs: dict, dim: int, dtype: str, s: Settings,
                arch: str) -> KernelSpec:
    """The getter call that builds one candidate."""
    specs = kernels_for_call(dim, dtype, s, arch, schedule={kernel: knobs})
    return next(spec for spec in specs if spec.getter == f"{kernel}_kernel")


def _shared_bytes(spec: KernelSpec) -> int:
    """Compile one candidate (raising what the compiler raises) and return its shared memory."""
    return kernel_facts(spec).shared_bytes


def prune_reason(error: str | None, shared_bytes: int | None) -> str | None:
    """Why a compile outcome rules a candidate out (None: it can run)."""
    if error is not None:
        if re.search(r"spill", error, re.IGNORECASE):
            return "spills registers"
        if re.search(r"shared memory|smem", error, re.IGNORECASE):
            return "overflows shared memory"
        return "fails to compile: " + error.strip().splitlines()[-1][:160]
    if shared_bytes is not None and shared_bytes > SHARED_MEMORY_LIMIT:
        return f"overflows shared memory ({shared_bytes} > {SHARED_MEMORY_LIMIT} bytes)"
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
    pairs = [(kernel, knobs) for kernel in kernels_searched(backward)
             for knobs in enumerate_candidates(kernel, dim, s)]
    specs = [kernel_spec(kernel, knobs, dim, dtype, s, arch) for kernel, knobs in pairs]
    outcomes = map_in_parallel(compiler, specs, workers, progress)
    by_spec = dict(zip(dict.fromkeys(specs), outcomes, strict=True))
    return [Candidate(kernel, knobs, prune_reason(*by_spec[spec]))
            for (kernel, knobs), spec in zip(pairs, specs, strict=True)]
