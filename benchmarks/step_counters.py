"""Run chosen kernels of a call's plan once each inside a CUDA profiler range, for `ncu`.

    ncu --profile-from-start off --set full -o counters \\
        python -m sla_tl.benchmarks.step_counters [--steps forward,backward_dkdv]

At the Wan2.1-1.3B shape (B=1, H=12, L=32760, D=128, bf16), blocks 128x64, on fresh random
inputs: the plan of a call that routes (default selection and fusions), one forward and
one backward kept, every step warmed up, then each step named in `--steps` run once
between `cudaProfilerStart` and `cudaProfilerStop`, so the profiler sees exactly those
launches, in that order (TileLang names every kernel `main_kernel`: the order is how a
report tells them apart). Prints the order.
"""

from __future__ import annotations

import argparse

import torch

from sla_tl import spec
from sla_tl.plan import call_shape, routed_plan
from sla_tl.settings import Settings
from sla_tl.targets import target_of


def main(argv: list[str] | None = None) -> int:
    """Warm the plan, then run the named steps once each in a profiler range."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="forward,backward_dkdv,backward_dq,backward_query",
                        help="comma-separated step names of the forward or the backward")
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--length", type=int, default=32760)
    parser.add_argument("--linear", default="marginal", choices=("marginal", "global"))
    args = parser.parse_args(argv)
    b, h, length, d = 1, 12, args.length, 128
    s = Settings(block_q=128, block_kv=64, linear=args.linear)
    device = torch.device("cuda")
    q, k, v, grad = (torch.randn(b, h, length, d, device=device, dtype=torch.bfloat16)
                     for _ in range(4))
    weight = torch.randn(d, d, device=device) / d**0.5
    bias = torch.randn(d, device=device) * 0.1
    n_crit = spec.num_critical(args.topk, spec.num_blocks(length, s.block_kv))
    plan = routed_plan(target_of(device), call_shape(q, k, s, False, (n_crit, 0)))
    phases = {"forward": plan.forward, "backward": plan.backward}
    steps = args.steps.split(",")
    owner = {}
    for name in steps:
        found = [p for p in phases.values() if any(st.name == name for st in p.steps)]
        if not found:
            known = sorted({st.name for p in phases.values() for st in p.steps})
            parser.error(f"--steps: no step {name!r}; the plan's steps are {', '.join(known)}")
        owner[name] = found[0]
    with torch.no_grad():
        forward_env = plan.forward.run(dict(q=q, k=k, v=v, proj_weight=weight, proj_bias=bias),
                                       device, keep=True)
        backward_env = plan.backward.run(
            {name: t for name, t in {**forward_env, "grad_out": grad}.items()
             if name in plan.backward.inputs}, device, keep=True)
        envs = {"forward": forward_env, "backward": backward_env}
        env_of = {name: envs[phase.name.removeprefix("routed_")] for name, phase in owner.items()}
        for _ in range(3):
            for name in steps:
                owner[name].run_step(name, env_of[name])
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for name in steps:
            owner[name].run_step(name, env_of[name])
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    for index, name in enumerate(steps):
        kernel = owner[name].step(name).kernel
        print(f"profiled launch {index}: {name} ({kernel.kind if kernel else 'torch ops'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
