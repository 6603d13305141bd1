"""Ulysses sequence parallelism against one GPU, and the all-to-alls' share of its time.

    torchrun --nproc-per-node 2 -m sla_tl.benchmarks.ulysses [--shape 1,75600,40,128]
        [--topk 0.05] [--modes fwd,fwd+bwd] [--repeats 20] [--out result.json]

One rank per GPU, NCCL (NVLink multicast off unless the environment says otherwise).
The shape is B,L,H,D (layout "bshd", as diffusers' Wan attention holds it; default the
Wan2.1-14B 720p attention, 75,600 tokens and 40 heads), bf16, blocks 128x64. Per mode
(forward; forward+backward for q, k and v) it times, with CUDA events, the median of
`--repeats` calls over three sets of fresh random inputs:

  one GPU             sla_tl.attention over the whole sequence and all heads, rank 0 alone
  Ulysses             sla_tl.ulysses_attention over the P ranks' shards (check_shards off)
  Ulysses, checked    the same with the ranks' shard check (a host synchronisation a call)
  attention per rank  sla_tl.attention over the whole sequence for H/P heads, no collective
  all-to-alls         the call's all-to-alls alone (q, k, v in and the output back; with
                      the backward, its four too), on the same shards

A figure of several ranks is the slowest rank's median. It prints a table with the
speedup over one GPU and the all-to-alls' share of the Ulysses call, and writes JSON with
--out. Exit status 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import wait_tensor

from sla_tl import attention, ulysses_attention
from sla_tl.sequence_collectives import heads_to_sequence, sequence_to_heads
from sla_tl.timing import call_times_ms

from .environment import describe_environment
from .suite import MODE_NAMES, MODES

WAN_14B_720P = (1, 75600, 40, 128)
INPUT_SETS = 3
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "NVSHMEM_DISABLE_NVLS": "1"}
BLOCK_Q, BLOCK_KV = 128, 64


class UsageError(Exception):
    """A request that cannot be served (exit status 2)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sla_tl.benchmarks.ulysses", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--shape", default=",".join(map(str, WAN_14B_720P)), metavar="B,L,H,D")
    parser.add_argument("--topk", default="0.05")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--repeats", default="20")
    parser.add_argument("--out", help="write the JSON result here (rank 0)")
    args = parser.parse_args(argv)
    try:
        args.shape = tuple(int(x) for x in args.shape.split(","))
    except ValueError:
        raise UsageError(f"--shape wants B,L,H,D, got {args.shape!r}") from None
    if len(args.shape) != 4 or min(args.shape) < 1:
        raise UsageError(f"--shape wants four positive integers B,L,H,D, got {args.shape}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        raise UsageError(f"--modes wants some of {', '.join(MODES)}, got {unknown or 'none'}")
    try:
        args.topk, args.repeats = float(args.topk), int(args.repeats)
    except ValueError:
        raise UsageError("--topk wants a number and --repeats an integer") from None
    if not 0.0 < args.topk <= 1.0 or args.repeats < 1:
        raise UsageError("--topk must lie in (0, 1] and --repeats be at least 1")
    return args


def _start() -> int:
    """Join the torchrun group over NCCL, one GPU per rank; returns the world size."""
    if "LOCAL_RANK" not in os.environ:
        raise UsageError("run under torchrun --nproc-per-node N, N >= 2 GPUs")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        raise UsageError("needs at least 2 GPUs")
    for name, value in NVLINK_MULTICAST_OFF.items():
        os.environ.setdefault(name, value)
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    return dist.get_world_size()


def _slowest(ms: float) -> float:
    """The largest of the ranks' figures."""
    figure = torch.tensor([ms], device="cuda", dtype=torch.float64)
    dist.all_reduce(figure, op=dist.ReduceOp.MAX)
    return figure.item()


def _median(step: Callable, sets: list[tuple], repeats: int) -> float:
    return statistics.median(call_times_ms(step, sets, repeats, warmup=3))


def _step(fn: Callable[..., torch.Tensor], mode: str) -> Callable:
    """One call of `fn(q, k, v)`, with the backward for q, k, v in "fwd+bwd" (gradients
    returned, not accumulated, so no additions are timed)."""
    if mode == "fwd":
        def forward(q, k, v, grad):
            with torch.no_grad():
                return fn(q, k, v)
        return forward

    def forward_backward(q, k, v, grad):
        return torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
    return forward_backward


def _all_to_alls_step(mode: str, group: dist.ProcessGroup) -> Callable:
    """The all-to-alls of one call alone: q, k, v to the head shards, and (in q's place,
    which has the output's shape) back; in "fwd+bwd" also the four of the backward."""
    def exchange(q, k, v):
        whole = [sequence_to_heads(x, group, "bshd") for x in (q, k, v)]
        return heads_to_sequence(whole[0], group, "bshd"), whole

    if mode == "fwd":
        def forward(q, k, v, grad):
            with torch.no_grad():
                out, whole = exchange(q, k, v)
                # Nothing reads k's and v's head shards here: wait for them explicitly.
                return out, [wait_tensor(x) for x in whole[1:]]
        return forward

    def forward_backward(q, k, v, grad):
        out, whole = exchange(q, k, v)
        # The head shards' own values stand in for their gradients: one all-to-all each.
        return torch.autograd.grad((out, *whole[1:]), (q, k, v),
                                   (grad, *(x.detach() for x in whole[1:])))
    return forward_backward


def _inputs(batch: int, length: int, heads: int, dim: int, mode: str) -> list[tuple]:
    sets = []
    for _ in range(INPUT_SETS):
        q, k, v = (torch.randn(batch, length, heads, dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=mode != "fwd") for _ in range(3))
        sets.append((q, k, v, torch.randn_like(q)))
    return sets


def measure(args: argparse.Namespace, world: int) -> list[dict]:
    """Every figure of every mode (collective: every rank calls it)."""
    batch, length, heads, dim = args.shape
    weight = torch.randn(dim, dim, device="cuda") / dim**0.5
    bias = torch.randn(dim, device="cuda") * 0.1
    options = dict(topk=args.topk, block_q=BLOCK_Q, block_kv=BLOCK_KV, layout="bshd")
    group = dist.group.WORLD

    def whole(q, k, v):
        return attention(q, k, v, weight, bias, **options)

    def sharded(check: bool) -> Callable[..., torch.Tensor]:
        def call(q, k, v):
            return ulysses_attention(q, k, v, weight, bias, group=group, check_shards=check,
                                     **options)
        return call

    rows = []
    for mode in args.modes:
        row = {"mode": mode}
        shards = _inputs(batch, length // world, heads, dim, mode)
        row["ulysses_ms"] = _slowest(_median(_step(sharded(False), mode), shards, args.repeats))
        row["ulysses_checked_ms"] = _slowest(_median(_step(sharded(True), mode), shards,
                                                     args.repeats))
        row["all_to_alls_ms"] = _slowest(_median(_all_to_alls_step(mode, group), shards,
                                                 args.repeats))
        del shards
        per_rank = _inputs(batch, length, heads // world, dim, mode)
        row["attention_per_rank_ms"] = _slowest(_median(_step(whole, mode), per_rank,
                                                        args.repeats))
        del per_rank
        single = 0.0
        if dist.get_rank() == 0:
            single = _median(_step(whole, mode), _inputs(batch, length, heads, dim, mode),
                             args.repeats)
        row["one_gpu_ms"] = _slowest(single)
        row["speedup_vs_one_gpu"] = row["one_gpu_ms"] / row["ulysses_ms"]
        row["all_to_all_share"] = row["all_to_alls_ms"] / row["ulysses_ms"]
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def _table(args: argparse.Namespace, world: int, rows: list[dict]) -> str:
    batch, length, heads, dim = args.shape
    lines = [f"Ulysses over {world} x {torch.cuda.get_device_name()}: (B, L, H, D) = "
             f"({batch}, {length}, {heads}, {dim}) bf16, topk {args.topk}, blocks "
             f"{BLOCK_Q}x{BLOCK_KV}; median ms, slowest rank",
             f"{'mode':<17} {'one GPU':>9} {'Ulysses':>9} {'checked':>9} {'attn/rank':>9} "
             f"{'all2alls':>9} {'speedup':>8} {'a2a share':>9}"]
    for r in rows:
        lines.append(f"{MODE_NAMES[r['mode']]:<17} {r['one_gpu_ms']:9.2f} {r['ulysses_ms']:9.2f} "
                     f"{r['ulysses_checked_ms']:9.2f} {r['attention_per_rank_ms']:9.2f} "
                     f"{r['all_to_alls_ms']:9.2f} {r['speedup_vs_one_gpu']:7.2f}x "
                     f"{r['all_to_all_share']:9.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table on rank 0, write --out; the exit status."""
    try:
        args = _parse(argv)
        world = _start()
    except UsageError as error:
        print(f"ulysses bench: error: {error}", file=sys.stderr)
        return 2
    batch, length, heads, dim = args.shape
    if heads % world or length % world:
        if dist.get_rank() == 0:
            print(f"ulysses bench: error: {world} ranks must divide the heads ({heads}) and "
                  f"the length ({length})", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    rows = measure(args, world)
    if dist.get_rank() == 0:
        print(_table(args, world, rows))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(environment=describe_environment(), world_size=world,
                               shape_blhd=args.shape, topk=args.topk, block_q=BLOCK_Q,
                               block_kv=BLOCK_KV, repeats=args.repeats, rows=rows), f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
