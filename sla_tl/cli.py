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

    commands.add_parser("bench", help="the benchmark suite against dense and sparse baselines, "
                        "and the throughput gate (`sla-tl bench --help`)", add_help=False)
    commands.add_parser("quality", help="fine-tune a video DiT (or your model, or captured "
                        "activations) with each sparse arm against dense "
                        "(`sla-tl quality --help`)", add_help=False)

    report = commands.add_parser(
        "kernels", help="compile the shipped kernels (no GPU needed) and check their resources")
    report.add_argument("--arch", default="sm_90a")
    report.add_argument("--workers", type=int, default=None)
    report.add_argument("--write-record", action="store_true",
                        help="replace the committed record with these facts")

    tune = commands.add_parser("tune", help="search kernel schedules on the GPU in hand, store "
                               "the best (compile-only pruning with no GPU)")
    tune.add_argument("--arch", default="sm90")
    tune.add_argument("--shape", action="append", default=None, metavar="B,H,L,D",
                      help="B,H,L,D or B,H,Lq,Lk,D (repeatable; default Wan2.1-1.3B)")
    tune.add_argument("--trials", type=int, default=30)
    tune.add_argument("--storage", default=None, help="SQLAlchemy URL of the Optuna storage")
    tune.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    tune.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    tune.add_argument("--topk", type=float, default=0.05)
    tune.add_argument("--k-low", type=float, default=0.0)
    tune.add_argument("--block-q", type=int, default=128)
    tune.add_argument("--block-kv", type=int, default=64)
    tune.add_argument("--feature-map", default="softmax")
    tune.add_argument("--linear", default="marginal")
    tune.add_argument("--compile-only", action="store_true")
    tune.add_argument("--gpu", default=None, help="GPU model whose kernel cache to fill "
                      "(with --compile-only)")
    tune.add_argument("--workers", type=int, default=None)

    warm = commands.add_parser("warm", help="precompile the default and tuned kernels (no GPU "
                               "needed)")
    warm.add_argument("--arch", default="sm90")
    warm.add_argument("--gpu", default=None, help="GPU model whose kernel cache to fill "
                      "(default: the GPU in hand, else every model in the tuned store)")
    warm.add_argument("--workers", type=int, default=None)

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
    if args.command in ("tune", "warm"):
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from . import tune_cli

        return tune_cli.tune(args) if args.command == "tune" else tune_cli.warm(args)
    if args.command == "quality":
        from .benchmarks.quality import cli as quality_cli

        return quality_cli.main(rest)
    from .benchmarks import bench

    return bench.main(rest)


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
    record = static_check.load_record()
    changes = static_check.diff(facts, record)
    if changes:
        print(f"\ndifferences from {static_check.RECORD_PATH}:")
        print("\n".join(f"  {line}" for line in changes))
    problems = static_check.compare(facts, record)
    for line in problems:
        print("FAIL", line)
    if problems:
        print(f"static check failed: {len(problems)} problems (register margin "
              f"{static_check.REGISTER_MARGIN}); if a change is intended, rewrite the record "
              "with `sla-tl kernels --write-record`")
    else:
        print(f"static check passed: {len(facts)} kernels within the record")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
