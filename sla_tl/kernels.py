"""Compiled TileLang kernels, built on first use and kept for the life of the process.

Each getter takes the compile-time settings of one kernel and returns the compiled
kernel (TileLang also caches the binary on disk, under $TILELANG_CACHE_DIR).
"""

from __future__ import annotations

import functools

import torch

from .schedules.compile import compile_program
from .schedules.sm90 import backward_dkdv as dkdv_schedule
from .schedules.sm90 import forward as forward_schedule
from .schedules.sm90 import key_pass as key_pass_schedule
from .schedules.sm90.backward_dq import backward_dq
from .schedules.sm90.backward_query import backward_query
from .schedules.sm90.pool import mean_pool

# Block sizes the kernels are built for.
KERNEL_BLOCK_Q = (64, 128)
KERNEL_BLOCK_KV = (64, 128)

# Compute capability -> the arch the schedules are compiled for.
SUPPORTED_ARCHS = {(9, 0): "sm_90a"}


def arch_of(device: torch.device) -> str:
    """The TileLang arch for `device`, or a clear error where no schedule serves it."""
    capability = torch.cuda.get_device_capability(device)
    if capability not in SUPPORTED_ARCHS:
        name = torch.cuda.get_device_name(device)
        raise NotImplementedError(
            f"sla-tl has kernels for Hopper (sm_90) only; {name} is sm_{capability[0]}"
            f"{capability[1]}. Run on a Hopper GPU, or use the CPU reference."
        )
    return SUPPORTED_ARCHS[capability]


def check_block_sizes(block_q: int, block_kv: int) -> None:
    """The CUDA kernels' block sizes (the CPU reference takes any multiple of 16)."""
    if block_q not in KERNEL_BLOCK_Q:
        raise ValueError(f"block_q must be one of {KERNEL_BLOCK_Q} on CUDA; got {block_q} "
                         "(the CPU reference takes any multiple of 16)")
    if block_kv not in KERNEL_BLOCK_KV:
        raise ValueError(f"block_kv must be one of {KERNEL_BLOCK_KV} on CUDA; got {block_kv} "
                         "(the CPU reference takes any multiple of 16)")


@functools.cache
def pool_kernel(dim: int, block: int, dtype: str, layout: str, arch: str):
    """Mean pooling over blocks of rows."""
    return compile_program(mean_pool(dim, block, dtype, layout), arch)


@functools.cache
def key_pass_kernel(dim: int, block_kv: int, dtype: str, feature: str, layout: str,
                    store_blocks: bool, arch: str):
    """Per-key-block linear states and pooled keys."""
    knobs = key_pass_schedule.default_schedule(dim, block_kv)
    program = key_pass_schedule.key_pass(dim, block_kv, dtype, feature, layout, store_blocks,
                                         **knobs)
    return compile_program(program, arch)


def key_pass_group(dim: int, block_kv: int) -> int:
    """Key blocks per CTA of the key pass (the caller sums the per-group states)."""
    return key_pass_schedule.default_schedule(dim, block_kv)["group"]


@functools.cache
def forward_kernel(dim: int, block_q: int, block_kv: int, dtype: str, feature: str, layout: str,
                   scale: float, arch: str):
    """The fused SLA forward."""
    knobs = forward_schedule.default_schedule(dim, block_q, block_kv)
    program = forward_schedule.sla_forward(dim, block_q, block_kv, dtype, feature, layout, scale,
                                           **knobs)
    return compile_program(program, arch)


@functools.cache
def backward_query_kernel(dim: int, block_q: int, dtype: str, feature: str, layout: str,
                          arch: str):
    """The backward's query pass (delta, linear-branch gradients, linear part of dQ)."""
    program = backward_query(dim, block_q, dtype, feature, layout, threads=2 * block_q)
    return compile_program(program, arch)


@functools.cache
def backward_dq_kernel(dim: int, block_q: int, block_kv: int, dtype: str, layout: str,
                       scale: float, arch: str):
    """dQ over the LUT."""
    program = backward_dq(dim, block_q, block_kv, dtype, layout, scale, threads=2 * block_q,
                          num_stages=2)
    return compile_program(program, arch)


@functools.cache
def backward_dkdv_kernel(dim: int, block_q: int, block_kv: int, dtype: str, feature: str,
                         layout: str, scale: float, arch: str):
    """dK and dV over the reverse LUT, with the linear branch's key-side gradients."""
    knobs = dkdv_schedule.default_schedule(dim, block_q, block_kv)
    program = dkdv_schedule.backward_dkdv(dim, block_q, block_kv, dtype, feature, layout, scale,
                                          **knobs)
    return compile_program(program, arch)
