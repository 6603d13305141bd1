"""The key pass under each of its schedules, timed alone, as a routed call runs it.

    python -m sla_tl.benchmarks.key_pass_variants [--topk 0.05] [--linear marginal] [--out r.json]

At the Wan2.1-1.3B shape (B=1, H=12, L=32760, D=128, bf16) by default, blocks 128x64, on
fresh random inputs. The schedules are every one the autotuner may pick in that linear mode
(`sla_tl.kernels.searched_schedules`, the default first), then the alternatives that round
differently. Per schedule: median ms of the key pass alone, the rate at which it moves the
bytes it must (K and V read, h_j and z_j written), and whether its h_j are the default
schedule's bit for bit.
"""

from __future__ import annotations

import argparse

import torch

from sla_tl import kernels, spec
from sla_tl.plan import call_shape, routed_plan
from sla_tl.settings import Settings
from sla_tl.targets import target_of

from .plan_steps import kept_runs
from .schedule_variants import add_shape_arguments, bandwidth_report, compile_steps, time_each


def key_pass_bytes(batch: int, heads: int, length: int, dim: int, block_kv: int,
                   marginal: bool) -> float:
    """Bytes the key pass must move at least: K and V read (16-bit), and per key block its
    h_j (16-bit, "marginal" mode only) and z_j (float32) written."""
    blocks = batch * heads * spec.num_blocks(length, block_kv)
    h_bytes = dim * dim * 2 if marginal else 0
    return 2.0 * batch * heads * length * dim * 2 + blocks * (h_bytes + dim * 4)


def main(argv: list[str] | None = None) -> int:
    """Time every key-pass schedule and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    args = parser.parse_args(argv)
    b, h, length, d = 1, args.heads, args.length, args.dim
    bq, bkv = args.block_q, args.block_kv
    s = Settings(block_q=bq, block_kv=bkv, linear=args.linear)
    device = torch.device("cuda")
    target = target_of(device)
    inputs = []
    for _ in range(3):
        q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        inputs.append(dict(q=q, k=k, v=v, proj_weight=torch.randn(d, d, device="cuda") / d**0.5,
                           proj_bias=torch.randn(d, device="cuda") * 0.1))
    n_kv = spec.num_blocks(length, bkv)
    shape = call_shape(inputs[0]["q"], inputs[0]["k"], s, False,
                       (spec.num_critical(args.topk, n_kv), 0))
    arch = target.arch.target
    candidates = (kernels.searched_schedules(arch, "key_pass", d, bq, bkv, args.linear)
                  + kernels.alternatives(arch, "key_pass", d, bq, bkv))
    phases = [routed_plan(target, shape, {"key_pass": knobs}).forward for knobs in candidates]
    compile_steps(phases, "key_pass")
    runs = kept_runs(phases[0], inputs, device)
    marginal = args.linear == "marginal"
    moved = key_pass_bytes(b, h, length, d, bkv, marginal)
    output = "h_block" if marginal else "h_group"
    with torch.no_grad():
        # time_each's rate is flop / ms / 1e9: given bytes, it reads as GB/s / 1000.
        rows = time_each(candidates, phases, "key_pass", output, runs, args.repeats, moved)
    print(f"B={b} H={h} L={length} D={d} bf16 linear={args.linear} blocks {bq}x{bkv} "
          f"on {torch.cuda.get_device_name()}")
    bandwidth_report(rows, args, moved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
