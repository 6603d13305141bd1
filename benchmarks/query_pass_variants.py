"""The backward's query pass under each schedule the autotuner may pick, timed alone.

    python -m sla_tl.benchmarks.query_pass_variants [--topk 0.05] [--linear marginal] [--out r.json]

At the Wan2.1-1.3B shape (B=1, H=12, L=32760, D=128, bf16) by default, blocks 128x64, on
fresh random inputs with their own routing and forward. Per schedule: median ms of the query
pass alone, the rate at which it moves the bytes it must (it has no loop: q, dO, O and O_l
read, dQ and G_i written, six tiles per query block; H_i is not counted), and whether its dQ
is the default schedule's bit for bit (the tuner's choices must be).
"""

from __future__ import annotations

import argparse

import torch

from sla_tl import kernels, spec
from sla_tl.plan import attention_plan, call_shape
from sla_tl.settings import Settings
from sla_tl.targets import target_of

from .plan_steps import kept_runs
from .schedule_variants import (
    add_shape_arguments,
    backward_inputs,
    bandwidth_report,
    compile_steps,
    time_each,
)


def query_pass_bytes(batch: int, heads: int, length: int, dim: int, block_q: int) -> float:
    """Bytes the query pass must move at least: six 16-bit tiles per query block (q, dO, O,
    O_l read; dQ and G_i written)."""
    return 6.0 * batch * heads * spec.num_blocks(length, block_q) * block_q * dim * 2


def main(argv: list[str] | None = None) -> int:
    """Time every query-pass schedule and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    args = parser.parse_args(argv)
    b, h, length, d = 1, args.heads, args.length, args.dim
    bq, bkv = args.block_q, args.block_kv
    s = Settings(block_q=bq, block_kv=bkv, linear=args.linear)
    device = torch.device("cuda")
    target = target_of(device)
    candidates = kernels.every_schedule(target.arch.target, "backward_query", d, bq, bkv)
    inputs = backward_inputs(args, s)
    shape = call_shape(inputs[0]["q"], inputs[0]["k"], s, False,
                       (inputs[0]["lut"].shape[-1], inputs[0]["neg_lut"].shape[-1]))
    phases = [attention_plan(target, shape, {"backward_query": knobs}).backward
              for knobs in candidates]
    compile_steps(phases, "backward_query")
    runs = kept_runs(phases[0], inputs, device)
    moved = query_pass_bytes(b, h, length, d, bq)
    with torch.no_grad():
        # time_each's rate is flop / ms / 1e9: given bytes, it reads as GB/s / 1000.
        rows = time_each(candidates, phases, "backward_query", "dq", runs, args.repeats, moved)
    print(f"B={b} H={h} L={length} D={d} bf16 topk={args.topk} linear={args.linear} "
          f"blocks {bq}x{bkv} on {torch.cuda.get_device_name()}")
    bandwidth_report(rows, args, moved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
