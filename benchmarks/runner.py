"""The measuring loop of `sla-tl bench`: every system on every case, speedups from one run.

Cases are grouped by shape and mode. A group draws its random inputs once (three sets,
so no call finds its inputs in L2 from the previous one), prepares the dense systems once
(sparsity does not change them) and every sparse system at each sparsity, then times
them in interleaved rounds, so that a drift of the GPU's clocks or temperature during
the group reaches every system alike. Speedups are against cuDNN in the same group.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sla_tl.timing import call_times_ms, graphed, peak_memory_mb, replay

from .suite import MODES, Case, Shape
from .systems import DENSE, REFERENCE_SYSTEM, SYSTEMS

INPUT_SETS = 3
ROUNDS = 5


@dataclass(frozen=True)
class Measurement:
    """One system timed in one mode on one case (for a dense system, on its shape)."""

    case: Case
    system: str
    mode: str


def plan(cases: list[Case], systems: Sequence[str],
         modes: Sequence[str]) -> list[list[Measurement]]:
    """Measurements grouped by (shape, mode): the reference first, the other dense systems
    once per group, then each sparse system at each of the shape's sparsities."""
    shapes = list(dict.fromkeys(case.shape for case in cases))
    ordered = sorted(systems, key=lambda s: (s != REFERENCE_SYSTEM, s not in DENSE))
    groups = []
    for shape in shapes:
        of_shape = [case for case in cases if case.shape == shape]
        for mode in modes:
            group = [Measurement(of_shape[0], s, mode) for s in ordered if s in DENSE]
            group += [Measurement(case, s, mode) for case in of_shape for s in ordered
                      if s not in DENSE]
            groups.append(group)
    return groups


def case_fields(m: Measurement) -> dict:
    """The row fields that say what was measured."""
    shape, dense = m.case.shape, m.system in DENSE
    return dict(
        shape=shape.label, batch=shape.batch, heads=shape.heads, length=shape.length,
        dim=shape.dim, dtype=shape.dtype, block_q=m.case.block_q, block_kv=m.case.block_kv,
        sparsity=None if dense else m.case.sparsity, topk=None if dense else m.case.topk,
        density=1.0 if dense else m.case.density, system=m.system, mode=m.mode,
    )


def _random_inputs(shape: Shape, mode: str) -> list[tuple]:
    dtype = getattr(torch, shape.dtype)
    dims = (shape.batch, shape.heads, shape.length, shape.dim)
    sets = []
    for _ in range(INPUT_SETS):
        q, k, v = (torch.randn(dims, device="cuda", dtype=dtype, requires_grad=mode != "fwd")
                   for _ in range(3))
        sets.append((q, k, v, torch.randn(dims, device="cuda", dtype=dtype)))
    return sets


def _step(attend: Callable, mode: str) -> Callable:
    if mode == "fwd":
        def forward(q, k, v, grad):
            with torch.no_grad():
                return attend(q, k, v)
        return forward

    def forward_backward(q, k, v, grad):
        # Gradients returned, not accumulated into .grad: no extra additions are timed.
        return torch.autograd.grad(attend(q, k, v), (q, k, v), grad)
    return forward_backward


