"""The main job, `sla-tl demo`: what SLA does to a small problem, and what this machine can show.

On any machine: the reference on structured video-like inputs (realised sparsity, share
of the attention mass the critical blocks hold, error against full attention), then the
TileLang kernels of one attention call compiled for sm_90a with their static facts
(registers, spills, shared memory, wgmma, TMA). On a machine with a GPU: the side-by-side
timing at the Wan2.1-1.3B shape. Without one, it says what it would have timed.
"""

from __future__ import annotations

import math

import torch

from . import kernel_cache, reference, spec, static_check
from .plan import kernels_for
from .settings import Settings
from .synthetic import video_like_qkv
from .validation import check_positive_int


def quality_rows(
    length: int, heads: int, dim: int, topks: tuple[float, ...], k_low: float, seed: int
) -> list[dict]:
    """Realised sparsity, attention mass kept and error of an untrained SLA vs full attention."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = video_like_qkv(1, heads, length, dim, generator=generator, sharpness=16.0,
                             bandwidth=8.0)
    full = reference.full_attention(q, k, v)
    scores = q.double() @ k.double().transpose(-1, -2) * spec.softmax_scale(dim, None)
    full_lse = torch.logsumexp(scores, dim=-1)
    zero_weight, zero_bias = torch.zeros(dim, dim), torch.zeros(dim)
    n_kv = spec.num_blocks(length, spec.DEFAULT_BLOCK_KV)
    rows = []
    for topk in topks:
        routing = reference.route(q, k, topk, k_low, spec.DEFAULT_BLOCK_Q, spec.DEFAULT_BLOCK_KV)
        out, lse, _ = reference.attention_with_routing(
            q, k, v, routing, zero_weight, zero_bias, spec.DEFAULT_BLOCK_Q,
            spec.DEFAULT_BLOCK_KV, spec.DEFAULT_FEATURE_MAP, spec.DEFAULT_LINEAR,
        )
        n_crit = routing.lut.shape[-1]
        rows.append(dict(
            topk=topk,
            critical_blocks=n_crit,
            kv_blocks=n_kv,
            sparsity=1.0 - n_crit / n_kv,
            mass_kept=torch.exp(lse.double() - full_lse).mean().item(),
            relative_error=((out - full).norm() / full.norm()).item(),
        ))
    return rows


def _print_quality(rows: list[dict], length: int, heads: int, dim: int) -> None:
    print(f"Reference SLA on video-like inputs: B=1 H={heads} L={length} D={dim}, "
          f"blocks {spec.DEFAULT_BLOCK_Q}x{spec.DEFAULT_BLOCK_KV}, untrained projection "
          "(sparse branch only)")
    print(f"{'topk':>6} {'critical/row':>13} {'sparsity':>9} {'mass kept':>10} {'rel. error':>11}")
    for r in rows:
        print(f"{r['topk']:>6.2f} {r['critical_blocks']:>6}/{r['kv_blocks']:<6} "
              f"{r['sparsity']:>9.3f} {r['mass_kept']:>10.3f} {r['relative_error']:>11.3f}")
    print("mass kept: share of full attention's probability mass inside the critical blocks;")
    print("rel. error: ||O - O_full|| / ||O_full||. Fine-tuning the projection (the linear")
    print("branch) is how SLA recovers quality at high sparsity.\n")


def _kernel_section() -> bool:
    """Compile the kernels of a Wan-shaped call for sm_90a and print their static facts."""
    settings = Settings(block_q=128, block_kv=64, feature_map="softmax", linear="marginal")
    print("TileLang kernels of one call (D=128, bf16, blocks 128x64, softmax, marginal),")
    print("compiled for sm_90a on this machine (no GPU needed; cached after the first run in")
    print(f"{kernel_cache.kernel_directory('sm_90a')}):")
    try:
        facts = static_check.collect(kernels_for("sm_90a", 128, "bfloat16", settings),
                                     progress=True)
    except (OSError, RuntimeError) as error:
        print(f"error: the kernels did not compile: {error}")
        print("TileLang needs the CUDA toolkit: set CUDA_HOME to it (default /usr/local/cuda).")
        return False
    print(f"{'kernel':<64} {'regs':>5} {'spill B':>8} {'smem KiB':>9} {'thr':>4} wgmma TMA")
    for f in facts:
        print(f"{f.name:<64} {f.registers:>5} {f.spill_bytes:>8} {f.shared_bytes / 1024:>9.1f} "
              f"{f.threads:>4} {'yes' if f.wgmma else 'no':>5} {'yes' if f.tma else 'no':>3}")
    print()
    return True


def _gpu_section(topk: float) -> None:
    shape = "B=1 H=12 L=32760 D=128 bf16 (Wan2.1-1.3B attention)"
    if not torch.cuda.is_available():
        print("No CUDA GPU is visible, so nothing is timed here. On a GPU this command times,")
        print(f"at {shape}, topk={topk}, block_q=128, block_kv=64:")
        print("  dense SDPA (cuDNN and flash backends), compiled FlexAttention block-sparse over"
              " the same LUT, thu-ml/SLA where installed, and torch.ops.sla.attention,")
        print("  forward and forward+backward, median of many runs on fresh random inputs,")
        print("  with speedups against cuDNN measured in the same run.")
        return
    from .benchmarks import bench

    print(f"Timing on {torch.cuda.get_device_name()} at {shape}:")
    bench.main(["--shape", "1,12,32760,128", "--sparsity", str(1.0 - topk)])


# The reference keeps dense (L, L) scores per head: 16K tokens is ~2 GB of them.
MAX_LENGTH = 16384


def check_arguments(length: int, heads: int, dim: int, seed: int) -> None:
    """The demo's problem: ValueError/TypeError naming the option at fault."""
    check_positive_int("--length", length)
    check_positive_int("--heads", heads)
    if length > MAX_LENGTH:
        raise ValueError(f"--length must be at most {MAX_LENGTH} (the reference computes dense "
                         f"L x L scores); got {length}")
    if dim not in spec.HEAD_DIMS:
        raise ValueError(f"--dim must be one of {spec.HEAD_DIMS}; got {dim}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative int; got {seed!r}")


def main(length: int = 4096, heads: int = 2, dim: int = 64, seed: int = 0) -> int:
    """Run the demo; returns a process exit code."""
    check_arguments(length, heads, dim, seed)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    rows = quality_rows(length, heads, dim, (0.05, 0.10, 0.20), 0.0, seed)
    _print_quality(rows, length, heads, dim)
    if any(not math.isfinite(r["relative_error"]) for r in rows):
        print("error: non-finite output from the reference")
        return 1
    if not _kernel_section():
        return 1
    _gpu_section(0.05)
    return 0
