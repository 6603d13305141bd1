"""Where the backward's time goes, kernel by kernel, beside cuDNN SDPA's backward.

    python -m sla_tl.benchmarks.backward_breakdown [--topk 0.05] [--out result.json]

Timed in one run at the Wan2.1-1.3B shape (B=1, H=12, L=32760, D=128, bf16), on fresh
random inputs, with the forward's outputs computed once per input set. Each dK/dV
alternative schedule (candidates for the default, see `backward_dkdv.alternatives`) is timed
on the same inputs, with its largest difference from the default's dK.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla_tl import block_states, kernels, spec, tilelang_backend
from sla_tl.schedules.sm90 import backward_dkdv as dkdv_schedule
from sla_tl.settings import Settings
from sla_tl.timing import median_ms

from .environment import describe_environment


def main(argv: list[str] | None = None) -> int:
    """Time the parts of the backward and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--linear", default="marginal", choices=("marginal", "global"))
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-kv", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    b, h, length, d = 1, 12, args.length, 128
    bq, bkv = args.block_q, args.block_kv
    s = Settings(bq, bkv, "softmax", args.linear, None, "bhsd")
    arch = kernels.arch_of(torch.device("cuda"))
    scale = d**-0.5
    n_q, n_kv = spec.num_blocks(length, bq), spec.num_blocks(length, bkv)
    sets = []
    for _ in range(3):
        q, k, v, grad = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
        weight = torch.randn(d, d, device="cuda") / d**0.5
        bias = torch.randn(d, device="cuda") * 0.1
        routing = tilelang_backend.route(q, k, args.topk, 0.0, bq, bkv, "bhsd")
        saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s)
        sets.append((q, k, v, grad, weight, bias, routing, saved))

    query = kernels.backward_query_kernel(d, bq, "bfloat16", "softmax", "bhsd", arch)
    dq_kernel = kernels.backward_dq_kernel(d, bq, bkv, "bfloat16", "bhsd", scale, arch)
    dkdv = kernels.backward_dkdv_kernel(d, bq, bkv, "bfloat16", "softmax", "bhsd", scale, arch)

    def buffers(q):
        return (torch.empty(b, h, length, device="cuda"), q.new_empty(b, h, n_q, d, d),
                torch.empty(b, h, n_q, d, device="cuda"), torch.empty_like(q))

    staged = []
    for q, k, v, grad, weight, bias, routing, saved in sets:
        delta, g_rows, gz_rows, dq = buffers(q)
        active = torch.ones_like(routing.lut_count)
        query(q, grad, saved.out, saved.linear, weight.bfloat16(), bias, saved.h_rows,
              saved.z_rows, active, delta, g_rows, gz_rows, dq)
        reverse = tilelang_backend.reverse_lut(routing.lut, routing.lut_count, n_kv)
        key_block_args = (g_rows, gz_rows, routing, n_kv, args.linear)
        dh, dz = block_states.key_states(*key_block_args)
        staged.append(dict(
            query=(q, grad, saved.out, saved.linear, weight.bfloat16(), bias, saved.h_rows,
                   saved.z_rows, active, delta, g_rows, gz_rows, dq),
            dq=(q, k, v, grad, saved.lse, delta, routing.lut, routing.lut_count, dq),
            dkdv=(q, k, v, grad, saved.lse, delta, *reverse, dh, dz, torch.empty_like(k),
                  torch.empty_like(v)),
            key_states=key_block_args,
            reverse=(routing.lut, routing.lut_count, n_kv),
        ))

    def sdpa_backward(q, k, v, grad, *_):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad)

    def whole(q, k, v, grad, weight, bias, routing, saved):
        tilelang_backend.backward(grad, q, k, v, saved, routing, weight, bias, s)

    grad_sets = [(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g)
                 for q, k, v, g, *_ in sets]
    timings = {"sdpa_cudnn_fwd_bwd": median_ms(sdpa_backward, grad_sets, args.repeats)}
    with torch.no_grad():
        timings.update({
            "query_pass": median_ms(lambda x: query(*x["query"]), [(x,) for x in staged],
                                    args.repeats),
            "dq_kernel": median_ms(lambda x: dq_kernel(*x["dq"]), [(x,) for x in staged],
                                   args.repeats),
            "reverse_lut": median_ms(lambda x: tilelang_backend.reverse_lut(*x["reverse"]),
                                     [(x,) for x in staged], args.repeats),
            "key_block_states": median_ms(lambda x: block_states.key_states(*x["key_states"]),
                                          [(x,) for x in staged], args.repeats),
            "dkdv_kernel": median_ms(lambda x: dkdv(*x["dkdv"]), [(x,) for x in staged],
                                     args.repeats),
            "whole_backward": median_ms(whole, sets, args.repeats),
        })
        # Each dK/dV alternative (another rounding: candidates for the default), timed on
        # the same staged inputs, with its largest difference from the default's output.
        alternatives = {}
        reference_dk = staged[0]["dkdv"][-2]
        dkdv(*staged[0]["dkdv"])
        reference_dk = reference_dk.clone()
        for knobs in dkdv_schedule.alternatives(d, bq, bkv):
            name = "dkdv_kernel[" + ",".join(f"{k}={v}" for k, v in knobs.items()) + "]"
            variant = kernels.backward_dkdv_kernel(d, bq, bkv, "bfloat16", "softmax", "bhsd",
                                                   scale, arch, kernels.freeze(knobs))
            timings[name] = median_ms(lambda x, variant=variant: variant(*x["dkdv"]),
                                      [(x,) for x in staged], args.repeats)
            variant(*staged[0]["dkdv"])
            diff = (staged[0]["dkdv"][-2].float() - reference_dk.float()).abs().max().item()
            alternatives[name] = dict(knobs=knobs, max_abs_diff_dk_to_default=diff)
    density = spec.num_critical(args.topk, n_kv) / n_kv
    print(f"B={b} H={h} L={length} D={d} bf16 topk={args.topk} (computed {density:.4f}) "
          f"linear={args.linear} blocks {bq}x{bkv} on {torch.cuda.get_device_name()}")
    for name, ms in timings.items():
        note = alternatives.get(name)
        extra = f"  (max |dK - default| {note['max_abs_diff_dk_to_default']:.2e})" if note else ""
        print(f"  {name:<20} {ms:8.3f} ms{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=describe_environment(), args=vars(args),
                           density=density, timings_ms=timings, alternatives=alternatives),
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
