"""`sla-tl tune` and `sla-tl warm`: the command-line side of the autotuner."""

from __future__ import annotations

import argparse

import torch

from . import config_store, kernel_cache, kernels
from .settings import Settings
from .validation import check_positive_int
from .warm import compile_in_parallel, kernels_for_call


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
    """Compile the shipped default kernels and every tuned schedule of the GPU models."""
    from .static_check import shipped_kernels

    arch = kernels.normalise_arch(args.arch)
    if args.workers is not None:
        check_positive_int("--workers", args.workers)
    store = config_store.active_store()
    if args.gpu is not None:
        kernel_cache.model_slug(args.gpu)  # a name that cannot be a directory is refused
        models = [args.gpu]
    elif torch.cuda.is_available():
        models = [torch.cuda.get_device_name()]
    else:
        models = sorted({e.key.gpu for e in store.entries() if e.key.arch == arch and e.key.gpu})
    if not models:
        raise ValueError("no GPU in hand and no tuned schedule in the store: pass --gpu MODEL")
    for gpu in models:
        kernel_cache.use_gpu_model(gpu)
        specs = shipped_kernels(arch)
        for entry in store.entries():
            k = entry.key
            if k.gpu == gpu and k.arch == arch:
                s = Settings(k.block_q, k.block_kv, k.feature_map, k.linear, None, k.layout)
                specs += kernels_for_call(k.dim, k.dtype, s, arch, schedule=entry.schedule)
        # Fresh processes: this one's caches would serve the previous model's kernels
        # without writing them into this model's directory.
        compile_in_parallel(specs, args.workers, progress=True, fresh=True)
        print(f"{gpu}: {len(set(specs))} kernels in {kernel_cache.directory_for(gpu)}")
    return 0

