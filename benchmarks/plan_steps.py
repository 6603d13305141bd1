"""Timing a plan's steps one by one, on the tensors of a kept run (the breakdowns)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sla_tl.plan import Phase
from sla_tl.timing import median_ms


def kept_runs(phase: Phase, inputs: Sequence[Mapping[str, torch.Tensor]],
              device: torch.device) -> list[dict[str, torch.Tensor]]:
    """One run of `phase` per input set, keeping every tensor it made (the steps' inputs)."""
    return [phase.run(tensors, device, keep=True) for tensors in inputs]


def step_times_ms(phase: Phase, runs: Sequence[Mapping[str, torch.Tensor]],
                  repeats: int) -> dict[str, float]:
    """Median milliseconds of each step of `phase` alone, rotating through `runs` (see
    `kept_runs`), by step name, in the plan's order."""
    return {step.name: median_ms(lambda env, name=step.name: phase.run_step(name, env),
                                 [(env,) for env in runs], repeats)
            for step in phase.steps}
