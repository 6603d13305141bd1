"""One kernel of a plan under each of its schedules, timed alone beside cuDNN (what
`forward_variants` and `dq_variants` share).

The schedules of a kernel are `sla_tl.kernels.every_schedule`: its default first, every
other combination of its searched knobs, then its alternatives (which may round
differently). Each is built (a schedule that cannot be is reported in its row), timed on
the tensors of kept runs of the plan, side by side with the others in rounds, and its
output compared with the first schedule's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from sla_tl import kernels, tilelang_backend
from sla_tl.parallel import compile_in_parallel
from sla_tl.phases import Phase
from sla_tl.settings import Settings
from sla_tl.timing import median_ms

from .environment import describe_environment

ROUNDS = 5
"""Rounds of side-by-side timing per schedule (`time_each`)."""


def label(knobs: Mapping) -> str:
    """A schedule's knobs as text."""
    return ",".join(f"{name}={value}" for name, value in knobs.items())


def knob_setting(text: str) -> tuple[str, str, object]:
    """`KERNEL.KNOB=VALUE` (a command-line schedule knob) as (kernel, knob, value); the value
    an int, a bool (true/false) or the text itself. argparse.ArgumentTypeError when the
    text is not of that form."""
    name, sep, value = text.partition("=")
    kernel, dot, knob = name.partition(".")
    if not (sep and dot and kernel and knob and value):
        raise argparse.ArgumentTypeError(f"expected KERNEL.KNOB=VALUE, got {text!r}")
    parsed: object = value
    if value.lstrip("-").isdigit():
        parsed = int(value)
    elif value.lower() in ("true", "false"):
        parsed = value.lower() == "true"
    return kernel, knob, parsed


def schedule_of(settings: Sequence[tuple[str, str, object]]) -> dict[str, dict]:
    """The schedule (knobs by kernel) that `knob_setting`'s results set."""
    schedule: dict[str, dict] = {}
    for kernel, knob, value in settings:
        schedule.setdefault(kernel, {})[knob] = value
    return schedule


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The call's shape and the timing's repeats, Wan2.1-1.3B by default, and --out."""
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--linear", default="marginal", choices=("marginal", "global"))
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-kv", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out")


def backward_inputs(args: argparse.Namespace, s: Settings, count: int = 3) -> list[dict]:
    """`count` sets of a backward's inputs at the shape of `args` (`add_shape_arguments`):
    fresh random q, k, v, dO and projection, their own routing and forward, by the names of
    a backward plan's inputs."""
    b, h, length, d = 1, args.heads, args.length, args.dim
    inputs = []
    print("preparing inputs", flush=True)
    for _ in range(count):
        q, k, v, grad = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
        weight = torch.randn(d, d, device="cuda") / d**0.5
        bias = torch.randn(d, device="cuda") * 0.1
        routing = tilelang_backend.route(q, k, args.topk, 0.0, args.block_q, args.block_kv,
                                         "bhsd")
        saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s)
        inputs.append(dict(grad_out=grad, q=q, k=k, v=v, **saved._asdict(),
                           **routing._asdict(), proj_weight=weight, proj_bias=bias))
    return inputs


def compile_steps(phases: Sequence[Phase], step: str) -> None:
    """Compile the kernel of `step` in every phase in parallel; a schedule that cannot be
    built is printed here and reported again in its row."""
    start = time.perf_counter()
    try:
        compile_in_parallel([phase.step(step).kernel for phase in phases])
    except RuntimeError as error:
        print(error)
    print(f"compiled {len(phases)} kernels in {time.perf_counter() - start:.0f} s", flush=True)


