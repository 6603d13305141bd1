"""The backward's dQ kernel under each schedule the autotuner may pick and each alternative,
beside cuDNN SDPA's dense backward.

    python -m sla_tl.benchmarks.dq_variants [--topk 0.05] [--linear marginal] [--out r.json]

At the Wan2.1-1.3B shape (B=1, H=12, L=32760, D=128, bf16) by default, blocks 128x64, on
fresh random inputs with their own routing and forward. Per schedule: median ms of the dQ
kernel alone (its inputs, from the forward and the query pass, prepared once), TFLOP/s per
computed block (3 GEMMs per (query block, critical key block) pair: S = Q K^T, dP = dO V^T
and dQ += dS K, 2 x block_q x block_kv x D flop each), and how its dQ compares with the
default schedule's (bit-identical, or the largest difference). The tuner's choices must be
bit-identical; the alternatives listed last (the hand-written kernel) may round differently.
cuDNN's rate is its dense backward alone (5 GEMMs of 2 L^2 D flop per head: S recomputed,
dP, dV, dK, dQ).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla_tl import kernels, spec
from sla_tl.plan import attention_plan, call_shape
from sla_tl.settings import Settings
from sla_tl.targets import target_of
from sla_tl.timing import median_ms

from .environment import describe_environment
from .plan_steps import kept_runs
from .schedule_variants import (
    add_shape_arguments,
    backward_inputs,
    compile_steps,
    print_rows,
    time_each,
)


def dq_flops(batch: int, heads: int, length: int, dim: int, density: float) -> float:
    """Flop of the dQ kernel over the computed blocks: 3 GEMMs of 2 L^2 D a head, times the
    share of key blocks computed."""
    return 6.0 * batch * heads * length * length * dim * density


def main(argv: list[str] | None = None) -> int:
    """Time every dQ schedule and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    args = parser.parse_args(argv)
    b, h, length, d = 1, args.heads, args.length, args.dim
    bq, bkv = args.block_q, args.block_kv
    s = Settings(block_q=bq, block_kv=bkv, linear=args.linear)
    device = torch.device("cuda")
    target = target_of(device)
    candidates = kernels.every_schedule(target.arch.target, "backward_dq", d, bq, bkv)

    n_kv = spec.num_blocks(length, bkv)
    inputs = backward_inputs(args, s)
    shape = call_shape(inputs[0]["q"], inputs[0]["k"], s, False,
                       (inputs[0]["lut"].shape[-1], inputs[0]["neg_lut"].shape[-1]))
    phases = [attention_plan(target, shape, {"backward_dq": knobs}).backward
              for knobs in candidates]
    compile_steps(phases, "backward_dq")
    runs = kept_runs(phases[0], inputs, device)
    # The query pass leaves the linear part of dQ, which the dQ kernel adds to.
    linear_parts = []
    for env in runs:
        phases[0].run_step("backward_query", env)
        linear_parts.append(env["dq"].clone())

    def sdpa_backward(out, tensors, grad):
        torch.autograd.grad(out, tensors, grad, retain_graph=True)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_sets = []
        for env in runs[:2]:
            tensors = tuple(env[n].detach().requires_grad_() for n in ("q", "k", "v"))
            dense_sets.append((F.scaled_dot_product_attention(*tensors), tensors,
                               env["grad_out"]))
        cudnn_ms = median_ms(sdpa_backward, dense_sets, args.repeats)
    del dense_sets

    density = spec.num_critical(args.topk, n_kv) / n_kv
    flops = dq_flops(b, h, length, d, density)

    def linear_part() -> None:
        runs[0]["dq"].copy_(linear_parts[0])

    with torch.no_grad():
        # Each call adds to the dq it is given: the timed calls' sums are discarded.
        rows = time_each(candidates, phases, "backward_dq", "dq", runs, args.repeats, flops,
                         before_output=linear_part)
    cudnn_tflops = 10.0 * b * h * length**2 * d / cudnn_ms / 1e9
    print(f"B={b} H={h} L={length} D={d} bf16 topk={args.topk} (computed {density:.4f}) "
          f"linear={args.linear} blocks {bq}x{bkv} on {torch.cuda.get_device_name()}")
    print(f"  cuDNN dense backward {cudnn_ms:.3f} ms, {cudnn_tflops:.0f} TFLOP/s")
    print_rows(rows, cudnn_tflops, "cuDNN's backward")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=describe_environment(), args=vars(args), density=density,
                           cudnn_backward_ms=cudnn_ms, schedules=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
