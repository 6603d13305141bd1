"""The stored tuned schedule against the default one, timed alternately in one run.

    python -m sla_tl.benchmarks.tuned_vs_default [--mode fwd+bwd] [--out result.json]

Looks up the store's entry for the Wan2.1-1.3B problem on the GPU in hand (B=1, H=12,
L=32760, D=128, bf16, topk 0.05, blocks 128x64, unless told otherwise), then times both
schedules on the same fresh random inputs with real routing, in rounds that alternate
between them, and reports the median of each.
"""

from __future__ import annotations

import argparse
import json
import statistics

import tilelang
import torch

from sla_tl import config_store
from sla_tl.autotune.measure import schedule_measurement
from sla_tl.targets import target_of

from .environment import describe_environment


def main(argv: list[str] | None = None) -> int:
    """Time the tuned and the default schedule side by side; print and write the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,12,32760,128", help="B,H,L,D")
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-kv", type=int, default=64)
    parser.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    b, h, length, d = (int(n) for n in args.shape.split(","))
    gpu, arch = target_of(torch.device("cuda"))
    key = config_store.TuneKey(gpu, arch.target, tilelang.__version__, b, h, length, length, d,
                               "bfloat16", args.block_q, args.block_kv, args.topk, 0.0,
                               "softmax", "marginal", "bhsd")
    found = config_store.active_store().lookup(key.call_key())
    if found.source != "tuned":
        print(f"no tuned entry for {key.study_name()} (lookup gave {found.source!r}); "
              "run `sla-tl tune` first")
        return 2
    timer = schedule_measurement(key, args.mode).timer
    times: dict[str, list[float]] = {"default": [], "tuned": []}
    for _ in range(args.rounds):
        times["default"].append(timer({}))
        times["tuned"].append(timer(found.schedule))
    default_ms = statistics.median(times["default"])
    tuned_ms = statistics.median(times["tuned"])
    print(f"{key.study_name()} {args.mode}")
    for name, median in (("default", default_ms), ("tuned", tuned_ms)):
        rounds = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"  {name:<8} {median:.3f} ms   (rounds: {rounds})")
    print(f"  tuned schedule: {found.schedule}")
    print(f"  default / tuned = {default_ms / tuned_ms:.3f}")
    if args.out:
        result = {"environment": describe_environment(), "key": key._asdict(), "mode": args.mode,
                  "schedule": found.schedule, "default_ms": default_ms, "tuned_ms": tuned_ms,
                  "rounds": times, "study": found.entry._asdict() | {"key": None}}
        with open(args.out, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
