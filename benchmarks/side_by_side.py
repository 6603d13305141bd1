"""Side-by-side timing of sla-tl against dense attention, all measured in one run.

    python -m sla_tl.benchmarks.side_by_side --out result.json

Prints a table and writes JSON with the environment (GPU, versions, commit, date).
Speedups are against dense cuDNN SDPA measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sla_tl
from sla_tl import spec

from .environment import describe_environment
from .timing import median_ms, peak_memory_mb

WAN_1_3B = dict(batch=1, heads=12, length=32760, dim=128)


@dataclass(frozen=True)
class Problem:
    """One attention shape and the SLA settings it is run with."""

    batch: int
    heads: int
    length: int
    dim: int
    dtype: str = "bfloat16"
    topk: float = 0.05
    block_q: int = 128
    block_kv: int = 64

    @property
    def density(self) -> float:
        """Share of key blocks the sparse branch computes."""
        n_kv = spec.num_blocks(self.length, self.block_kv)
        return spec.num_critical(self.topk, n_kv) / n_kv

    def dense_flops(self, mode: str) -> float:
        """FLOPs of dense attention: 4*B*H*L^2*D forward, 2.5x that more for the backward."""
        forward = 4.0 * self.batch * self.heads * self.length**2 * self.dim
        return forward if mode == "fwd" else 3.5 * forward


def _inputs(p: Problem, mode: str, sets: int) -> list[tuple]:
    dtype = getattr(torch, p.dtype)
    shape = (p.batch, p.heads, p.length, p.dim)
    result = []
    for _ in range(sets):
        q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=mode != "fwd")
                   for _ in range(3))
        result.append((q, k, v, torch.randn(shape, device="cuda", dtype=dtype)))
    return result


def _sdpa(backend: SDPBackend) -> Callable[[Problem], Callable]:
    def build(p: Problem) -> Callable:
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run
    return build


def _sla(p: Problem) -> Callable:
    weight = torch.randn(p.dim, p.dim, device="cuda") / p.dim**0.5
    bias = torch.zeros(p.dim, device="cuda")

    def run(q, k, v):
        return sla_tl.attention(q, k, v, weight, bias, topk=p.topk, block_q=p.block_q,
                                block_kv=p.block_kv)
    return run


def _flex_block_mask(q: torch.Tensor, k: torch.Tensor, p: Problem):
    """FlexAttention's BlockMask over exactly the critical blocks of sla-tl's routing."""
    from torch.nn.attention.flex_attention import BlockMask

    routing = sla_tl.route(q, k, p.topk, 0.0, p.block_q, p.block_kv)
    lut, count = routing.lut, routing.lut_count
    n_kv = spec.num_blocks(p.length, p.block_kv)
    # FlexAttention wants one index column per key block; columns past the count are unread.
    indices = lut.new_zeros((*lut.shape[:-1], n_kv))
    indices[..., :lut.shape[-1]] = lut
    return BlockMask.from_kv_blocks(count, indices, BLOCK_SIZE=(p.block_q, p.block_kv),
                                    seq_lengths=(p.length, p.length))


def _flex(p: Problem) -> Callable:
    """Compiled FlexAttention, block-sparse over sla-tl's LUT (the sparse branch only).

    Each input set's BlockMask is built on its first call (the warm-up), so the timed calls
    measure the attention kernels alone, without routing or mask building."""
    from torch.nn.attention.flex_attention import flex_attention

    # Autotuned: with 64-key blocks, the default backward config of sm90 (128-key tiles)
    # does not divide the block size, and the autotuner's configs do.
    compiled = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    masks: dict[int, object] = {}

    def run(q, k, v):
        key = q.data_ptr()
        if key not in masks:
            with torch.no_grad():
                masks[key] = _flex_block_mask(q, k, p)
        return compiled(q, k, v, block_mask=masks[key])
    return run


SYSTEMS: dict[str, Callable[[Problem], Callable]] = {
    "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    "flex_sparse": _flex,
    "sla_tl": _sla,
}
SPARSE_SYSTEMS = {"flex_sparse", "sla_tl"}


def _step(attend: Callable, mode: str) -> Callable:
    if mode == "fwd":
        def forward(q, k, v, grad):
            with torch.no_grad():
                return attend(q, k, v)
        return forward

    def forward_backward(q, k, v, grad):
        attend(q, k, v).backward(grad)
    return forward_backward


def _repeats(step: Callable, inputs: list[tuple], budget_s: float, most: int) -> int:
    """As many repeats as fit the time budget, between 3 and `most`."""
    step(*inputs[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    step(*inputs[0])
    torch.cuda.synchronize()
    once = time.perf_counter() - start
    return max(3, min(most, int(budget_s / max(once, 1e-6))))


def _measure_one(p: Problem, name: str, mode: str, inputs: list[tuple], budget_s: float,
                 most: int) -> dict:
    step = _step(SYSTEMS[name](p), mode)
    repeats = _repeats(step, inputs, budget_s, most)
    ms = median_ms(step, inputs, repeats, warmup=len(inputs))
    computed = p.density if name in SPARSE_SYSTEMS else 1.0
    return dict(
        system=name, mode=mode, median_ms=ms, repeats=repeats,
        tflops_dense_equiv=p.dense_flops(mode) / ms / 1e9,
        tflops_per_computed_block=computed * p.dense_flops(mode) / ms / 1e9,
        peak_memory_mb=peak_memory_mb(step, inputs[0]),
    )


def measure(p: Problem, systems: list[str], modes: list[str], budget_s: float,
            most: int) -> list[dict]:
    """Time every system in every mode on fresh inputs; speedups against cuDNN of this run."""
    rows = []
    for mode in modes:
        inputs = _inputs(p, mode, sets=3)
        by_system = {}
        for name in systems:
            try:
                by_system[name] = _measure_one(p, name, mode, inputs, budget_s, most)
            except Exception as error:  # noqa: BLE001  (a baseline that fails is reported)
                print(f"{name} {mode} failed: {type(error).__name__}: {error}", flush=True)
                by_system[name] = dict(system=name, mode=mode,
                                       error=f"{type(error).__name__}: {error}")
        cudnn = by_system.get("sdpa_cudnn", {})
        for row in by_system.values():
            if "median_ms" in row and "median_ms" in cudnn:
                row["speedup_vs_cudnn"] = cudnn["median_ms"] / row["median_ms"]
                row["memory_vs_cudnn"] = row["peak_memory_mb"] / cudnn["peak_memory_mb"]
            rows.append(row)
        del inputs
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the result rows (a failed system shows its error)."""
    head = (f"{'system':<12} {'mode':<8} {'median ms':>10} {'TFLOP/s':>8} {'per block':>10} "
            f"{'vs cuDNN':>9} {'peak MiB':>10} {'mem/cuDNN':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['system']:<12} {r['mode']:<8} failed: {r['error'][:120]}")
            continue
        speedup = f"{r['speedup_vs_cudnn']:.2f}x" if "speedup_vs_cudnn" in r else "-"
        memory = f"{r['memory_vs_cudnn']:.2f}x" if "memory_vs_cudnn" in r else "-"
        lines.append(
            f"{r['system']:<12} {r['mode']:<8} {r['median_ms']:>10.3f} "
            f"{r['tflops_dense_equiv']:>8.1f} {r['tflops_per_computed_block']:>10.1f} "
            f"{speedup:>9} {r['peak_memory_mb']:>10.0f} {memory:>10}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the side-by-side benchmark on the GPU in hand."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON result here")
    parser.add_argument("--topk", default="0.05", help="comma-separated topk values")
    parser.add_argument("--length", type=int, default=WAN_1_3B["length"])
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--budget-s", type=float, default=3.0,
                        help="time budget per system and mode (sets the repeat count)")
    parser.add_argument("--most-repeats", type=int, default=100)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; none is visible to torch")
    results = []
    for topk in (float(x) for x in args.topk.split(",")):
        problem = Problem(**{**WAN_1_3B, "length": args.length}, topk=topk)
        rows = measure(problem, args.systems.split(","), args.modes.split(","), args.budget_s,
                       args.most_repeats)
        results.append(dict(problem=asdict(problem), density=problem.density, results=rows))
        print(f"B={problem.batch} H={problem.heads} L={problem.length} D={problem.dim} "
              f"{problem.dtype} topk={problem.topk} (computed blocks {problem.density:.3f}) "
              f"on {torch.cuda.get_device_name()}")
        print(format_table(rows), flush=True)
    result = dict(environment=describe_environment(), runs=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
