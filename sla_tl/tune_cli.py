"""`sla-tl tune` and `sla-tl warm`: the command-line side of the autotuner."""

from __future__ import annotations

import argparse

import torch

from . import config_store, kernel_cache, parallel
from .plan import kernels_for
from .settings import Settings
from .targets import model_slug, normalise_arch
from .validation import check_positive_int


def _shapes(given: list[str] | None) -> list[tuple[int, ...]] | None:
    if not given:
        return None
    shapes = []
    for text in given:
        try:
            shapes.append(tuple(int(n) for n in text.split(",")))
        except ValueError:
            raise ValueError(f"--shape wants B,H,L,D or B,H,Lq,Lk,D (integers); got {text!r}"
                             ) from None
    return shapes


def tune(args: argparse.Namespace) -> int:
    """Run the search and print a summary table."""
    from .autotune.api import tune as run_tune

    reports = run_tune(
        args.arch, _shapes(args.shape), args.trials, args.storage, dtype=args.dtype,
        topk=args.topk, k_low=args.k_low, block_q=args.block_q, block_kv=args.block_kv,
        feature_map=args.feature_map, linear=args.linear, mode=args.mode,
        compile_only=args.compile_only, gpu=args.gpu, workers=args.workers, progress=True,
    )
    for report in reports:
        k = report.key
        print(f"\nB={k.batch} H={k.heads} Lq={k.lq} Lk={k.lk} D={k.dim} {k.dtype} "
              f"topk={k.topk} k_low={k.k_low} blocks {k.block_q}x{k.block_kv} {args.mode}")
        pruned = [c for c in report.candidates if c.pruned]
        print(f"  candidates: {len(report.candidates)} compiled, {len(pruned)} pruned")
        for c in pruned:
            print(f"    pruned {c.kernel} {c.label}: {c.pruned}")
        result = report.schedule
        if result is None:
            continue
        default = f"{result.default_ms:.3f} ms" if result.default_ms else "not timed"
        print(f"  {'default':<8} {default}")
        print(f"  {'tuned':<8} {result.best_ms:.3f} ms  (trials: {result.complete} complete, "
              f"{result.pruned} pruned, {result.failed} failed)")
        for kernel, knobs in result.best.items():
            print(f"    {kernel:<14} {', '.join(f'{n}={v}' for n, v in sorted(knobs.items()))}")
        for refusal in result.refused:
            print(f"    refused {refusal.kernel} {refusal.candidate}: {refusal.reason}")
    return 0


def warm(args: argparse.Namespace) -> int:
    """Compile the shipped default kernels and the tuned schedules of a GPU model (`--gpu`,
    else the GPU in hand, else every model in the store) into the arch's kernel cache."""
    from .static_check import shipped_kernels

    arch = normalise_arch(args.arch)
    if args.workers is not None:
        check_positive_int("--workers", args.workers)
    if args.gpu is not None:
        model_slug(args.gpu)  # a name that cannot be a GPU model's is refused
    directory = kernel_cache.require(arch)
    store = config_store.active_store()
    if args.gpu is not None:
        models = {args.gpu}
    elif torch.cuda.is_available():
        models = {torch.cuda.get_device_name()}
    else:
        models = {e.key.gpu for e in store.entries() if e.key.arch == arch}
    specs = shipped_kernels(arch)
    tuned = [e for e in store.entries() if e.key.gpu in models and e.key.arch == arch]
    for entry in tuned:
        k = entry.key
        s = Settings(block_q=k.block_q, block_kv=k.block_kv, feature_map=k.feature_map,
                     linear=k.linear, layout=k.layout)
        specs += kernels_for(arch, k.dim, k.dtype, s, schedule=entry.schedule)
    parallel.compile_in_parallel(specs, args.workers, progress=True)
    print(f"{len(set(specs))} kernels ({len(tuned)} tuned schedules of "
          f"{', '.join(sorted(models)) or 'no GPU model'}) in {directory}")
    return 0
