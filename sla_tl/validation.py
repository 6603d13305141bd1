"""Argument checks for the public entries: every error names the argument at fault.

Checks read metadata only (shapes, dtypes, devices), never tensor values, so they
never synchronise with the GPU and are safe inside CUDA-graph capture and tracing
(a routing's values are checked by `routing_check`). Each operator runs one of
`check_route`, `check_attention` and `check_backward` once per call (its fake
implementation the same one). A new tensor argument needs one `check_like` call with
its expected shape and dtype.
"""

from __future__ import annotations

import math
import numbers

import torch

from .routing import DTYPE as ROUTING_DTYPE
from .routing import Routing, field_shapes
from .settings import ForwardOutputs, Settings
from .spec import (
    BLOCK_MULTIPLE,
    DEFAULT_FEATURE_MAP,
    DEFAULT_LINEAR,
    FEATURE_MAPS,
    HEAD_DIMS,
    LAYOUTS,
    LINEAR_MODES,
    linear_state_rows,
    num_blocks,
)

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_DTYPE_NAMES = tuple(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
# The CPU implementation is the reference; it also takes wide floats so gradients can be
# checked in float64.
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float32, torch.float64)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """`value` must be one of the strings in `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def is_finite(value: object) -> bool:
    """A real number (not a bool) that a float64 holds finitely (an int too large for one,
    as the operators' float arguments are, is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def is_finite_positive(value: object) -> bool:
    """`is_finite` and > 0."""
    return is_finite(value) and value > 0


def check_ratio(name: str, value: object) -> None:
    """`value` must be a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1]; got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # compared as is: float() of a huge int overflows
        raise ValueError(f"{name} must be in [0, 1]; got {value}")


# The operators' schemas take int64.
_INT64_LIMIT = 2**63


def check_positive_int(name: str, value: object) -> None:
    """`value` must be an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1; got {value}")


def check_block(name: str, value: object) -> None:
    """`value` must be a positive multiple of 16 (that the operators' int64 can hold)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value <= 0 or value % BLOCK_MULTIPLE:
        raise ValueError(f"{name} must be a positive multiple of {BLOCK_MULTIPLE}; got {value}")
    if value >= _INT64_LIMIT:
        raise ValueError(f"{name} must be below 2**63; got {value}")


def check_scale(scale: object) -> None:
    """`scale` must be None or a positive finite number."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    if not is_finite_positive(scale):
        raise ValueError(f"scale must be positive and finite; got {scale}")


def check_tensors(**named: object) -> None:
    """Each argument must be a tensor (the operators' own error for a non-tensor is cryptic)."""
    for name, x in named.items():
        _check_tensor(name, x)


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    return x


def check_like(name: str, x: object, shape: tuple[int, ...], device: torch.device,
               dtype: torch.dtype | None = None) -> None:
    """`x` must be a tensor of `shape` on `device`, of `dtype` (None: any floating dtype)."""
    x = _check_tensor(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(x.shape)}")
    if dtype is None and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}; got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on q's device {device}; got {x.device}")


def check_qkv(q: object, k: object, v: object, layout: str) -> None:
    """q, k, v: rank 4 in `layout`, one float dtype and device, matching B, H and D."""
    check_choice("layout", layout, LAYOUTS)
    axes = "(B, H, L, D)" if layout == "bhsd" else "(B, L, H, D)"
    tensors = {"q": _check_tensor("q", q), "k": _check_tensor("k", k), "v": _check_tensor("v", v)}
    for name, x in tensors.items():
        if x.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4 {axes} for layout {layout!r}; got shape {tuple(x.shape)}"
            )
    for name, x in tensors.items():
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} must be on a cpu or cuda device; got {x.device}")
        allowed = REFERENCE_DTYPES if x.device.type == "cpu" else KERNEL_DTYPES
        if x.dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise TypeError(f"{name} must be one of {names} on {x.device.type}; got {x.dtype}")
    for name in ("k", "v"):
        x = tensors[name]
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}; got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {x.device}")
    qb, kb, vb = (x if layout == "bhsd" else x.transpose(1, 2) for x in (q, k, v))
    if qb.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim of q must be one of {HEAD_DIMS}; got {qb.shape[-1]}")
    for name, x in (("k", kb), ("v", vb)):
        if x.shape[0] != qb.shape[0] or x.shape[1] != qb.shape[1] or x.shape[3] != qb.shape[3]:
            raise ValueError(
                f"{name} must match q in batch, heads and head dim {axes}; "
                f"got {name} {tuple(x.shape)} and q {tuple(qb.shape)} as (B, H, L, D)"
            )
    if vb.shape[2] != kb.shape[2]:
        raise ValueError(f"v must have k's length {kb.shape[2]}; got {vb.shape[2]}")
    if qb.shape[0] == 0 or qb.shape[1] == 0:
        raise ValueError(f"q must have at least one batch entry and one head {axes}; "
                         f"got shape {tuple(q.shape)}")
    if qb.shape[2] == 0 or kb.shape[2] == 0:
        raise ValueError("q and k must have at least one row along L")


def check_projection(proj_weight: object, proj_bias: object, q: torch.Tensor) -> None:
    """proj_weight (D, D) and proj_bias (D,): floating, on q's device."""
    dim = q.shape[-1]
    check_like("proj_weight", proj_weight, (dim, dim), q.device)
    check_like("proj_bias", proj_bias, (dim,), q.device)


