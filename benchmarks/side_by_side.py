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


SYSTEMS: dict[str, Callable[[Problem], Callable]] = {
    "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    "sla_tl": _sla,
}
SPARSE_SYSTEMS = {"sla_tl"}


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


def measure(p: Problem, systems: list[str], modes: list[str], budget_s: float,
            most: int) -> list[dict]:
    """Time every system in every mode on fresh inputs; speedups against cuDNN of this run."""
    rows = []
    for mode in modes:
        inputs = _inputs(p, mode, sets=3)
        by_system = {}
        for name in systems:
            step = _step(SYSTEMS[name](p), mode)
            repeats = _repeats(step, inputs, budget_s, most)
            ms = median_ms(step, inputs, repeats, warmup=1)
            computed = p.density if name in SPARSE_SYSTEMS else 1.0
            by_system[name] = dict(
                system=name, mode=mode, median_ms=ms, repeats=repeats,
                tflops_dense_equiv=p.dense_flops(mode) / ms / 1e9,
                tflops_per_computed_block=computed * p.dense_flops(mode) / ms / 1e9,
                peak_memory_mb=peak_memory_mb(step, inputs[0]),
            )
        cudnn = by_system.get("sdpa_cudnn", {}).get("median_ms")
        for row in by_system.values():
            row["speedup_vs_cudnn"] = cudnn / row["median_ms"] if cudnn else None
            rows.append(row)
        del inputs
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the result rows."""
    head = (f"{'system':<12} {'mode':<8} {'median ms':>10} {'TFLOP/s':>8} {'per block':>10} "
            f"{'vs cuDNN':>9} {'peak MiB':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        speedup = f"{r['speedup_vs_cudnn']:.2f}x" if r["speedup_vs_cudnn"] else "-"
        lines.append(
            f"{r['system']:<12} {r['mode']:<8} {r['median_ms']:>10.3f} "
            f"{r['tflops_dense_equiv']:>8.1f} {r['tflops_per_computed_block']:>10.1f} "
            f"{speedup:>9} {r['peak_memory_mb']:>10.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the side-by-side benchmark on the GPU in hand."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON result here")
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--length", type=int, default=WAN_1_3B["length"])
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--budget-s", type=float, default=3.0,
                        help="time budget per system and mode (sets the repeat count)")
    parser.add_argument("--most-repeats", type=int, default=100)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; none is visible to torch")
    problem = Problem(**{**WAN_1_3B, "length": args.length}, topk=args.topk)
    rows = measure(problem, args.systems.split(","), args.modes.split(","), args.budget_s,
                   args.most_repeats)
    result = dict(environment=describe_environment(), problem=asdict(problem),
                  density=problem.density, results=rows)
    print(f"B={problem.batch} H={problem.heads} L={problem.length} D={problem.dim} "
          f"{problem.dtype} topk={problem.topk} (computed blocks {problem.density:.3f}) "
          f"on {result['environment']['gpu']}")
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
