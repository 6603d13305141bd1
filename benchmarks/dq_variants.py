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
import itertools
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla_tl import kernels, spec, tilelang_backend
from sla_tl.schedules.sm90 import backward_dq as dq_schedule
from sla_tl.settings import Settings
from sla_tl.timing import median_ms
from sla_tl.warm import compile_in_parallel, kernels_for_call

from .environment import describe_environment


def schedules(dim: int, block_q: int, block_kv: int) -> list[dict]:
    """The default schedule first, then every other combination of dQ's searched knobs,
    then the alternatives that may round differently (candidates for the default)."""
    space = kernels.search_space("backward_dq", dim, block_q, block_kv)
    default = kernels.default_knobs("backward_dq", dim, block_q, block_kv)
    names = sorted(space)
    first = {n: default[n] for n in names}
    combos = [dict(zip(names, values, strict=True))
              for values in itertools.product(*(space[n] for n in names))]
    return ([first] + [c for c in combos if c != first]
            + dq_schedule.alternatives(dim, block_q, block_kv))


def label(knobs: dict) -> str:
    """A schedule's knobs as text."""
    return ",".join(f"{name}={value}" for name, value in knobs.items())


def dq_flops(batch: int, heads: int, length: int, dim: int, density: float) -> float:
    """Flop of the dQ kernel over the computed blocks: 3 GEMMs of 2 L^2 D a head, times the
    share of key blocks computed."""
    return 6.0 * batch * heads * length * length * dim * density


def main(argv: list[str] | None = None) -> int:
    """Time every dQ schedule and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--linear", default="marginal", choices=("marginal", "global"))
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-kv", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    b, h, length, d = 1, args.heads, args.length, args.dim
    bq, bkv = args.block_q, args.block_kv
    s = Settings(bq, bkv, "softmax", args.linear, None, "bhsd")
    arch = kernels.arch_of(torch.device("cuda"))
    scale = d**-0.5
    candidates = schedules(d, bq, bkv)
    specs = [x for knobs in candidates
             for x in kernels_for_call(d, "bfloat16", s, arch, schedule={"backward_dq": knobs})]
    start = time.perf_counter()
    try:
        compile_in_parallel(specs)
    except RuntimeError as error:  # a schedule that cannot be built is reported, not timed
        print(error)
    print(f"compiled {len(set(specs))} kernels in {time.perf_counter() - start:.0f} s",
          flush=True)

    n_q, n_kv = spec.num_blocks(length, bq), spec.num_blocks(length, bkv)
    query = kernels.backward_query_kernel(d, bq, "bfloat16", "softmax", "bhsd", arch)
    sets, linear_parts = [], []
    print("preparing inputs", flush=True)
    for _ in range(3):
        q, k, v, grad = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
        weight = torch.randn(d, d, device="cuda") / d**0.5
        bias = torch.randn(d, device="cuda") * 0.1
        routing = tilelang_backend.route(q, k, args.topk, 0.0, bq, bkv, "bhsd")
        saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s)
        # The query pass gives delta and the linear part of dQ, which the dQ kernel adds to.
        delta = torch.empty(b, h, length, device="cuda")
        dq = torch.empty_like(q)
        query(q, grad, saved.out, saved.linear, weight.bfloat16(), bias, saved.h_rows,
              saved.z_rows, tilelang_backend._active(routing, n_kv, args.linear), delta,
              q.new_empty(b, h, n_q, d, d), torch.empty(b, h, n_q, d, device="cuda"), dq)
        linear_parts.append(dq.clone())
        sets.append((q, k, v, grad, saved.lse, delta, routing.lut.contiguous(),
                     routing.lut_count.contiguous(), dq))

    def sdpa_backward(out, inputs, grad):
        torch.autograd.grad(out, inputs, grad, retain_graph=True)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_sets = []
        for q, k, v, grad, *_ in sets[:2]:
            inputs = tuple(t.detach().requires_grad_() for t in (q, k, v))
            dense_sets.append((F.scaled_dot_product_attention(*inputs), inputs, grad))
        cudnn_ms = median_ms(sdpa_backward, dense_sets, args.repeats)
    del dense_sets

    density = spec.num_critical(args.topk, n_kv) / n_kv
    flops = dq_flops(b, h, length, d, density)
    rows = []
    first_dq = None
    with torch.no_grad():
        for knobs in candidates:
            try:
                kernel = kernels.backward_dq_kernel(d, bq, bkv, "bfloat16", "bhsd", scale, arch,
                                                    kernels.freeze(knobs))
            except Exception as error:  # noqa: BLE001  (a schedule that cannot be built)
                rows.append(dict(knobs=knobs, error=f"{type(error).__name__}: {error}"[:200]))
                continue
            print("timing", label(knobs), flush=True)
            # Each call adds to the dq it is given: the timed calls' sums are discarded.
            ms = median_ms(kernel, sets, args.repeats)
            dq = sets[0][-1]
            dq.copy_(linear_parts[0])
            kernel(*sets[0])
            out = dq.clone()
            if first_dq is None:
                first_dq = out
            same = torch.equal(out, first_dq)
            diff = (out.float() - first_dq.float()).abs().max().item()
            rows.append(dict(knobs=knobs, ms=ms, tflops=flops / ms / 1e9,
                             bit_identical_to_first=same, max_abs_diff_to_first=diff))
    cudnn_tflops = 10.0 * b * h * length**2 * d / cudnn_ms / 1e9
    print(f"B={b} H={h} L={length} D={d} bf16 topk={args.topk} (computed {density:.4f}) "
          f"linear={args.linear} blocks {bq}x{bkv} on {torch.cuda.get_device_name()}")
    print(f"  cuDNN dense backward {cudnn_ms:.3f} ms, {cudnn_tflops:.0f} TFLOP/s")
    for row in rows:
        if "error" in row:
            print(f"  {label(row['knobs']):<50} {row['error']}")
            continue
        print(f"  {label(row['knobs']):<50} {row['ms']:7.3f} ms {row['tflops']:5.0f} TFLOP/s "
              f"({row['tflops'] / cudnn_tflops:4.0%} of cuDNN's backward) "
              f"{'=' if row['bit_identical_to_first'] else '~'}first "
              f"(max diff {row['max_abs_diff_to_first']:.2e})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=describe_environment(), args=vars(args), density=density,
                           cudnn_backward_ms=cudnn_ms, schedules=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
