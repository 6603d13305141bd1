"""Compiled TileLang kernels, built on first use and kept for the life of the process.

Each getter takes the compile-time settings of one kernel and returns the compiled
kernel (TileLang also caches the binary on disk, see `sla_tl.kernel_cache`). Getters of
tunable kernels also take `knobs`: schedule knobs that override the kernel's defaults, as
`freeze`d (name, value) pairs. The `gated_` getters build the variants that take a gate
(`O = O_s + g * proj(O_l)`); the schedule knobs of the plain kernel serve them too.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import tilelang
import torch

from .schedules.compile import compile_program
from .schedules.sm90 import backward_dkdv as dkdv_schedule
from .schedules.sm90 import backward_dkdv_ws as dkdv_ws
from .schedules.sm90 import backward_dq as dq_schedule
from .schedules.sm90 import backward_dq_ws as dq_ws_schedule
from .schedules.sm90 import forward as forward_schedule
from .schedules.sm90 import forward_ws
from .schedules.sm90 import key_pass as key_pass_schedule
from .schedules.sm90 import select as select_schedule
from .schedules.sm90.backward_query import backward_query
from .schedules.sm90.pool import mean_pool
from .spec import HEAD_DIMS
from .validation import check_block

# TileLang logs every compile at INFO ("TileLang begins to compile kernel `main`"); sla-tl
# reports its own progress, so TileLang's lines show only when asked, through this variable
# (inherited by the compile worker processes).
TILELANG_LOG_VARIABLE = "SLA_TL_TILELANG_LOG"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _apply_tilelang_log_level() -> None:
    level = os.environ.get(TILELANG_LOG_VARIABLE, "WARNING").upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"{TILELANG_LOG_VARIABLE} must be one of {', '.join(_LOG_LEVELS)}; "
                         f"got {os.environ[TILELANG_LOG_VARIABLE]!r}")
    tilelang.set_log_level(level)


def show_tilelang_log() -> None:
    """Let TileLang's INFO lines through, in this process and the workers it starts."""
    os.environ[TILELANG_LOG_VARIABLE] = "INFO"
    _apply_tilelang_log_level()


_apply_tilelang_log_level()

# Block sizes the kernels are built for.
KERNEL_BLOCK_Q = (64, 128)
KERNEL_BLOCK_KV = (64, 128)

# Compute capability -> the arch the schedules are compiled for.
SUPPORTED_ARCHS = {(9, 0): "sm_90a"}
# The spellings of an arch every command and entry point takes -> TileLang's arch.
ARCH_NAMES = {"sm90": "sm_90a", "sm_90": "sm_90a", "sm_90a": "sm_90a"}

Knobs = tuple[tuple[str, int | bool | str], ...]
"""Schedule knobs of one kernel, hashable: sorted (name, value) pairs."""

Schedule = Mapping[str, Mapping[str, int | bool | str]]
"""Schedule knobs of several kernels, by kernel name (see TUNABLE); absent ones take defaults."""

_SCHEDULES = {
    "key_pass": key_pass_schedule,
    "forward": forward_schedule,
    "backward_dq": dq_schedule,
    "backward_dkdv": dkdv_schedule,
}
TUNABLE = tuple(_SCHEDULES)
"""The kernels whose schedule knobs the autotuner searches."""


def freeze(knobs: Mapping[str, int | bool | str]) -> Knobs:
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


def normalise_arch(arch: object) -> str:
    """TileLang's arch for a user's arch name ("sm90", "sm_90" or "sm_90a" -> "sm_90a")."""
    if not isinstance(arch, str) or arch not in ARCH_NAMES:
        raise ValueError(f"arch must be one of {', '.join(ARCH_NAMES)} (Hopper, the only "
                         f"target with kernels); got {arch!r}")
    return ARCH_NAMES[arch]


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


def check_kernel_sizes(dim: object, block_q: object, block_kv: object) -> None:
    """A head dim and block sizes the CUDA kernels are built for."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}; got {dim!r}")
    check_block("block_q", block_q)
    check_block("block_kv", block_kv)
    check_block_sizes(block_q, block_kv)


def check_block_sizes(block_q: int, block_kv: int) -> None:
    """The CUDA kernels' block sizes (the CPU reference takes any multiple of 16)."""
    if block_q not in KERNEL_BLOCK_Q:
        raise ValueError(f"block_q must be one of {KERNEL_BLOCK_Q} on CUDA; got {block_q} "
                         "(the CPU reference takes any multiple of 16)")
    if block_kv not in KERNEL_BLOCK_KV:
        raise ValueError(f"block_kv must be one of {KERNEL_BLOCK_KV} on CUDA; got {block_kv} "
                         "(the CPU reference takes any multiple of 16)")


