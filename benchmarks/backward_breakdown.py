"""Where the backward's time goes, step by step of its plan, beside cuDNN SDPA's backward.

    python -m sla_tl.benchmarks.backward_breakdown [--topk 0.05] [--fusion key_major_kernel]
        [--knob backward_query.loads=tma] [--out result.json]

Timed in one run at the Wan2.1-1.3B shape (B=1, H=12, L=32760, D=128, bf16), on fresh
random inputs, with the forward's outputs computed once per input set: each step of the
backward's plan alone (kernels and torch steps, on the tensors of one earlier run), and the
whole backward. Each dK/dV alternative schedule (candidates for the default, see
`backward_dkdv.alternatives`) is timed on the same tensors, with its largest difference
from the default's dK. What the backward derives from the routing is derived afresh in
every step, as after a call that routes (`sla::attention`). `--fusion` runs a fusion of the
backward's steps (`sla_tl.plan.FUSIONS`) in the plan; `--knob` sets a schedule knob; with
any, every other knob takes its default (the tuned store is not read).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla_tl import kernels, spec, tilelang_backend
from sla_tl.plan import FUSIONS, attention_plan, call_shape
from sla_tl.settings import Settings
from sla_tl.targets import target_of
from sla_tl.timing import median_ms

from .environment import describe_environment
from .plan_steps import kept_runs, step_times_ms
from .schedule_variants import knob_setting, schedule_of


def main(argv: list[str] | None = None) -> int:
    """Time the parts of the backward and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--linear", default="marginal", choices=("marginal", "global"))
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-kv", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--fusion", action="append", default=[],
                        choices=[n for n, f in FUSIONS.items() if f.phase == "backward"],
                        help="a fusion of the backward's steps, repeatable (default: none)")
    parser.add_argument("--knob", action="append", default=[], type=knob_setting,
                        metavar="KERNEL.KNOB=VALUE",
                        help="a schedule knob over the defaults, repeatable (e.g. "
                             "backward_query.loads=tma)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    fusions = tuple(args.fusion)
    schedule = schedule_of(args.knob) or None
    b, h, length, d = 1, 12, args.length, 128
    bq, bkv = args.block_q, args.block_kv
    s = Settings(block_q=bq, block_kv=bkv, linear=args.linear)
    device = torch.device("cuda")
    target = target_of(device)
    n_kv = spec.num_blocks(length, bkv)
    sets = []
    for _ in range(3):
        q, k, v, grad = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
        weight = torch.randn(d, d, device="cuda") / d**0.5
        bias = torch.randn(d, device="cuda") * 0.1
        routing = tilelang_backend.route(q, k, args.topk, 0.0, bq, bkv, "bhsd")
        saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s, keep_routing=False)
        sets.append((q, k, v, grad, weight, bias, routing, saved))
    shape = call_shape(sets[0][0], sets[0][1], s, False, sets[0][6].widths)
    backward = attention_plan(target, shape, schedule, keep_routing=False,
                              fusions=fusions).backward
    # The routing of each set is fresh: nothing derived from it is kept between the steps.
    runs = kept_runs(backward, [dict(grad_out=grad, q=q, k=k, v=v, **saved._asdict(),
                                     **routing._asdict(), proj_weight=weight, proj_bias=bias)
                                for q, k, v, grad, weight, bias, routing, saved in sets],
                     device)

    def sdpa_backward(q, k, v, grad, *_):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad)

    def whole(q, k, v, grad, weight, bias, routing, saved):
        tilelang_backend.backward(grad, q, k, v, saved, routing, weight, bias, s, schedule,
                                  keep_routing=False, fusions=fusions)

    grad_sets = [(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g)
                 for q, k, v, g, *_ in sets]
    timings = {"sdpa_cudnn_fwd_bwd": median_ms(sdpa_backward, grad_sets, args.repeats)}
    with torch.no_grad():
        timings.update({f"backward.{name}": ms for name, ms in
                        step_times_ms(backward, runs, args.repeats).items()})
        timings["whole_backward"] = median_ms(whole, sets, args.repeats)
        # Each dK/dV alternative (another rounding: candidates for the default), timed on
        # the same tensors, with its largest difference from the default's output.
        alternatives = {}
        backward.run_step("backward_dkdv", runs[0])
        reference_dk = runs[0]["dk"].clone()
        for knobs in kernels.alternatives(target.arch.target, "backward_dkdv", d, bq, bkv):
            name = "backward_dkdv[" + ",".join(f"{k}={v}" for k, v in knobs.items()) + "]"
            variant = attention_plan(target, shape, {**(schedule or {}), "backward_dkdv": knobs},
                                     keep_routing=False, fusions=fusions).backward
            timings[name] = median_ms(lambda env, variant=variant:
                                      variant.run_step("backward_dkdv", env),
                                      [(env,) for env in runs], args.repeats)
            variant.run_step("backward_dkdv", runs[0])
            diff = (runs[0]["dk"].float() - reference_dk.float()).abs().max().item()
            alternatives[name] = dict(knobs=knobs, max_abs_diff_dk_to_default=diff)
    density = spec.num_critical(args.topk, n_kv) / n_kv
    print(f"B={b} H={h} L={length} D={d} bf16 topk={args.topk} (computed {density:.4f}) "
          f"linear={args.linear} blocks {bq}x{bkv} fusions {','.join(fusions) or 'none'} on "
          f"{torch.cuda.get_device_name()}")
    for name, ms in timings.items():
        note = alternatives.get(name)
        extra = f"  (max |dK - default| {note['max_abs_diff_dk_to_default']:.2e})" if note else ""
        print(f"  {name:<30} {ms:8.3f} ms{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=describe_environment(), args=vars(args),
                           density=density, timings_ms=timings, alternatives=alternatives),
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
