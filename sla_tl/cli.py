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

    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from . import demo as demo_module

        return demo_module.main(args.length, args.heads, args.dim, args.seed)
    from .benchmarks import side_by_side

    return side_by_side.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
