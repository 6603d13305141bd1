"""GPU time per kernel of `torch.ops.sla.attention` calls, in launch order.

    python -m sla_tl.benchmarks.kernel_profile [--mode fwd|fwd+bwd] [--topk 0.05]
        [--linear marginal] [--block-q 128] [--block-kv 64] [--calls 7] [--out profile.json]
        [--all-fusions]

At the Wan2.1-1.3B shape by default (B=1, H=12, L=32760, D=128, bf16), with the bench
suite's blocks (128x64, not the operator's default 64x64), on fresh random inputs. Runs
warm-up calls, then profiles `--calls` calls with torch.profiler. A forward is called under
`torch.no_grad()`; a forward+backward returns its gradients (`torch.autograd.grad`, nothing
accumulated into `.grad`), as `sla-tl bench` times them. Every call launches the same
kernels, so they are listed by their place in a call: the median GPU time of each over the
calls, its name (TileLang names every kernel `main_kernel`: the place tells them apart),
then the sum per call and the median span from a call's first kernel start to its last
kernel's end (the difference is the time the GPU waited between kernels, for the host or for
a launch).

With `--all-fusions` (a forward only) the call is the CUDA backend's routed forward with
every fusion that can serve it (`plan.fusions_serving`, those asked by name too), under
the same checks the operator makes: what the GPU would spend with them as the defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import sla_tl
from sla_tl import plan, spec, tilelang_backend
from sla_tl.settings import Settings
from sla_tl.targets import Target, target_of
from sla_tl.validation import check_attention

from .environment import describe_environment


def kernels_by_call(events: list, calls: int) -> list[list]:
    """The CUDA kernel events of `calls` identical calls, split into one list per call (in
    launch order); ValueError when the count does not divide evenly."""
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    if not kernels or len(kernels) % calls:
        raise ValueError(f"{len(kernels)} kernels do not split into {calls} equal calls")
    per_call = len(kernels) // calls
    return [kernels[i * per_call:(i + 1) * per_call] for i in range(calls)]


def every_forward_fusion(target: Target, shape: plan.CallShape) -> list[str]:
    """Every fusion of a routed forward that can serve a call of this shape on `target`,
    with the selection it routes by by default."""
    selection = plan.resolve_selection(target, shape, None)
    return [name for name in plan.fusions_serving(shape, selection)
            if plan.FUSIONS[name].phase == "routed_forward"]


def main(argv: list[str] | None = None) -> int:
    """Profile the op and print a per-kernel table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="fwd", choices=("fwd", "fwd+bwd"))
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--linear", default="marginal", choices=("marginal", "global"))
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-kv", type=int, default=64)
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--all-fusions", action="store_true",
                        help="the routed forward with every fusion that can serve it "
                        "(--mode fwd only)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1; got {args.calls}")
    if args.all_fusions and args.mode != "fwd":
        parser.error("--all-fusions profiles a forward: it needs --mode fwd")
    b, h, d = 1, 12, 128
    shape = (b, h, args.length, d)
    backward = args.mode == "fwd+bwd"
    q, k, v, grad = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(backward)
    weight = torch.randn(d, d, device="cuda") / d**0.5
    bias = torch.randn(d, device="cuda") * 0.1

    settings = Settings(block_q=args.block_q, block_kv=args.block_kv, linear=args.linear)
    if args.all_fusions:
        check_attention(q, k, v, weight, bias, None, settings, ratios=(args.topk, 0.0))
        n_kv = spec.num_blocks(args.length, args.block_kv)
        widths = (spec.num_critical(args.topk, n_kv), 0)
        args.fusions = every_forward_fusion(
            target_of(q.device), plan.call_shape(q, k, settings, False, widths))

    def attend() -> torch.Tensor:
        if args.all_fusions:
            return tilelang_backend.routed_forward(q, k, v, weight, bias, args.topk, 0.0,
                                                   settings, fusions=args.fusions)[0].out
        return sla_tl.attention(q, k, v, weight, bias, topk=args.topk, block_q=args.block_q,
                                block_kv=args.block_kv, linear=args.linear)

    def call() -> None:
        if backward:
            out = attend()
            torch.autograd.grad(out, (q, k, v), grad)
        else:
            with torch.no_grad():
                attend()

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            call()
        torch.cuda.synchronize()
    calls = kernels_by_call(prof.events(), args.calls)
    rows = [dict(place=i, kernel=column[0].name,
                 us=statistics.median(e.time_range.elapsed_us() for e in column))
            for i, column in enumerate(zip(*calls, strict=True))]
    total_us = sum(r["us"] for r in rows)
    span_us = statistics.median(c[-1].time_range.end - c[0].time_range.start for c in calls)
    fused = f" fusions={','.join(args.fusions)}" if args.all_fusions else ""
    print(f"B={b} H={h} L={args.length} D={d} bf16 topk={args.topk} linear={args.linear} "
          f"blocks {args.block_q}x{args.block_kv}{fused} {args.mode}: {len(rows)} kernels, "
          f"{total_us / 1e3:.3f} ms of GPU time per call, "
          f"first start to last end {span_us / 1e3:.3f} ms")
    for r in rows:
        print(f"  {r['place']:3d} {r['us']:9.1f} us  {r['kernel'][:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=describe_environment(), args=vars(args),
                           total_us=total_us, span_us=span_us, kernels=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
