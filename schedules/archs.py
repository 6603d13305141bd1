"""The arch registry: what each kernel folder `schedules/<arch>/` declares, and finding it.

An arch is a package of this folder (found by looking: every subpackage is one) whose
`__init__.py` declares `ARCH`, an `Arch`: its TileLang target, the compute capabilities it
serves, the spellings users may give, its shared memory per CTA, the block sizes its
kernels are built for and its kernel table. Adding an arch is its folder, plus its package
in pyproject.toml's `packages` so that it ships (tests/test_packaging.py holds the two
together). An arch whose table is empty is known but refused wherever it is named, and a
kernel a table lacks is refused by the plan that needs it, each with an error naming it.

Nothing here imports TileLang or the rest of sla_tl; the arch packages (their kernels) are
imported on first use.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple


class KernelDef(NamedTuple):
    """One kind of kernel an arch builds.

    `program` takes the kernel's compile-time arguments and its schedule knobs by name and
    returns the TileLang program. `tuning` is the module that says which knobs it has:
    `default_schedule`, `search_space` and optionally `alternatives`, each taking sizes named
    as the compile arguments (`dim`, `block_q`, `block_kv`); None for a kernel without knobs.
    `tuned_as` names the kernel whose knobs it takes (a gated variant takes its plain
    kernel's), default its own kind.
    """

    program: Callable[..., Any]
    tuning: ModuleType | None = None
    tuned_as: str | None = None
    fast_arithmetic: bool = True
    """Compiled with flush-to-zero (see `schedules.compile`)."""
    limits: Mapping[str, int] = {}
    """Sizes the kernel cannot exceed at run time, by name (e.g. "key_blocks")."""


class Arch(NamedTuple):
    """What one kernel folder declares (its package's `ARCH`)."""

    name: str
    """The folder's name, e.g. "sm90"."""
    target: str
    """TileLang's arch, e.g. "sm_90a"."""
    spellings: tuple[str, ...]
    """The names users may give for it (commands and entry points)."""
    capabilities: tuple[tuple[int, int], ...]
    """The CUDA compute capabilities whose GPUs run these kernels."""
    shared_memory_bytes: int
    """Shared memory one CTA may use."""
    block_q: tuple[int, ...]
    block_kv: tuple[int, ...]
    """The block sizes the kernels are built for."""
    kernels: Mapping[str, KernelDef]
    """The kernel table: kind -> definition."""

    def __hash__(self) -> int:
        # Its kernel table is a dict; an arch is one folder, known by its name.
        return hash(self.name)

    def kernel(self, kind: str) -> KernelDef:
        """The definition of one kind of kernel; NotImplementedError naming the arch when it
        has none (an arch folder without that kernel)."""
        found = self.kernels.get(kind)
        if found is None:
            have = ", ".join(self.kernels) or "none"
            raise NotImplementedError(f"arch {self.name} ({self.target}) has no {kind} kernel "
                                      f"(its kernels: {have})")
        return found

    def tunable(self) -> tuple[str, ...]:
        """The kinds whose knobs are tuned in their own name (gated variants excluded)."""
        return tuple(kind for kind, d in self.kernels.items()
                     if d.tuning is not None and (d.tuned_as or kind) == kind)


def arch_packages() -> tuple[str, ...]:
    """The kernel folders of this directory (its subpackages), by name."""
    here = importlib.import_module(__package__)
    return tuple(sorted(found.name for found in pkgutil.iter_modules(here.__path__)
                        if found.ispkg))


def _load(package: str) -> Arch:
    module = importlib.import_module(f"{__package__}.{package}")
    arch = getattr(module, "ARCH", None)
    if not isinstance(arch, Arch):
        raise NotImplementedError(f"the kernel folder {package} declares no ARCH (a "
                                  f"schedules.archs.Arch in its __init__.py)")
    return arch


@functools.cache
def all_archs() -> tuple[Arch, ...]:
    """Every arch a kernel folder declares, those without kernels too."""
    return tuple(_load(package) for package in arch_packages())


def with_kernels() -> tuple[Arch, ...]:
    """The archs whose kernel tables are not empty: those a call may use."""
    return tuple(arch for arch in all_archs() if arch.kernels)


def spellings() -> tuple[str, ...]:
    """Every name an arch with kernels may be given by."""
    return tuple(name for arch in with_kernels() for name in arch.spellings)


def named(name: object) -> Arch | None:
    """The arch a user's name (e.g. "sm90", "sm_90" or "sm_90a") stands for, if a kernel
    folder declares it (with kernels or not)."""
    return next((arch for arch in all_archs() if name in arch.spellings), None)


def for_capability(capability: tuple[int, int]) -> Arch | None:
    """The arch with kernels that run on GPUs of a compute capability, if any."""
    return next((arch for arch in with_kernels() if capability in arch.capabilities), None)


def sizes_for(function: Callable[..., Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of a tuning function (`default_schedule`, ...), taken by name from a
    kernel's compile-time arguments."""
    return {name: args[name] for name in inspect.signature(function).parameters}


def merged_knobs(kind: str, tuning: ModuleType, args: Mapping[str, Any],
                 knobs: Mapping[str, Any]) -> dict[str, Any]:
    """A kernel's default knobs for its sizes (`tuning.default_schedule`) with `knobs` over
    them; ValueError naming the kernel for a knob it does not have."""
    merged = tuning.default_schedule(**sizes_for(tuning.default_schedule, args))
    unknown = set(knobs) - set(merged)
    if unknown:
        raise ValueError(f"unknown schedule knobs for {kind}: {sorted(unknown)}")
    merged.update(knobs)
    return merged