@functools.cache
def select_kernel(arch: str):
    """Routing's selection of critical and negligible blocks from the block scores."""
    return compile_program(select_schedule.top_bottom_select(), arch)


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
    # Without flush-to-zero: compiled with it, the CTA that gets a single key block hung on
    # the H200 (TileLang's warp-specialised pipeline of one iteration, a known upstream
    # hazard); compiled without it, every case of the GPU tests has passed.
    return compile_program(program, arch, fast_arithmetic=False)


def key_pass_group(dim: int, block_kv: int, knobs: Knobs = ()) -> int:
    """Key blocks per CTA of the key pass (the caller sums the per-group states)."""
    return _merged("key_pass", (dim, block_kv), knobs)["group"]


def _forward(dim: int, block_q: int, block_kv: int, dtype: str, feature: str, layout: str,
             scale: float, arch: str, knobs: Knobs, gated: bool):
    merged = _merged("forward", (dim, block_q, block_kv), knobs)
    variant = merged.pop("warp_specialization")
    entries = merged.pop("entries_per_step")
    if variant not in forward_schedule.WARP_SPECIALIZATION:
        raise ValueError(f"warp_specialization must be one of "
                         f"{forward_schedule.WARP_SPECIALIZATION}; got {variant!r}")
    if variant == "auto":
        if entries != 1:
            raise ValueError("entries_per_step applies to the hand-written forward only "
                             f"(warp_specialization 'manual' or 'pingpong'); got {entries}")
        program = forward_schedule.sla_forward(dim, block_q, block_kv, dtype, feature, layout,
                                               scale, **merged, gated=gated)
    elif block_q != forward_ws.BLOCK_Q:
        raise ValueError(f"warp_specialization={variant!r} needs block_q={forward_ws.BLOCK_Q}; "
                         f"got {block_q}")
    else:
        program = forward_ws.sla_forward_ws(dim, block_kv, dtype, feature, layout, scale,
                                            merged["num_stages"], variant == "pingpong",
                                            entries, gated=gated)
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
    """dQ over the LUT: TileLang's automatic pipeline, or the hand-written warp-specialised
    schedule (knob `warp_specialization`, see `backward_dq.WARP_SPECIALIZATION`)."""
    merged = _merged("backward_dq", (dim, block_q, block_kv), knobs)
    variant = merged.pop("warp_specialization")
    if variant not in dq_schedule.WARP_SPECIALIZATION:
        raise ValueError(f"warp_specialization must be one of "
                         f"{dq_schedule.WARP_SPECIALIZATION}; got {variant!r}")
    if variant == "auto":
        program = dq_schedule.backward_dq(dim, block_q, block_kv, dtype, layout, scale, **merged)
    elif block_q != dq_ws_schedule.BLOCK_Q:
        raise ValueError(f"warp_specialization={variant!r} needs "
                         f"block_q={dq_ws_schedule.BLOCK_Q}; got {block_q}")
    elif "threads" in dict(knobs) and merged["threads"] != dq_ws_schedule.THREADS:
        raise ValueError(f"the hand-written dQ (warp_specialization={variant!r}) runs "
                         f"{dq_ws_schedule.THREADS} threads; got threads={merged['threads']!r}")
    else:
        program = dq_ws_schedule.backward_dq_ws(dim, block_kv, dtype, layout, scale,
                                                 merged["num_stages"], variant == "pingpong")
    return compile_program(program, arch)


@functools.cache
def backward_dkdv_kernel(dim: int, block_q: int, block_kv: int, dtype: str, feature: str,
                         layout: str, scale: float, arch: str, knobs: Knobs = ()):
    """dK and dV over the reverse LUT, with the linear branch's key-side gradients."""
    merged = _merged("backward_dkdv", (dim, block_q, block_kv), knobs)
    variant = merged.pop("warp_specialization")
    if variant not in dkdv_schedule.WARP_SPECIALIZATION:
        raise ValueError(f"warp_specialization must be one of "
                         f"{dkdv_schedule.WARP_SPECIALIZATION}; got {variant!r}")
    if variant == "auto":
        program = dkdv_schedule.backward_dkdv(dim, block_q, block_kv, dtype, feature, layout,
                                              scale, **merged)
    elif block_kv != dkdv_ws.BLOCK_KV or merged["q_slice"] != dkdv_ws.SLICE \
            or merged["linear_first"]:
        raise ValueError(f"warp_specialization='manual' needs block_kv={dkdv_ws.BLOCK_KV}, "
                         f"q_slice={dkdv_ws.SLICE} and linear_first=False; got block_kv="
                         f"{block_kv}, q_slice={merged['q_slice']}, linear_first="
                         f"{merged['linear_first']}")
    else:
        program = dkdv_ws.backward_dkdv_ws(dim, block_q, dtype, feature, layout, scale,
                                           2 * merged["num_stages"])
    return compile_program(program, arch)
