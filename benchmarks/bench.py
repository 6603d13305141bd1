"""`sla-tl bench`: the benchmark suite, side by side in one run, and the throughput gate.

    sla-tl bench --out result.json --plot result.png        # the whole suite
    sla-tl bench --sections shapes --systems sdpa_cudnn,sla_tl
    sla-tl bench --shape 1,12,32760,128 --sparsity 0.9,0.95
    sla-tl bench --check --tolerance 0.05                    # the gate, shipped baselines
    sla-tl bench --from result.json --check benchmarks/baselines/NVIDIA-H200.json

Exit status: 0 when everything ran (and the gate passed), 1 when the gate failed,
2 on a usage error or a refused baseline.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from sla_tl import spec
from sla_tl.cli import HelpFormatter, OneLineParser
from sla_tl.timing import TIMINGS

from .gate import check, check_tolerance, format_verdicts, gated_cases, refuse_other_gpu
from .report import format_table
from .result_file import baseline_path, load, make_result, merge, save
from .suite import DEFAULT_SPARSITY, MODES, SECTIONS, Case, Shape, cases_of
from .systems import GATED_SYSTEM, REFERENCE_SYSTEM, SYSTEMS, unavailable

DEFAULT_BASELINES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baselines")


class _Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The epilog's examples as written, and each option's default."""


