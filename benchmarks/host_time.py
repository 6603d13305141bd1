"""The host's time per eager call of `sla.attention`, and per launch of each step, on the GPU.

    python -m sla_tl.benchmarks.host_time [--shape 1,12,9360,128] [--calls 200] [--out r.json]

At each shape (default: the suite's shortest Wan2.1-1.3B length, L=9360, and a small call,
L=1024 with one head) on fresh random inputs, blocks 128x64, topk 0.05:

- the forward and the forward+backward as called, back to back, `--calls` of them, then
  one synchronize: the wall time per call is the host's where the host is slower than the
  GPU (the host enqueues, the GPU keeps up), else the GPU's;
- the same call replayed from a CUDA graph: the GPU's time alone;
- the eager forward entered one layer lower each time, back to back the same way: the
  plan's run (`tilelang_backend.routed_forward`), the building block
  (`sla::routed_attention_fwd`: its checks and torch's dispatch on top), and the user's
  `sla_tl.attention` (the composite operator on top): the differences are each layer's
  host time, where the host is the slower; and the backward likewise, on one forward's
  saved tensors: the plan's run (`tilelang_backend.backward`) and the building block
  (`sla::attention_bwd`), against the backward through autograd (`fwd+bwd` less `fwd`);
- each step of the routed forward's plan, and of the backward's, launched alone, back to
  back (`Phase.run_step` on the tensors of a kept run), timed the same way: where its GPU
  work is the shorter (the small call), the host's time for a TileLang kernel's launch, or
  for a torch step's ops.

So `as called - replayed` is how far the host holds a call back, and the steps' sum says
where the host's time goes. With `--profile N`, the eager forward of each shape, and its
building block's backward, also run `--calls` times under cProfile: the N functions with
the most time of their own, in microseconds per call (cProfile's own cost inflates them
alike: read them as shares), so the time outside the steps is named by function.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections.abc import Callable

import torch

import sla_tl
from sla_tl import spec, tilelang_backend
from sla_tl.plan import attention_plan, call_shape, routed_plan
from sla_tl.routing import Routing
from sla_tl.settings import ForwardOutputs, Settings
from sla_tl.targets import target_of
from sla_tl.timing import graphed, median_ms, replay

from .environment import describe_environment
from .plan_steps import kept_runs

DEFAULT_SHAPES = ((1, 12, 9360, 128), (1, 1, 1024, 128))
TOPK = 0.05


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """`B,H,L,D` as four positive ints; argparse.ArgumentTypeError otherwise."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected B,H,L,D (positive integers), got {text!r}")
    b, h, length, d = (int(p) for p in parts)
    return b, h, length, d