def _repeats(step: Callable, inputs: list[tuple], budget_s: float, most: int) -> int:
    """As many repeats as fit the time budget, between 3 and `most`."""
    step(*inputs[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    step(*inputs[0])
    torch.cuda.synchronize()
    once = time.perf_counter() - start
    return max(3, min(most, int(budget_s / max(once, 1e-6))))


class Timed(NamedTuple):
    """A measurement ready to time: `sample(n)` gives the milliseconds of n more calls."""

    sample: Callable[[int], list[float]]
    repeats: int
    peak_memory_mb: float


Prepare = Callable[[Measurement, list], Timed]


def cuda_preparer(budget_s: float, most_repeats: int, timing: str = "call") -> Prepare:
    """Prepares a measurement on the GPU: its repeat count (as many calls as fit
    `budget_s`), the peak memory of one call, and a sampler of CUDA-event-timed calls.
    `timing` is "call" (as called) or "kernels" (the call captured in CUDA graphs, one per
    input set, and replayed)."""
    def prepare(m: Measurement, inputs: list) -> Timed:
        step = _step(SYSTEMS[m.system].build(m.case), m.mode)
        repeats = _repeats(step, inputs, budget_s, most_repeats)
        peak = peak_memory_mb(step, inputs[0])
        fn, sets = (step, inputs) if timing == "call" else (replay, graphed(step, inputs))
        call_times_ms(fn, sets, 0, warmup=len(sets))
        return Timed(lambda count: call_times_ms(fn, sets, count), repeats, peak)
    return prepare


def _figures(m: Measurement, times: list[float], peak_memory: float) -> dict:
    ms = statistics.median(times)
    dense_tflops = m.case.shape.dense_flops(m.mode) / ms / 1e9
    density = 1.0 if m.system in DENSE else m.case.density
    return dict(median_ms=ms, repeats=len(times), peak_memory_mb=peak_memory,
                tflops_dense_equiv=dense_tflops, tflops_per_computed_block=density * dense_tflops)


def _error(error: Exception) -> str:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return f"{type(error).__name__}: {error}"


def _measure_group(group: list[Measurement], inputs: list, prepare: Prepare,
                   log: Callable[[str], None]) -> list[dict]:
    """Rows of one group: each measurement prepared, then timed in interleaved rounds."""
    first = group[0]
    log(f"{first.case.shape.label} {first.mode}: preparing {len(group)} measurements, then "
        f"{ROUNDS} rounds")
    rows = [case_fields(m) for m in group]
    timed: list[Timed | None] = []
    for m, row in zip(group, rows, strict=True):
        try:
            timed.append(prepare(m, inputs))
        except Exception as error:  # noqa: BLE001  (a system that fails is reported)
            row["error"] = _error(error)
            timed.append(None)
    times: list[list[float]] = [[] for _ in group]
    for round_ in range(ROUNDS):
        log(f"  round {round_ + 1}/{ROUNDS}")
        for i, t in enumerate(timed):
            if t is None or "error" in rows[i]:
                continue
            try:
                times[i] += t.sample(math.ceil(t.repeats / ROUNDS))
            except Exception as error:  # noqa: BLE001
                rows[i]["error"] = _error(error)
    reference = None
    for m, row, t, ms in zip(group, rows, timed, times, strict=True):
        if "error" in row:
            continue
        row.update(_figures(m, ms, t.peak_memory_mb))
        if m.system == REFERENCE_SYSTEM:
            reference = row
        if reference is not None:
            row["speedup_vs_cudnn"] = reference["median_ms"] / row["median_ms"]
            row["memory_vs_cudnn"] = row["peak_memory_mb"] / reference["peak_memory_mb"]
    return rows


def _progress_line(done: int, total: int, start: float, m: Measurement, row: dict) -> str:
    elapsed = int(time.perf_counter() - start)
    where = (f"{m.system} {m.mode} {m.case.shape.label}"
             + ("" if m.system in DENSE else f" sparsity {m.case.sparsity:.2f}"))
    if "error" in row:
        outcome = f"failed: {row['error'][:160]}"
    else:
        outcome = f"{row['median_ms']:.3f} ms"
        if "speedup_vs_cudnn" in row:
            outcome += f" ({row['speedup_vs_cudnn']:.2f}x cuDNN)"
    return f"[{done:>3}/{total} {elapsed // 60:02d}:{elapsed % 60:02d}] {where}: {outcome}"


def run(
    cases: list[Case],
    systems: Sequence[str],
    modes: Sequence[str] = MODES,
    prepare: Prepare | None = None,
    make_inputs: Callable[[Shape, str], list] = _random_inputs,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """One row per measurement (figures, or the error of a system that failed), with
    speedup and memory against the reference system of the same group. `checkpoint`
    gets the rows so far after each group (a long suite keeps what it measured)."""
    prepare = prepare or cuda_preparer(1.5, 100)
    groups = plan(cases, systems, modes)
    total, start = sum(len(g) for g in groups), time.perf_counter()
    log(f"{total} measurements: {len(cases)} cases, systems {', '.join(systems)}, "
        f"modes {', '.join(modes)}, {ROUNDS} interleaved rounds per shape and mode")
    rows: list[dict] = []
    for group in groups:
        inputs = make_inputs(group[0].case.shape, group[0].mode)
        for m, row in zip(group, _measure_group(group, inputs, prepare, log), strict=True):
            rows.append(row)
            log(_progress_line(len(rows), total, start, m, row))
        del inputs
        if checkpoint is not None:
            checkpoint(rows)
    return rows