def time_each(candidates: Sequence[dict], phases: Sequence[Phase], step: str, output: str,
              runs: Sequence[dict[str, torch.Tensor]], repeats: int, flops: float,
              before_output: Callable[[], None] | None = None,
              build: Callable = kernels.compiled, timer: Callable = median_ms,
              rounds: int = ROUNDS) -> list[dict]:
    """A row per schedule: its median ms running `step` alone, rotating through `runs`, its
    TFLOP/s for `flops`, and whether its `output` on `runs[0]` (after `before_output`, for a
    step that adds to its output) is the first schedule's bit for bit, else how far off.

    The schedules are timed side by side: `rounds` rounds, each timing every schedule once
    (`repeats` calls), and each schedule's time is its median over the rounds, so that a
    drift of the GPU's clocks over the run does not favour the schedules timed late."""
    rows: list[dict] = []
    ready_to_time = []
    for knobs, phase in zip(candidates, phases, strict=True):
        ready = time.perf_counter()
        try:
            build(phase.step(step).kernel)
        except Exception as error:  # noqa: BLE001  (a schedule that cannot be built)
            rows.append(dict(knobs=knobs, error=f"{type(error).__name__}: {error}"[:200]))
            continue
        # Loaded from the workers' cache this takes about a second; far more means the
        # kernel was compiled again here.
        print(f"timing {label(knobs)} (kernel ready in {time.perf_counter() - ready:.1f} s)",
              flush=True)

        def run(env, phase=phase):
            phase.run_step(step, env)

        row = dict(knobs=knobs)
        rows.append(row)
        ready_to_time.append((row, phase, run))
    sets = [(env,) for env in runs]
    if ready_to_time:
        # Timed once before the rounds, and discarded: on the H200 the first schedule of a
        # run timed 12-15% slower than the same kernel later in the run.
        timer(ready_to_time[0][2], sets, repeats)
    times: list[list[float]] = [[] for _ in ready_to_time]
    for _ in range(rounds):
        for (_, _, run), samples in zip(ready_to_time, times, strict=True):
            samples.append(timer(run, sets, repeats))
    first = None
    for (row, phase, _), samples in zip(ready_to_time, times, strict=True):
        ms = statistics.median(samples)
        if before_output is not None:
            before_output()
        phase.run_step(step, runs[0])
        out = runs[0][output].clone()
        if first is None:
            first = out
        row.update(ms=ms, tflops=flops / ms / 1e9, bit_identical_to_first=torch.equal(out, first),
                   max_abs_diff_to_first=(out.float() - first.float()).abs().max().item())
    return rows


def print_rows(rows: Sequence[dict], cudnn_tflops: float, cudnn_what: str) -> None:
    """The rows as a table, each rate also as a share of cuDNN's (`cudnn_what`)."""
    for row in rows:
        if "error" in row:
            print(f"  {label(row['knobs']):<50} {row['error']}")
            continue
        print(f"  {label(row['knobs']):<50} {row['ms']:7.3f} ms {row['tflops']:5.0f} TFLOP/s "
              f"({row['tflops'] / cudnn_tflops:4.0%} of {cudnn_what}) "
              f"{'=' if row['bit_identical_to_first'] else '~'}first "
              f"(max diff {row['max_abs_diff_to_first']:.2e})")


def bandwidth_report(rows: Sequence[dict], args: argparse.Namespace, moved: float) -> None:
    """The rows of a kernel that `time_each` timed by the bytes it must move (`moved` given
    for its flop, so its rate is GB/s / 1000): each rate renamed TB/s, printed as a table,
    and with `args.out` written there as JSON with the environment and the arguments."""
    for row in rows:
        if "error" in row:
            print(f"  {label(row['knobs']):<36} {row['error']}")
            continue
        row["tb_per_s"] = row.pop("tflops")
        print(f"  {label(row['knobs']):<36} {row['ms']:7.3f} ms {row['tb_per_s']:5.2f} TB/s "
              f"{'=' if row['bit_identical_to_first'] else '~'}first "
              f"(max diff {row['max_abs_diff_to_first']:.2e})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=describe_environment(), args=vars(args),
                           bytes_moved=moved, schedules=list(rows)), f, indent=2)