def check_saved(grad_out: object, saved: ForwardOutputs, q: torch.Tensor, s: Settings) -> None:
    """What `sla::attention_bwd` takes besides q, k, v: the output's gradient (q's shape and
    dtype) and the forward's outputs, shaped as `sla::attention_fwd` returns them."""
    batch, heads, lq, dim = q.shape if s.layout == "bhsd" else (
        q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    rows = linear_state_rows(lq, s.block_q, s.linear)
    expected = (
        ("grad_out", grad_out, tuple(q.shape), q.dtype),
        ("out", saved.out, tuple(q.shape), q.dtype),
        ("lse", saved.lse, (batch, heads, lq), torch.float32),
        ("o_lin", saved.linear, tuple(q.shape), q.dtype),
        ("h_rows", saved.h_rows, (batch, heads, rows, dim, dim), q.dtype),
        ("z_rows", saved.z_rows, (batch, heads, rows, dim), torch.float32),
    )
    for name, x, shape, dtype in expected:
        check_like(name, x, shape, q.device, dtype)


def check_gate(gate: object, q: torch.Tensor, layout: str) -> None:
    """gate: None, or a floating (B, H, Lq) tensor ((B, Lq, H) for layout "bshd") on q's device."""
    if gate is None:
        return
    gate = _check_tensor("gate", gate)
    batch, heads, lq = (q.shape[0], q.shape[1], q.shape[2]) if layout == "bhsd" else (
        q.shape[0], q.shape[2], q.shape[1])
    shape, axes = ((batch, heads, lq), "(B, H, Lq)") if layout == "bhsd" else (
        (batch, lq, heads), "(B, Lq, H)")
    if tuple(gate.shape) != shape:
        raise ValueError(f"gate must have shape {axes} = {shape} for layout {layout!r}; "
                         f"got {tuple(gate.shape)}")
    if not gate.is_floating_point():
        raise TypeError(f"gate must be a floating tensor; got {gate.dtype}")
    if gate.device != q.device:
        raise ValueError(f"gate must be on q's device {q.device}; got {gate.device}")


def check_settings(
    block_q: object, block_kv: object, feature_map: object, linear: object, scale: object
) -> None:
    """Block sizes, feature map, linear mode and scale."""
    check_block("block_q", block_q)
    check_block("block_kv", block_kv)
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    check_choice("linear", linear, LINEAR_MODES)
    check_scale(scale)


# Each field's rank (a LUT's width is free up to Nk, checked below).
_ROUTING_RANKS = tuple(len(shape) for shape in field_shapes((0, 0, 0), (0, 0)))
_ROUTING_DTYPE_NAME = str(ROUTING_DTYPE).removeprefix("torch.")


def check_routing(
    routing: Routing, q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, layout: str
) -> None:
    """A precomputed routing: int32, on q's device, shaped for these q, k and block sizes
    (its values: `routing_check`)."""
    batch, heads, lq = (q.shape[0], q.shape[1], q.shape[2]) if layout == "bhsd" else (
        q.shape[0], q.shape[2], q.shape[1])
    lk = k.shape[2] if layout == "bhsd" else k.shape[1]
    rows = (batch, heads, num_blocks(lq, block_q))
    for name, x, rank in zip(Routing._fields, routing, _ROUTING_RANKS, strict=True):
        x = _check_tensor(name, x)
        if x.dtype != ROUTING_DTYPE:
            raise TypeError(f"{name} must be {_ROUTING_DTYPE_NAME}; got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {x.device}")
        if x.dim() != rank or tuple(x.shape[:3]) != rows:
            raise ValueError(
                f"{name} must have shape (B, H, Mq{', width' if rank == 4 else ''}) with "
                f"(B, H, Mq) = {rows}; got {tuple(x.shape)}"
            )
    n_kv = num_blocks(lk, block_kv)
    for name in ("lut", "neg_lut"):
        width = getattr(routing, name).shape[-1]
        if width > n_kv:
            raise ValueError(f"{name} is {width} wide but there are only {n_kv} key blocks")


# ---------------------------------------------------------------- one pass per operator


def check_route(q: object, k: object, topk: object, k_low: object, block_q: object,
                block_kv: object, layout: object) -> None:
    """Everything `sla::route` takes."""
    check_choice("layout", layout, LAYOUTS)
    check_qkv(q, k, k, layout)
    check_ratio("topk", topk)
    check_ratio("k_low", k_low)
    check_settings(block_q, block_kv, DEFAULT_FEATURE_MAP, DEFAULT_LINEAR, None)


def check_attention(q: object, k: object, v: object, proj_weight: object, proj_bias: object,
                    gate: object, s: Settings, routing: Routing | None = None,
                    ratios: tuple[object, object] | None = None) -> None:
    """Everything an attention forward takes: q, k, v, the settings, the projection, the
    gate, and a given `routing` (its shapes) or the routing `ratios` (topk, k_low)."""
    check_qkv(q, k, v, s.layout)
    check_settings(s.block_q, s.block_kv, s.feature_map, s.linear, s.scale)
    check_projection(proj_weight, proj_bias, q)
    check_gate(gate, q, s.layout)
    if routing is not None:
        check_routing(routing, q, k, s.block_q, s.block_kv, s.layout)
    if ratios is not None:
        check_ratio("topk", ratios[0])
        check_ratio("k_low", ratios[1])


def check_backward(grad_out: object, q: object, k: object, v: object, saved: ForwardOutputs,
                   routing: Routing, proj_weight: object, proj_bias: object, gate: object,
                   s: Settings) -> None:
    """Everything `sla::attention_bwd` takes: a forward's arguments, its outputs and the
    output's gradient."""
    check_attention(q, k, v, proj_weight, proj_bias, gate, s, routing=routing)
    check_saved(grad_out, saved, q, s)
