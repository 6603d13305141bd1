"""The fused forward kernel under each schedule the autotuner may pick, beside cuDNN SDPA.

    python -m sla_tl.benchmarks.forward_variants [--topk 0.05] [--linear marginal] [--out r.json]

At the Wan2.1-1.3B shape (B=1, H=12, L=32760, D=128, bf16) by default, blocks 128x64, on
fresh random inputs with their own routing. Per schedule: median ms of the fused kernel
alone (the "forward" step of the call's plan built with that schedule, on the tensors of one
earlier run), TFLOP/s per computed block, and how its output compares with the default
schedule's (bit-identical, or the largest difference). The tuner's choices must be
bit-identical; the alternatives listed last round differently by design.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla_tl import kernels, spec, tilelang_backend
from sla_tl.plan import attention_plan, call_shape
from sla_tl.settings import Settings
from sla_tl.targets import target_of
from sla_tl.timing import median_ms

from .environment import describe_environment
from .plan_steps import kept_runs
from .schedule_variants import (
    add_shape_arguments,
    compile_steps,
    print_rows,
    time_each,
)


def main(argv: list[str] | None = None) -> int:
    """Time every forward schedule and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--lut", default="routed", choices=("routed", "shared"),
                        help="routed: each query block's own routing; shared: every query "
                        "block of a head visits the same key blocks (the first ones), so K "
                        "and V stay in L2 and the time shows what is left without their "
                        "traffic")
    args = parser.parse_args(argv)
    b, h, length, d = 1, args.heads, args.length, args.dim
    bq, bkv = args.block_q, args.block_kv
    s = Settings(block_q=bq, block_kv=bkv, linear=args.linear)
    device = torch.device("cuda")
    target = target_of(device)
    candidates = kernels.every_schedule(target.arch.target, "forward", d, bq, bkv)

    sets = []
    print("preparing inputs", flush=True)
    for _ in range(3):
        q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        weight = torch.randn(d, d, device="cuda") / d**0.5
        bias = torch.randn(d, device="cuda") * 0.1
        routing = tilelang_backend.route(q, k, args.topk, 0.0, bq, bkv, "bhsd")
        if args.lut == "shared":
            first_blocks = torch.arange(routing.lut.shape[-1], dtype=torch.int32,
                                        device="cuda")
            routing = routing._replace(lut=first_blocks.expand_as(routing.lut).contiguous())
        sets.append(dict(q=q, k=k, v=v, **routing._asdict(), proj_weight=weight,
                         proj_bias=bias))
    shape = call_shape(sets[0]["q"], sets[0]["k"], s, False,
                       (sets[0]["lut"].shape[-1], sets[0]["neg_lut"].shape[-1]))
    phases = [attention_plan(target, shape, {"forward": knobs}).forward for knobs in candidates]
    compile_steps(phases, "forward")
    runs = kept_runs(phases[0], sets, device)

    def sdpa(env):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(env["q"], env["k"], env["v"])

    n_kv = spec.num_blocks(length, bkv)
    density = spec.num_critical(args.topk, n_kv) / n_kv
    sparse_flops = 4.0 * b * h * length * length * d * density
    with torch.no_grad():
        cudnn_ms = median_ms(sdpa, [(env,) for env in runs], args.repeats)
        rows = time_each(candidates, phases, "forward", "out", runs, args.repeats,
                         sparse_flops)
    cudnn_tflops = 4.0 * b * h * length**2 * d / cudnn_ms / 1e9
    print(f"B={b} H={h} L={length} D={d} bf16 topk={args.topk} (computed {density:.4f}) "
          f"linear={args.linear} blocks {bq}x{bkv} on {torch.cuda.get_device_name()}")
    print(f"  cuDNN dense {cudnn_ms:.3f} ms, {cudnn_tflops:.0f} TFLOP/s")
    print_rows(rows, cudnn_tflops, "cuDNN")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=describe_environment(), args=vars(args), density=density,
                           cudnn_ms=cudnn_ms, schedules=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
