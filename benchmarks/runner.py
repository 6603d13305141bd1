"""The measuring loop of `sla-tl bench`: every system on every case, speedups from one run.

Cases are grouped by shape and mode. A group draws its random inputs once (three sets,
so no call finds its inputs in L2 from the previous one), times the dense systems once
(sparsity does not change them), then every sparse system at each sparsity. Speedups are
against cuDNN's time in the same group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .suite import MODES, Case, Shape
from .systems import DENSE, REFERENCE_SYSTEM, SYSTEMS
from .timing import graphed, median_ms, peak_memory_mb, replay

INPUT_SETS = 3


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


def cuda_timer(budget_s: float, most_repeats: int,
               timing: str = "call") -> Callable[[Measurement, list], dict]:
    """Times a measurement on the GPU: median of CUDA-event-timed calls over the input
    sets, as many as fit `budget_s`, and the peak memory of one call. `timing` is "call"
    (as called) or "kernels" (replays of the call captured in CUDA graphs)."""
    def time_one(m: Measurement, inputs: list) -> dict:
        step = _step(SYSTEMS[m.system](m.case), m.mode)
        repeats = _repeats(step, inputs, budget_s, most_repeats)
        peak = peak_memory_mb(step, inputs[0])
        if timing == "call":
            ms = median_ms(step, inputs, repeats, warmup=len(inputs))
        else:
            graphs = graphed(step, inputs)
            ms = median_ms(replay, graphs, repeats, warmup=len(graphs))
            del graphs
            torch.cuda.empty_cache()
        return dict(median_ms=ms, repeats=repeats, peak_memory_mb=peak)
    return time_one


def _figures(m: Measurement, timed: dict) -> dict:
    dense_tflops = m.case.shape.dense_flops(m.mode) / timed["median_ms"] / 1e9
    density = 1.0 if m.system in DENSE else m.case.density
    return dict(timed, tflops_dense_equiv=dense_tflops,
                tflops_per_computed_block=density * dense_tflops)


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
    time_one: Callable[[Measurement, list], dict] | None = None,
    make_inputs: Callable[[Shape, str], list] = _random_inputs,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """One row per measurement (figures, or the error of a system that failed), with
    speedup and memory against the reference system of the same group. `checkpoint`
    gets the rows so far after each group (a long suite keeps what it measured)."""
    time_one = time_one or cuda_timer(1.5, 100)
    groups = plan(cases, systems, modes)
    total, done, start = sum(len(g) for g in groups), 0, time.perf_counter()
    log(f"{total} measurements: {len(cases)} cases, systems {', '.join(systems)}, "
        f"modes {', '.join(modes)}")
    rows = []
    for group in groups:
        inputs = make_inputs(group[0].case.shape, group[0].mode)
        reference = None
        for m in group:
            row = case_fields(m)
            try:
                row.update(_figures(m, time_one(m, inputs)))
            except Exception as error:  # noqa: BLE001  (a system that fails is reported)
                row["error"] = f"{type(error).__name__}: {error}"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            if m.system == REFERENCE_SYSTEM and "error" not in row:
                reference = row
            if reference is not None and "error" not in row:
                row["speedup_vs_cudnn"] = reference["median_ms"] / row["median_ms"]
                row["memory_vs_cudnn"] = row["peak_memory_mb"] / reference["peak_memory_mb"]
            rows.append(row)
            done += 1
            log(_progress_line(done, total, start, m, row))
        del inputs
        if checkpoint is not None:
            checkpoint(rows)
    return rows
