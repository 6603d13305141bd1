"""Real measurements for the studies (GPU): latency and outputs of a schedule, and the error
of an algorithm setting against full attention.

Latency: CUDA events around each call, median of many calls, rotating through several
sets of fresh random inputs, each with its own LUT from real routing of those inputs.
Outputs: every tensor a call produces on those same inputs, for the bit-identity check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from sla_tl import tilelang_backend
from sla_tl.config_store import TuneKey
from sla_tl.settings import ForwardOutputs, Settings
from sla_tl.synthetic import video_like_qkv
from sla_tl.timing import median_ms

from .bit_identity import Outputs

MODES = ("fwd", "fwd+bwd")


def settings_of(key: TuneKey) -> Settings:
    """The call settings a key fixes (default softmax scale)."""
    return Settings(block_q=key.block_q, block_kv=key.block_kv, feature_map=key.feature_map,
                    linear=key.linear, layout=key.layout)


def _shape(key: TuneKey, length: int) -> tuple[int, ...]:
    if key.layout == "bhsd":
        return (key.batch, key.heads, length, key.dim)
    return (key.batch, length, key.heads, key.dim)


class ScheduleMeasurement(NamedTuple):
    """How a study measures schedules of one problem, on one set of measurement inputs."""

    timer: Callable[[dict], float]
    """Median milliseconds of a call run with a schedule ({kernel: knobs})."""
    outputs: Outputs
    """Every output of a call run with a schedule, per input set (for the bit-identity
    check against the default schedule)."""


def schedule_measurement(key: TuneKey, mode: str = "fwd+bwd", input_sets: int = 3,
                         repeats: int = 30, seed: int = 0) -> ScheduleMeasurement:
    """Timer and outputs of schedules for `key` on the current CUDA device, both on the
    same fresh random inputs (with real routing of each set)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    dtype = getattr(torch, key.dtype)
    s = settings_of(key)

    def fresh(length: int) -> torch.Tensor:
        return torch.randn(_shape(key, length), device="cuda", dtype=dtype, generator=generator)

    sets = []
    for _ in range(input_sets):
        q, k, v, grad = fresh(key.lq), fresh(key.lk), fresh(key.lk), fresh(key.lq)
        routing = tilelang_backend.route(q, k, key.topk, key.k_low, key.block_q, key.block_kv,
                                         key.layout)
        weight = torch.randn(key.dim, key.dim, device="cuda", generator=generator) / key.dim
        bias = torch.randn(key.dim, device="cuda", generator=generator)
        sets.append((q, k, v, grad, routing, weight, bias))

    def timer(schedule: dict) -> float:
        def call(q, k, v, grad, routing, weight, bias):
            saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s, schedule)
            if mode == "fwd+bwd":
                tilelang_backend.backward(grad, q, k, v, saved, routing, weight, bias, s,
                                          schedule)

        return median_ms(call, sets, repeats)

    def outputs(schedule: dict) -> dict[str, torch.Tensor]:
        named = {}
        for number, inputs in enumerate(sets, 1):
            for name, t in _call_outputs(inputs, s, mode, schedule).items():
                named[f"{name} (input set {number})"] = t
        return named

    return ScheduleMeasurement(timer, outputs)


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, math.nan)


def _call_outputs(inputs: tuple, s: Settings, mode: str,
                  schedule: dict) -> dict[str, torch.Tensor]:
    """The outputs of one call, written into buffers filled with NaN first: an element the
    kernels leave unwritten then holds the same bits in every run, never stale memory."""
    q, k, v, grad, routing, weight, bias = inputs
    poisoned = ForwardOutputs(*(t.fill_(math.nan) for t in tilelang_backend.forward(
        q, k, v, routing, weight, bias, s, schedule)))
    saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s, schedule,
                                     buffers=poisoned._asdict())
    named = saved._asdict()
    if mode == "fwd+bwd":
        buffers = dict(dq=_poisoned(q), dk=_poisoned(k), dv=_poisoned(v))
        dq, dk, dv, d_weight, d_bias, _ = tilelang_backend.backward(
            grad, q, k, v, saved, routing, weight, bias, s, schedule, buffers=buffers)
        named.update(dq=dq, dk=dk, dv=dv, d_weight=d_weight, d_bias=d_bias)
    return named


def calibration_inputs(key: TuneKey, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Structured video-like q, k, v at the key's shape (when the user gives none)."""
    if key.lq != key.lk:
        raise ValueError("synthetic calibration needs Lq == Lk; pass calibration=(q, k, v)")
    generator = torch.Generator().manual_seed(seed)
    q, k, v = video_like_qkv(key.batch, key.heads, key.lq, key.dim, generator=generator)
    dtype = getattr(torch, key.dtype)
    if key.layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return tuple(t.to("cuda", dtype).contiguous() for t in (q, k, v))


def error_against_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: TuneKey,
                       knobs: dict, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None) -> float:
    """||SLA - full attention|| / ||full attention|| with the algorithm knobs `knobs`
    overriding the key's. The projection defaults to zero (an untrained SLA module)."""
    merged = key._replace(**knobs)
    s = settings_of(merged)
    dim = q.shape[-1]
    weight = torch.zeros(dim, dim, device=q.device) if weight is None else weight
    bias = torch.zeros(dim, device=q.device) if bias is None else bias
    routing = tilelang_backend.route(q, k, merged.topk, merged.k_low, merged.block_q,
                                     merged.block_kv, merged.layout)
    out = tilelang_backend.forward(q, k, v, routing, weight, bias, s).out
    to_bhsd = (lambda t: t) if key.layout == "bhsd" else (lambda t: t.transpose(1, 2))
    full = torch.nn.functional.scaled_dot_product_attention(*(to_bhsd(t) for t in (q, k, v)))
    diff = (to_bhsd(out).double() - full.double()).norm()
    return (diff / full.double().norm()).item()