def back_to_back_us(fn: Callable[[], object], calls: int) -> float:
    """Wall microseconds per call of `calls` calls of `fn` issued back to back, then one
    synchronize (after a warm-up of a tenth as many)."""
    for _ in range(max(1, calls // 10)):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def profiled(fn: Callable[[], object], calls: int, top: int) -> list[dict]:
    """The `top` functions by own time over `calls` calls of `fn` under cProfile (after a
    warm-up), per call: own and cumulative microseconds and the number of calls."""
    for _ in range(max(1, calls // 10)):
        fn()
    torch.cuda.synchronize()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profile).stats  # {(file, line, name): (prim, calls, own, cum, _)}
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [dict(function=f"{file.rsplit('/', 2)[-1] if '/' in file else file}:{line}({name})",
                 calls=n / calls, own_us=own / calls * 1e6, cumulative_us=cum / calls * 1e6)
            for (file, line, name), (_, n, own, cum, _) in rows]


def measure_shape(b: int, h: int, length: int, d: int, calls: int, top: int = 0) -> dict:
    """The figures of one shape (see the module's docstring)."""
    s = Settings(block_q=128, block_kv=64)
    q, k, v, grad = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    weight = torch.randn(d, d, device="cuda") / d**0.5
    bias = torch.randn(d, device="cuda") * 0.1
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward() -> None:
        with torch.no_grad():
            sla_tl.attention(q, k, v, weight, bias, topk=TOPK, block_q=128, block_kv=64)

    def forward_backward() -> None:
        out = sla_tl.attention(*leaves, weight, bias, topk=TOPK, block_q=128, block_kv=64)
        torch.autograd.grad(out, leaves, grad)

    def plan_run() -> None:
        tilelang_backend.routed_forward(q, k, v, weight, bias, TOPK, 0.0, s)

    def building_block() -> None:
        torch.ops.sla.routed_attention_fwd.default(q, k, v, weight, bias, TOPK, 0.0,
                                                   *s.op_args(), None)

    with torch.no_grad():
        made = torch.ops.sla.routed_attention_fwd.default(q, k, v, weight, bias, TOPK, 0.0,
                                                          *s.op_args(), None)
    saved, routing = ForwardOutputs(*made[:5]), Routing(*made[5:])

    def backward_plan_run() -> None:
        tilelang_backend.backward(grad, q, k, v, saved, routing, weight, bias, s)

    def backward_block() -> None:
        torch.ops.sla.attention_bwd.default(grad, q, k, v, *made, weight, bias, None,
                                            *s.op_args())

    row = dict(shape=[b, h, length, d])
    with torch.no_grad():
        row["layers_us"] = {name: back_to_back_us(fn, calls) for name, fn in (
            ("plan run", plan_run), ("sla::routed_attention_fwd", building_block),
            ("sla_tl.attention", forward), ("backward plan run", backward_plan_run),
            ("sla::attention_bwd", backward_block))}
    for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        (graph,), = graphed(fn, [()])
        row[name] = dict(as_called_us=back_to_back_us(fn, calls),
                         replayed_us=median_ms(replay, [(graph,)], calls) * 1e3)
    if top:
        row["profile"] = profiled(forward, calls, top)
        row["backward_profile"] = profiled(backward_block, calls, top)
    n_kv = spec.num_blocks(length, 64)
    shape = call_shape(q, k, s, False, (spec.num_critical(TOPK, n_kv), 0))
    phase = routed_plan(target_of(q.device), shape).forward
    env, = kept_runs(phase, [dict(q=q, k=k, v=v, proj_weight=weight, proj_bias=bias)],
                     q.device)
    backward = attention_plan(target_of(q.device), shape).backward  # what the op runs
    backward_env, = kept_runs(backward, [dict(
        grad_out=grad, q=q, k=k, v=v, **saved._asdict(), **routing._asdict(),
        proj_weight=weight, proj_bias=bias)], q.device)
    with torch.no_grad():
        row["steps_us"] = {step.name: back_to_back_us(
            lambda name=step.name: phase.run_step(name, env), calls) for step in phase.steps}
        row["backward_steps_us"] = {step.name: back_to_back_us(
            lambda name=step.name: backward.run_step(name, backward_env), calls)
            for step in backward.steps}
    return row


def main(argv: list[str] | None = None) -> int:
    """Measure every shape and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", type=parse_shape,
                        help="B,H,L,D, repeatable (default: 1,12,9360,128 and 1,1,1024,128)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile the eager forward: the N functions with the most "
                        "time of their own")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1; got {args.calls}")
    if args.profile < 0:
        parser.error(f"--profile must be 0 or more; got {args.profile}")
    rows = [measure_shape(*shape, args.calls, args.profile)
            for shape in args.shape or DEFAULT_SHAPES]
    print(f"bf16, blocks 128x64, topk {TOPK}, on {torch.cuda.get_device_name()}")
    for row in rows:
        print("B={} H={} L={} D={}".format(*row["shape"]))
        for mode in ("fwd", "fwd+bwd"):
            m = row[mode]
            print(f"  {mode:<8} as called {m['as_called_us']:8.1f} us, "
                  f"replayed {m['replayed_us']:8.1f} us")
        print("  the eager forward, entered at each layer:")
        for name, us in row["layers_us"].items():
            print(f"    {name:<26} {us:7.1f} us")
        for key, what in (("steps_us", "routed forward's"), ("backward_steps_us", "backward's")):
            total = sum(row[key].values())
            print(f"  {what} steps launched alone ({total:.1f} us together):")
            for name, us in row[key].items():
                print(f"    {name:<22} {us:7.1f} us")
        for key, what in (("profile", "eager forward"), ("backward_profile", "backward")):
            if key in row:
                print(f"  {what} under cProfile, per call (own, cumulative us, calls):")
                for p in row[key]:
                    print(f"    {p['own_us']:7.1f} {p['cumulative_us']:8.1f} {p['calls']:5.1f}"
                          f"  {p['function']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=describe_environment(), args=vars(args), topk=TOPK,
                           rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