class UsageError(Exception):
    """A request that cannot be served (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sla-tl bench", description=__doc__.splitlines()[0],
        formatter_class=_Formatter,
        epilog="\n".join(__doc__.splitlines()[1:]))
    what = parser.add_argument_group("what to measure")
    what.add_argument("--sections", default=",".join(SECTIONS),
                      help=f"parts of the suite, comma-separated: {', '.join(SECTIONS)}")
    what.add_argument("--shape", action="append", metavar="B,H,L,D",
                      help="measure this shape instead of the suite (repeatable)")
    what.add_argument("--sparsity", default=str(DEFAULT_SPARSITY),
                      help="comma-separated sparsities for --shape")
    what.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                      help="dtype for --shape")
    what.add_argument("--systems", default=None,
                      help=f"comma-separated (default: all of {', '.join(SYSTEMS)}); one whose "
                      "package is missing is skipped")
    what.add_argument("--modes", default=",".join(MODES),
                      help=f"comma-separated: {', '.join(MODES)}")
    how = parser.add_argument_group("how")
    how.add_argument("--budget-s", type=float, default=1.5,
                     help="seconds of timed calls per measurement (sets the repeat count)")
    how.add_argument("--most-repeats", type=int, default=100,
                     help="most timed calls per measurement, whatever the budget")
    how.add_argument("--timing", default="call", choices=TIMINGS,
                     help="call: as called, host work included; kernels: GPU work alone, each "
                     "call replayed from a CUDA graph (with --check: the baseline's)")
    out = parser.add_argument_group("results")
    out.add_argument("--out", help="write the JSON result here (rewritten as groups finish)")
    out.add_argument("--plot", help="write the PNG plot here (needs matplotlib)")
    out.add_argument("--from", dest="inputs", nargs="+", metavar="RESULT",
                     help="use these result files (merged) instead of measuring")
    gate = parser.add_argument_group("throughput gate")
    gate.add_argument("--check", metavar="BASELINE", nargs="?", const=DEFAULT_BASELINES,
                      help="baseline file, or a directory holding <GPU model>.json (alone: "
                      "the baselines shipped with sla-tl); runs the baseline's cases (cuDNN "
                      "and sla-tl) unless --from is given")
    gate.add_argument("--tolerance", type=float, default=0.05,
                      help="largest allowed relative fall of a speedup")
    return parser


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _requested_cases(args: argparse.Namespace) -> list[Case]:
    if not args.shape:
        return cases_of(_csv(args.sections))
    cases = []
    for text in args.shape:
        try:
            batch, heads, length, dim = (int(x) for x in text.split(","))
        except ValueError:
            raise UsageError(f"--shape wants B,H,L,D, got {text!r}") from None
        if min(batch, heads, length) < 1 or dim not in spec.HEAD_DIMS:
            raise UsageError(f"--shape wants positive B, H, L and D in {spec.HEAD_DIMS}, "
                             f"got {text!r}")
        shape = Shape(f"B{batch}-H{heads}-L{length}-D{dim}", batch, heads, length, dim,
                      args.dtype)
        cases += [Case(shape, s) for s in _sparsities(args.sparsity)]
    return cases


def _sparsities(text: str) -> list[float]:
    try:
        values = [float(x) for x in _csv(text)]
    except ValueError:
        raise UsageError(f"--sparsity wants comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if not values or bad:
        raise UsageError(f"--sparsity values must be in [0, 1), got {text!r}")
    return values


def _check_numbers(args: argparse.Namespace) -> None:
    """The options that are numbers, before anything is measured."""
    check_tolerance(args.tolerance)
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        raise UsageError(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.most_repeats < 1:
        raise UsageError(f"--most-repeats must be at least 1, got {args.most_repeats}")


def _systems(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The systems that can run here, and why the others cannot (unknown names are an error)."""
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise UsageError(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    skipped = {n: reason for n in names if (reason := unavailable(n))}
    return [n for n in names if n not in skipped], skipped


def _prewarm(cases: list[Case]) -> None:
    """Compile sla-tl's kernels for the cases in parallel processes before timing starts."""
    import torch

    from sla_tl.parallel import compile_in_parallel
    from sla_tl.plan import kernels_for
    from sla_tl.settings import Settings
    from sla_tl.targets import target_of

    arch = target_of(torch.device("cuda")).arch.target
    specs = []
    for dim, dtype, bq, bkv in dict.fromkeys(
            (c.shape.dim, c.shape.dtype, c.block_q, c.block_kv) for c in cases):
        specs += kernels_for(arch, dim, dtype, Settings(block_q=bq, block_kv=bkv))
    print(f"compiling {len(set(specs))} sla-tl kernels for {arch}", flush=True)
    compile_in_parallel(specs, progress=True)


def _measure(args: argparse.Namespace, baseline: dict | None) -> dict:
    import torch

    from .environment import describe_environment
    from .runner import ROUNDS, cuda_preparer, run

    if not torch.cuda.is_available():
        raise UsageError("measuring needs a CUDA GPU and none is visible to torch "
                         "(--from RESULT.json checks or plots a result made elsewhere)")
    if baseline is not None:
        refuse_other_gpu(baseline, torch.cuda.get_device_name())
        cases, modes = gated_cases(baseline)
        systems, skipped = [REFERENCE_SYSTEM, GATED_SYSTEM], {}
        timing = baseline["settings"]["timing"]
    else:
        cases, modes = _requested_cases(args), _csv(args.modes)
        systems, skipped = _systems(list(SYSTEMS) if args.systems is None
                                    else _csv(args.systems))
        timing = args.timing
    bad_modes = set(modes) - set(MODES)
    if bad_modes:
        raise UsageError(f"unknown modes {sorted(bad_modes)}; known: {', '.join(MODES)}")
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", flush=True)
    if GATED_SYSTEM in systems:
        _prewarm(cases)
    environment = describe_environment()
    settings = dict(timing=timing, rounds=ROUNDS, budget_s=args.budget_s,
                    most_repeats=args.most_repeats, modes=modes, systems=systems,
                    command=" ".join(sys.argv[1:]))

    def checkpoint(rows: list[dict]) -> None:
        if args.out:
            save(make_result(environment, settings, skipped, rows), args.out)

    rows = run(cases, systems, modes, cuda_preparer(args.budget_s, args.most_repeats, timing),
               log=lambda line: print(line, flush=True), checkpoint=checkpoint)
    return make_result(environment, settings, skipped, rows)


def _baseline_file(path: str, gpu: str | None) -> str:
    if not os.path.isdir(path):
        return path
    if gpu is None:
        raise UsageError(f"{path} is a directory, and there is no GPU to pick a baseline by")
    file = baseline_path(path, gpu)
    if not file.exists():
        raise UsageError(f"no baseline for {gpu} in {path}: make one on that GPU with "
                         "`sla-tl bench --timing kernels --systems sdpa_cudnn,sla_tl "
                         f"--out {file}`")
    return str(file)


def _current_gpu(inputs: list[str] | None) -> str | None:
    if inputs:
        return load(inputs[0])["environment"]["gpu"]
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


# What --check takes from the baseline instead of the command line.
_SET_BY_BASELINE = ("sections", "shape", "sparsity", "dtype", "systems", "modes", "timing")


def run_bench(args: argparse.Namespace) -> int:
    """Measure (or read) a result, report it, and gate it when asked; the exit status."""
    if args.plot:
        from .plot import require_matplotlib

        require_matplotlib()
    baseline = None
    if args.check:
        baseline = load(_baseline_file(args.check, _current_gpu(args.inputs)))
        print(f"baseline: {args.check} ({baseline['environment']['gpu']}, commit "
              f"{(baseline['environment']['git_commit'] or 'unknown')[:12]})", flush=True)
    doc = merge([load(path) for path in args.inputs]) if args.inputs else _measure(args, baseline)
    if args.out:
        save(doc, args.out)
    print(format_table(doc), flush=True)
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        from .plot import write_plot

        write_plot(doc, args.plot)
        print(f"wrote {args.plot}")
    if baseline is None:
        return 0
    verdicts = check(baseline, doc, args.tolerance)
    print(format_verdicts(verdicts, args.tolerance))
    return 1 if any(v.failure for v in verdicts) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sla-tl bench`."""
    parser = _parser()
    args = parser.parse_args(argv)
    given = [name for name in _SET_BY_BASELINE if getattr(args, name) != parser.get_default(name)]
    if args.check and not args.inputs and given:
        parser.error("--check measures the baseline's cases, systems, modes and timing; "
                     f"leave out --{', --'.join(given)}")
    try:
        _check_numbers(args)
        return run_bench(args)
    except (UsageError, ValueError, ImportError, OSError) as error:  # WrongGPUError: ValueError
        print(f"sla-tl bench: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
