"""The `sla-tl` command line."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sla-tl` command."""
    parser = argparse.ArgumentParser(prog="sla-tl", description="Sparse-Linear Attention tools")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="reference quality on a small problem; timing on a GPU")
    demo.add_argument("--length", type=int, default=4096)
    demo.add_argument("--heads", type=int, default=2)
    demo.add_argument("--dim", type=int, default=64, choices=(64, 128))
    demo.add_argument("--seed", type=int, default=0)

    commands.add_parser("bench", help="side-by-side timing against dense SDPA (needs a GPU)",
                        add_help=False)

    report = commands.add_parser(
        "kernels", help="compile the shipped kernels (no GPU needed) and check their resources")
    report.add_argument("--arch", default="sm_90a")
    report.add_argument("--workers", type=int, default=None)
    report.add_argument("--write-record", action="store_true",
                        help="replace the committed record with these facts")

    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from . import demo as demo_module

        return demo_module.main(args.length, args.heads, args.dim, args.seed)
    if args.command == "kernels":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _kernels(args.arch, args.workers, args.write_record)
    from .benchmarks import side_by_side

    return side_by_side.main(rest)


def _kernels(arch: str, workers: int | None, write_record: bool) -> int:
    from . import static_check

    facts = static_check.collect(static_check.shipped_kernels(arch), workers)
    for f in facts:
        print(f"{f.name:<64} regs {f.registers:>3}  spill {f.spill_bytes:>4} B  "
              f"smem {f.shared_bytes:>6} B  threads {f.threads:>3}  "
              f"wgmma {'yes' if f.wgmma else 'no':>3}  TMA {'yes' if f.tma else 'no':>3}")
    if write_record:
        static_check.write_record(facts)
        print(f"wrote {static_check.RECORD_PATH}")
        return 0
    problems = static_check.compare(facts, static_check.load_record())
    for line in problems:
        print("FAIL", line)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
