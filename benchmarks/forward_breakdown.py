"""Where the forward's time goes: routing, key pass and the fused kernel, beside cuDNN SDPA.

    python -m sla_tl.benchmarks.forward_breakdown [--topk 0.05] [--out result.json]

All parts are timed in one run at the Wan2.1-1.3B shape (B=1, H=12, L=32760, D=128, bf16),
block_q=128, block_kv=64, on fresh random inputs (query_block_states serves linear=marginal).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla_tl import block_states, kernels, spec, tilelang_backend
from sla_tl.settings import Settings
from sla_tl.timing import median_ms

from .environment import describe_environment


def main(argv: list[str] | None = None) -> int:
    """Time the parts of the forward and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--linear", default="marginal", choices=("marginal", "global"))
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-kv", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    b, h, length, d = 1, args.heads, args.length, 128
    bq, bkv = args.block_q, args.block_kv
    s = Settings(bq, bkv, "softmax", args.linear, None, "bhsd")
    sets = []
    for _ in range(3):
        q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        weight = torch.randn(d, d, device="cuda") / d**0.5
        bias = torch.randn(d, device="cuda") * 0.1
        routing = tilelang_backend.route(q, k, args.topk, 0.0, bq, bkv, "bhsd")
        sets.append((q, k, v, weight, bias, routing))
    arch = kernels.arch_of(sets[0][0].device)
    fused = kernels.forward_kernel(d, bq, bkv, "bfloat16", "softmax", "bhsd", d**-0.5, arch)

    def sdpa(q, k, v, *_):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, v)

    def route(q, k, *_):
        tilelang_backend.route(q, k, args.topk, 0.0, bq, bkv, "bhsd")

    def key_pass(q, k, v, *_):
        tilelang_backend._key_states(k, v, s, arch)

    n_q, n_kv = spec.num_blocks(length, bq), spec.num_blocks(length, bkv)
    states = [tilelang_backend._key_states(x[1], x[2], s, arch) for x in sets]
    query_block_states = []
    fused_inputs = []
    for (q, k, v, weight, bias, r), (hb, zb, hg) in zip(sets, states, strict=True):
        h_rows = q.new_empty(b, h, n_q, d, d)
        z_rows = torch.empty(b, h, n_q, d, device="cuda")
        if args.linear == "global":
            h_rows = hg.sum(dim=2, keepdim=True).to(q.dtype)
            z_rows = zb.sum(dim=2, keepdim=True)
        else:
            query_block_states.append((hb, zb, r, h_rows, z_rows))
            block_states.query_states(hb, zb, r, h_rows, z_rows)
        fused_inputs.append((q, k, v, r.lut, r.lut_count, h_rows, z_rows,
                             tilelang_backend._active(r, n_kv, args.linear),
                             weight.bfloat16(), bias,
                             torch.empty_like(q), torch.empty_like(q),
                             torch.empty(b, h, length, device="cuda")))

    def whole(q, k, v, weight, bias, r):
        tilelang_backend.forward(q, k, v, tilelang_backend.route(q, k, args.topk, 0.0, bq, bkv,
                                                                 "bhsd"), weight, bias, s)

    with torch.no_grad():
        timings = {
            "sdpa_cudnn": median_ms(sdpa, sets, args.repeats),
            "route": median_ms(route, sets, args.repeats),
            "key_pass": median_ms(key_pass, sets, args.repeats),
            **({"query_block_states": median_ms(block_states.query_states, query_block_states,
                                                args.repeats)} if query_block_states else {}),
            "fused_kernel": median_ms(fused, fused_inputs, args.repeats),
            "whole_forward": median_ms(whole, sets, args.repeats),
        }
    density = spec.num_critical(args.topk, n_kv) / n_kv
    sparse_flops = 4.0 * b * h * length * length * d * density
    print(f"B={b} H={h} L={length} D={d} bf16 topk={args.topk} (computed {density:.4f}) "
          f"linear={args.linear} blocks {bq}x{bkv} on {torch.cuda.get_device_name()}")
    for name, ms in timings.items():
        print(f"  {name:<14} {ms:8.3f} ms")
    cudnn_tflops = 4.0 * b * h * length**2 * d / timings["sdpa_cudnn"] / 1e9
    fused_tflops = sparse_flops / timings["fused_kernel"] / 1e9
    print(f"  cuDNN dense {cudnn_tflops:.0f} TFLOP/s; fused kernel {fused_tflops:.0f} TFLOP/s "
          f"per computed block ({fused_tflops / cudnn_tflops:.0%} of cuDNN); "
          f"speedup of the whole forward {timings['sdpa_cudnn'] / timings['whole_forward']:.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=describe_environment(), args=vars(args),
                           density=density, timings_ms=timings), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
