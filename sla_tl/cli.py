"""The `sla-tl` command line.

Parsing needs neither torch nor TileLang (the package defers them inside this command, see
`sla_tl/__init__.py`), so `--help` answers at once; a subcommand imports what it uses.

Exit status, for every subcommand: 0 on success, 1 when the work failed (a gate, a kernel
that does not compile), 2 on bad input (a value, a file, a store); an error is one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _warning_line(command: str):
    """Show a warning as one line, `sla-tl COMMAND: warning: ...` (not Python's two)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"sla-tl {command}: warning: {_one_line(message)}", file=file or sys.stderr)

    return show


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default, except where there is none to show (flags, and
    options whose default is said in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def _subcommand(commands, name: str, text: str, **options) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=text, description=text,
                               formatter_class=HelpFormatter, **options)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also show TileLang's own log lines while compiling")


def _add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None,
                        help="processes compiling kernels in parallel (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the `sla-tl` command and its subcommands."""
    parser = OneLineParser(prog="sla-tl", description="Sparse-Linear Attention tools",
                           formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _subcommand(commands, "demo", "reference quality on a small problem, the kernels "
                       "of one call compiled for sm_90a, timing on a GPU")
    demo.add_argument("--length", type=int, default=4096, help="sequence length L")
    demo.add_argument("--heads", type=int, default=2, help="attention heads H")
    demo.add_argument("--dim", type=int, default=64, choices=(64, 128), help="head dim D")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    _add_verbose(demo)

    commands.add_parser("bench", help="the benchmark suite against dense and sparse baselines, "
                        "and the throughput gate (`sla-tl bench --help`)", add_help=False)
    commands.add_parser("quality", help="fine-tune a video DiT (or your model, or captured "
                        "activations) with each sparse arm against dense "
                        "(`sla-tl quality --help`)", add_help=False)

    report = _subcommand(commands, "kernels", "compile the shipped kernels (no GPU needed) and "
                         "check their registers, spills, shared memory, wgmma, TMA and SASS "
                         "(HGMMA, setmaxnreg, local memory, main loop length, softmax/wgmma "
                         "overlap) against the committed record")
    report.add_argument("--arch", default=None,
                        help="TileLang target arch (default: every arch with kernels)")
    _add_workers(report)
    report.add_argument("--write-record", action="store_true",
                        help="replace the committed record with these facts")
    _add_verbose(report)

    tune = _subcommand(commands, "tune", "search kernel schedules on the GPU in hand and store "
                       "the best (with --compile-only: compile and prune, no GPU needed)")
    tune.add_argument("--arch", default="sm90", help="GPU arch to tune for")
    tune.add_argument("--shape", action="append", default=None, metavar="B,H,L,D",
                      help="B,H,L,D or B,H,Lq,Lk,D, repeatable (default: the Wan2.1-1.3B "
                      "shape 1,12,32760,128)")
    tune.add_argument("--trials", type=int, default=30, help="timed trials per shape")
    tune.add_argument("--storage", default=None, help="SQLAlchemy URL of the Optuna storage "
                      "(default: SQLite in $SLA_TL_CACHE_DIR, ~/.cache/sla_tl)")
    tune.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"),
                      help="what the trials time")
    tune.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                      help="dtype of q, k, v")
    tune.add_argument("--topk", type=float, default=0.05, help="critical share of key blocks")
    tune.add_argument("--k-low", type=float, default=0.0, help="negligible share of key blocks")
    tune.add_argument("--block-q", type=int, default=128, help="query block size")
    tune.add_argument("--block-kv", type=int, default=64, help="key block size")
    tune.add_argument("--feature-map", default="softmax", help="softmax, elu or relu")
    tune.add_argument("--linear", default="marginal", help="marginal or global")
    tune.add_argument("--compile-only", action="store_true",
                      help="compile and prune the candidates, time nothing")
    tune.add_argument("--gpu", default=None, help="GPU model whose kernel cache to fill with "
                      "--compile-only (default: the GPU in hand)")
    _add_workers(tune)
    _add_verbose(tune)

    warm = _subcommand(commands, "warm", "precompile the default and tuned kernels into the "
                       "kernel cache (no GPU needed)")
    warm.add_argument("--arch", default="sm90", help="GPU arch to compile for")
    warm.add_argument("--gpu", default=None, help="GPU model whose kernel cache to fill "
                      "(default: the GPU in hand, else every model in the tuned store)")
    _add_workers(warm)
    _add_verbose(warm)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sla-tl` command."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        with warnings.catch_warnings():  # restores the default display on the way out
            warnings.showwarning = _warning_line(args.command)
            return _run(parser, args, rest)
    except KeyboardInterrupt:
        print(f"sla-tl {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, NotImplementedError, OSError) as error:
        print(f"sla-tl {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"sla-tl {args.command}: failed: {_one_line(error)}", file=sys.stderr)
        return 1


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    """Run the chosen subcommand; its exit status."""
    if args.command == "bench":
        from .benchmarks import bench  # its own parser and help

        return bench.main(rest)
    if args.command == "quality":
        from .benchmarks.quality import cli as quality_cli  # its own parser and help

        return quality_cli.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # What `import sla_tl` does outside this command (see the module docstring).
    from . import ops  # noqa: F401

    if args.verbose:
        from .kernels import show_tilelang_log

        show_tilelang_log()
    if args.command == "demo":
        from . import demo as demo_module

        return demo_module.main(args.length, args.heads, args.dim, args.seed)
    if args.command == "kernels":
        return _kernels(args.arch, args.workers, args.write_record)
    if args.command in ("tune", "warm"):
        from . import tune_cli

        return tune_cli.tune(args) if args.command == "tune" else tune_cli.warm(args)
    raise AssertionError(f"unhandled command {args.command}")


def _kernels(arch: str | None, workers: int | None, write_record: bool) -> int:
    """The static gate of one arch, or of every arch with kernels; the worst exit status."""
    from .schedules import archs
    from .targets import normalise_arch
    from .validation import check_positive_int

    if workers is not None:
        check_positive_int("--workers", workers)
    chosen = [normalise_arch(arch)] if arch is not None else [
        a.target for a in archs.with_kernels()]
    return max(_kernels_of(target, workers, write_record) for target in chosen)


def _kernels_of(arch: str, workers: int | None, write_record: bool) -> int:
    from . import kernel_cache, static_cache, static_check

    specs = list(dict.fromkeys(static_check.shipped_kernels(arch)))
    print(f"reading {len(specs)} kernels for {arch} (a line each as it is done; kernels are "
          f"compiled into {kernel_cache.require(arch)}, facts cached in "
          f"{static_cache.directory()}; a cached kernel takes about a second)", flush=True)
    facts = static_check.collect(specs, workers, progress=True)
    print("\n".join(static_check.table(facts)))
    path = static_check.record_path(arch)
    if write_record:
        static_check.write_record(facts, path)
        print(f"wrote {path}")
        return 0
    record = static_check.load_record(path)
    changes = static_check.diff(facts, record)
    if changes:
        print(f"\ndifferences from {path}:")
        print("\n".join(f"  {line}" for line in changes))
    problems = static_check.compare(facts, record)
    for line in problems:
        print("FAIL", line)
    if problems:
        print(f"static check failed: {len(problems)} problems (register margin "
              f"{static_check.REGISTER_MARGIN}, main loop margin "
              f"{static_check.LOOP_MARGIN:.0%}); if a change is intended, rewrite the record "
              "with `sla-tl kernels --write-record`")
    else:
        print(f"static check passed: {len(facts)} kernels within the record")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
