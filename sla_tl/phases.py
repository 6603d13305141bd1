"""A plan's phases: ordered steps (kernel launches or groups of torch ops) over named tensors,
with the buffers they allocate.

A phase (`Phase`) is an ordered list of steps (`Step`), each one kernel launch (a
`KernelSpec`: kind, compile arguments and schedule knobs) or one group of torch ops, naming
the tensors it reads, the buffers it fills in place and the tensors it makes. The buffers a
phase allocates are declared with their shapes; each is allocated right before the first
step that fills it and dropped after the last step that reads it (so, e.g., the backward's
dK and dV are not allocated until the query blocks' states are gone). The compiled kernels
are fetched on a phase's first run and kept with it. What a call's phases are:
`sla_tl.plan`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import torch

from . import kernels
from .kernels import KernelSpec


class Buffer(NamedTuple):
    """A tensor a phase allocates."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class Step(NamedTuple):
    """One step of a phase: a kernel launch, or a group of torch ops."""

    name: str
    kernel: KernelSpec | None
    """The kernel launched (None: `function` runs)."""
    function: Callable[..., object] | None
    """Torch ops: called with the tensors of `reads` then `fills`; returns those of `makes`
    (one tensor, or a tuple for several)."""
    reads: tuple[str, ...]
    fills: tuple[str, ...] = ()
    """Buffers the step writes in place (a kernel's outputs come last in its arguments)."""
    makes: tuple[str, ...] = ()
    """Tensors a torch step returns."""


def kernel_step(name: str, spec: KernelSpec, reads: Sequence[str],
                fills: Sequence[str]) -> Step:
    """A step launching `spec` on `reads` then `fills` (its arguments, in order)."""
    return Step(name, spec, None, tuple(reads), tuple(fills))


def torch_step(name: str, function: Callable[..., object], reads: Sequence[str],
               fills: Sequence[str] = (), makes: Sequence[str] = ()) -> Step:
    """A step running torch ops."""
    return Step(name, None, function, tuple(reads), tuple(fills), tuple(makes))


Launcher = Callable[[Step, list], None]
"""Runs one kernel step on its argument tensors."""

Watcher = Callable[[Step], contextlib.AbstractContextManager]
"""A context around each step (a dry run attributes what it sees to the step)."""


class Phase:
    """An ordered list of steps with the buffers it allocates (see the module docstring)."""

    def __init__(self, name: str, inputs: Sequence[str], outputs: Sequence[str],
                 steps: Sequence[Step], buffers: Mapping[str, Buffer]) -> None:
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.steps = tuple(steps)
        self.buffers = dict(buffers)
        self._released = _released_after(self.steps, self.outputs)
        self._compiled: list = [None] * len(self.steps)
        missing = {f for s in self.steps for f in s.fills} - set(self.buffers)
        if missing:
            raise ValueError(f"{name}: buffers without a shape: {sorted(missing)}")

    def kernels(self) -> list[KernelSpec]:
        """The kernels this phase launches, in order."""
        return [s.kernel for s in self.steps if s.kernel is not None]

    def step(self, name: str) -> Step:
        """The step called `name`."""
        return next(s for s in self.steps if s.name == name)

    def _launch(self, index: int, args: list) -> None:
        """Launch the kernel of step `index`, compiled on first use (its entry function
        kept with the phase, `kernels.launcher`)."""
        kernel = self._compiled[index]
        if kernel is None:
            kernel = self._compiled[index] = kernels.launcher(self.steps[index].kernel)
        kernel(*args)

    def run(self, tensors: Mapping[str, torch.Tensor], device: torch.device,
            launch: Launcher | None = None, keep: bool = False,
            only: Collection[str] | None = None,
            watch: Watcher | None = None) -> dict[str, torch.Tensor]:
        """Run every step on `tensors` (the inputs, and any buffer given instead of being
        allocated, e.g. outputs poisoned by a test). Returns the outputs, or with `keep`
        every tensor the phase saw. `launch` replaces the kernel launches and `watch` wraps
        each step (a dry run); `only` names the steps to run (with `keep`: a test of one
        kernel on its own). Autocast is off while it runs: each step computes in the dtypes
        the plan gives it."""
        if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            # Re-entered with autocast off, so the common call pays no Python call for it
            # (a dry run's device has no autocast).
            with torch.autocast(device.type, enabled=False):
                return self.run(tensors, device, launch, keep, only, watch)
        env = dict(tensors)
        for index, step in enumerate(self.steps):
            if only is not None and step.name not in only:
                continue
            if watch is not None:
                with watch(step):
                    self._run_step(index, step, env, device, launch)
            else:
                self._run_step(index, step, env, device, launch)
            if not keep:
                for name in self._released[index]:
                    env.pop(name, None)
        return env if keep else {name: env[name] for name in self.outputs}

    def _run_step(self, index: int, step: Step, env: dict, device: torch.device,
                  launch: Launcher | None) -> None:
        for name in step.fills:
            if name not in env:
                buffer = self.buffers[name]
                env[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
        args = [env[name] for name in step.reads]
        args += [env[name] for name in step.fills]
        if step.kernel is None:
            made = step.function(*args)
            if len(step.makes) == 1:
                env[step.makes[0]] = made
            elif step.makes:
                env.update(zip(step.makes, made, strict=True))
        elif launch is None:
            self._launch(index, args)
        else:
            launch(step, args)

    def run_step(self, name: str, env: Mapping[str, torch.Tensor],
                 launch: Launcher | None = None) -> object:
        """Run one step on the tensors of a kept run (`run(..., keep=True)`), e.g. to time
        it alone; returns what a torch step makes."""
        index = next(i for i, s in enumerate(self.steps) if s.name == name)
        step = self.steps[index]
        args = [env[n] for n in step.reads] + [env[n] for n in step.fills]
        if step.kernel is None:
            return step.function(*args)
        if launch is None:
            return self._launch(index, args)
        return launch(step, args)


def _released_after(steps: Sequence[Step], outputs: Sequence[str]) -> list[tuple[str, ...]]:
    """Per step, the tensors no later step reads (and that are not outputs): dropped after it."""
    last: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in (*step.reads, *step.fills, *step.makes):
            last[name] = index
    released: list[list[str]] = [[] for _ in steps]
    for name, index in last.items():
        if name not in outputs:
            released[index].append(name)
    return [tuple(names) for names in released]
