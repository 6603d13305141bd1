"""GPU time per kernel of one forward+backward through `torch.ops.sla.attention`.

    python -m sla_tl.benchmarks.kernel_profile [--topk 0.05] [--out profile.json]

Runs a few warm-up calls, then profiles `--calls` calls with torch.profiler and lists
every GPU kernel by total time, so the small torch ops around the TileLang kernels show.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

import sla_tl

from .environment import describe_environment


def main(argv: list[str] | None = None) -> int:
    """Profile the op at the Wan2.1-1.3B shape and print a per-kernel table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--linear", default="marginal", choices=("marginal", "global"))
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    b, h, d = 1, 12, 128
    shape = (b, h, args.length, d)
    q, k, v, grad = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    weight = torch.randn(d, d, device="cuda") / d**0.5
    bias = torch.zeros(d, device="cuda")

    def call() -> None:
        out = sla_tl.attention(q, k, v, weight, bias, topk=args.topk, linear=args.linear)
        out.backward(grad)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total_us = sum(e.device_time_total for e in kernels) / args.calls
    print(f"B={b} H={h} L={args.length} D={d} bf16 topk={args.topk} linear={args.linear}: "
          f"{total_us / 1e3:.3f} ms of GPU kernels per forward+backward")
    rows = []
    for e in kernels[:args.rows]:
        per_call_us = e.device_time_total / args.calls
        rows.append(dict(kernel=e.key, calls=e.count // args.calls, us_per_call=per_call_us))
        print(f"  {per_call_us:9.1f} us  x{e.count // args.calls:<3} {e.key[:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=describe_environment(), args=vars(args),
                           total_us=total_us, kernels=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
