"""Where the forward's time goes, step by step of its plan, beside cuDNN SDPA.

    python -m sla_tl.benchmarks.forward_breakdown [--topk 0.05] [--selection kernel]
        [--fusion pooled_keys ... | --all-fusions] [--out result.json]

All parts are timed in one run at the Wan2.1-1.3B shape (B=1, H=12, L=32760, D=128, bf16),
block_q=128, block_kv=64, on fresh random inputs: each step of the plan of a call that
routes (`sla::attention`: routing, then the forward, with the fusions asked for; see
`sla_tl.plan`) alone, on the tensors of one earlier run, and the whole of it. A routing is
derived afresh in every step, as in such a call.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla_tl import plan, spec, tilelang_backend
from sla_tl.plan import call_shape, routed_plan
from sla_tl.settings import Settings
from sla_tl.targets import target_of
from sla_tl.timing import median_ms

from .environment import describe_environment
from .plan_steps import kept_runs, step_times_ms


def main(argv: list[str] | None = None) -> int:
    """Time the parts of the forward and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--linear", default="marginal", choices=("marginal", "global"))
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-kv", type=int, default=64)
    parser.add_argument("--selection", default=None, choices=plan.SELECTIONS,
                        help="how routing selects (default: the library's default)")
    forward_fusions = [n for n, f in plan.FUSIONS.items() if f.phase == "routed_forward"]
    parser.add_argument("--fusion", action="append", choices=forward_fusions,
                        help="a fusion of the routed forward to run, repeatable (default: the "
                        "default fusions)")
    parser.add_argument("--all-fusions", action="store_true",
                        help="every fusion of the routed forward that can serve the call "
                        "(its selection and linear mode)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    b, h, length, d = 1, args.heads, args.length, 128
    bq, bkv = args.block_q, args.block_kv
    s = Settings(block_q=bq, block_kv=bkv, linear=args.linear)
    device = torch.device("cuda")
    sets = []
    for _ in range(3):
        q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        weight = torch.randn(d, d, device="cuda") / d**0.5
        bias = torch.randn(d, device="cuda") * 0.1
        sets.append((q, k, v, weight, bias))
    n_kv = spec.num_blocks(length, bkv)
    n_crit = spec.num_critical(args.topk, n_kv)
    shape = call_shape(sets[0][0], sets[0][1], s, False, (n_crit, 0))
    args.selection = plan.resolve_selection(target_of(device), shape, args.selection)
    if args.fusion is None and not args.all_fusions:
        args.fusion = list(plan.default_fusions(target_of(device), shape, args.selection))
    if args.all_fusions:
        args.fusion = [n for n in plan.fusions_serving(shape, args.selection)
                       if n in forward_fusions]
    routed = routed_plan(target_of(device), shape, selection=args.selection,
                         fusions=args.fusion).forward
    runs = kept_runs(routed, [dict(q=q, k=k, v=v, proj_weight=w, proj_bias=bias)
                              for q, k, v, w, bias in sets], device)

    def sdpa(q, k, v, *_):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, v)

    def whole(q, k, v, weight, bias):
        tilelang_backend.routed_forward(q, k, v, weight, bias, args.topk, 0.0, s,
                                        selection=args.selection, fusions=args.fusion)

    with torch.no_grad():
        timings = {"sdpa_cudnn": median_ms(sdpa, sets, args.repeats)}
        timings.update({f"step.{name}": ms for name, ms in
                        step_times_ms(routed, runs, args.repeats).items()})
        timings["whole_forward"] = median_ms(whole, sets, args.repeats)
    density = n_crit / n_kv
    sparse_flops = 4.0 * b * h * length * length * d * density
    print(f"B={b} H={h} L={length} D={d} bf16 topk={args.topk} (computed {density:.4f}) "
          f"linear={args.linear} blocks {bq}x{bkv} selection={args.selection} fusions="
          f"{','.join(args.fusion) or 'none'} "
          f"on {torch.cuda.get_device_name()}")
    for name, ms in timings.items():
        print(f"  {name:<30} {ms:8.3f} ms")
    cudnn_tflops = 4.0 * b * h * length**2 * d / timings["sdpa_cudnn"] / 1e9
    fused_tflops = sparse_flops / timings["step.forward"] / 1e9
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
