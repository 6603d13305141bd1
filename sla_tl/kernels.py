"""Compiled TileLang kernels, built on first use and kept for the life of the process.

Each getter takes the compile-time settings of one kernel and returns the compiled
kernel (TileLang also caches the binary on disk, see `sla_tl.kernel_cache`). Getters of
tunable kernels also take `knobs`: schedule knobs that override the kernel's defaults, as
`freeze`d (name, value) pairs. The `gated_` getters build the variants that take a gate
(`O = O_s + g * proj(O_l)`); the schedule knobs of the plain kernel serve them too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from .schedules.compile import compile_program
from .schedules.sm90 import backward_dkdv as dkdv_schedule
from .schedules.sm90 import backward_dq as dq_schedule
from .schedules.sm90 import forward as forward_schedule
from .schedules.sm90 import key_pass as key_pass_schedule
from .schedules.sm90.backward_query import backward_query
from .schedules.sm90.pool import mean_pool

# Block sizes the kernels are built for.
KERNEL_BLOCK_Q = (64, 128)
KERNEL_BLOCK_KV = (64, 128)

# Compute capability -> the arch the schedules are compiled for.
SUPPORTED_ARCHS = {(9, 0): "sm_90a"}

Knobs = tuple[tuple[str, int | bool], ...]
"""Schedule knobs of one kernel, hashable: sorted (name, value) pairs."""

Schedule = Mapping[str, Mapping[str, int | bool]]
"""Schedule knobs of several kernels, by kernel name (see TUNABLE); absent ones take defaults."""

_SCHEDULES = {
    "key_pass": key_pass_schedule,
    "forward": forward_schedule,
    "backward_dq": dq_schedule,
    "backward_dkdv": dkdv_schedule,
}
TUNABLE = tuple(_SCHEDULES)
"""The kernels whose schedule knobs the autotuner searches."""


def freeze(knobs: Mapping[str, int | bool]) -> Knobs:
    """Hashable form of one kernel's knobs."""
    return tuple(sorted(knobs.items()))


def knobs_of(schedule: Schedule | None, kernel: str) -> Knobs:
    """One kernel's knobs from a schedule (none: the kernel's defaults)."""
    return freeze((schedule or {}).get(kernel, {}))


def _sizes(kernel: str, dim: int, block_q: int, block_kv: int) -> tuple[int, ...]:
    return (dim, block_kv) if kernel == "key_pass" else (dim, block_q, block_kv)


def default_knobs(kernel: str, dim: int, block_q: int, block_kv: int) -> dict:
    """The knobs a kernel is built with when nothing overrides them."""
    return _SCHEDULES[kernel].default_schedule(*_sizes(kernel, dim, block_q, block_kv))


def search_space(kernel: str, dim: int, block_q: int, block_kv: int) -> dict[str, tuple]:
    """The autotuner's choices for each searched knob of a kernel."""
    return _SCHEDULES[kernel].search_space(*_sizes(kernel, dim, block_q, block_kv))


def _merged(kernel: str, sizes: tuple[int, ...], knobs: Knobs) -> dict:
    merged = _SCHEDULES[kernel].default_schedule(*sizes)
    unknown = set(dict(knobs)) - set(merged)
    if unknown:
        raise ValueError(f"unknown schedule knobs for {kernel}: {sorted(unknown)}")
    merged.update(knobs)
    return merged


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
                    store_blocks: bool, arch: str, knobs: Knobs = ()):
    """Per-key-block linear states and pooled keys."""
    merged = _merged("key_pass", (dim, block_kv), knobs)
    program = key_pass_schedule.key_pass(dim, block_kv, dtype, feature, layout, store_blocks,
                                         **merged)
    return compile_program(program, arch)


def key_pass_group(dim: int, block_kv: int, knobs: Knobs = ()) -> int:
    """Key blocks per CTA of the key pass (the caller sums the per-group states)."""
    return _merged("key_pass", (dim, block_kv), knobs)["group"]


def _forward(dim: int, block_q: int, block_kv: int, dtype: str, feature: str, layout: str,
             scale: float, arch: str, knobs: Knobs, gated: bool):
    merged = _merged("forward", (dim, block_q, block_kv), knobs)
    program = forward_schedule.sla_forward(dim, block_q, block_kv, dtype, feature, layout, scale,
                                           **merged, gated=gated)
    return compile_program(program, arch)


@functools.cache
def forward_kernel(dim: int, block_q: int, block_kv: int, dtype: str, feature: str, layout: str,
                   scale: float, arch: str, knobs: Knobs = ()):
    """The fused SLA forward."""
    return _forward(dim, block_q, block_kv, dtype, feature, layout, scale, arch, knobs, False)


@functools.cache
def gated_forward_kernel(dim: int, block_q: int, block_kv: int, dtype: str, feature: str,
                         layout: str, scale: float, arch: str, knobs: Knobs = ()):
    """The fused SLA forward with a gate on the projection term (takes GATE after BIAS)."""
    return _forward(dim, block_q, block_kv, dtype, feature, layout, scale, arch, knobs, True)


@functools.cache
def backward_query_kernel(dim: int, block_q: int, dtype: str, feature: str, layout: str,
                          arch: str):
    """The backward's query pass (delta, linear-branch gradients, linear part of dQ)."""
    program = backward_query(dim, block_q, dtype, feature, layout, threads=2 * block_q)
    return compile_program(program, arch)


@functools.cache
def gated_backward_query_kernel(dim: int, block_q: int, dtype: str, feature: str, layout: str,
                                arch: str):
    """The query pass of a gated call: takes GATE after BIAS, writes d(gate) to DGATE (last)."""
    program = backward_query(dim, block_q, dtype, feature, layout, threads=2 * block_q,
                             gated=True)
    return compile_program(program, arch)


@functools.cache
def backward_dq_kernel(dim: int, block_q: int, block_kv: int, dtype: str, layout: str,
                       scale: float, arch: str, knobs: Knobs = ()):
    """dQ over the LUT."""
    merged = _merged("backward_dq", (dim, block_q, block_kv), knobs)
    program = dq_schedule.backward_dq(dim, block_q, block_kv, dtype, layout, scale, **merged)
    return compile_program(program, arch)


@functools.cache
def backward_dkdv_kernel(dim: int, block_q: int, block_kv: int, dtype: str, feature: str,
                         layout: str, scale: float, arch: str, knobs: Knobs = ()):
    """dK and dV over the reverse LUT, with the linear branch's key-side gradients."""
    merged = _merged("backward_dkdv", (dim, block_q, block_kv), knobs)
    program = dkdv_schedule.backward_dkdv(dim, block_q, block_kv, dtype, feature, layout, scale,
                                          **merged)
    return compile_program(program, arch)
