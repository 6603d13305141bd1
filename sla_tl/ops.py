"""The `torch.ops.sla` operators: schemas, device kernels, fake kernels and autograd.

User-facing:
  sla::attention      route, then sparse + linear attention (returns the output)
  sla::attention_lut  the same for a precomputed routing (a fixed or learned block selection)
Building blocks (what the autograd formula and `torch.compile` graphs are made of):
  sla::route          block classification; not differentiable
  sla::attention_fwd  output, and what the backward reuses (see settings.ForwardOutputs)
  sla::attention_bwd  gradients for q, k, v, the projection and the gate

Every attention operator takes an optional `gate` (SALAD's): O = O_s + g * proj(O_l), g of
shape (B, H, Lq) in layout "bhsd", (B, Lq, H) in "bshd"; None means g = 1.

Device kernels come from `sla_tl.dispatch`. None of them synchronises with the host,
so the operators can be captured in a CUDA graph. A precomputed routing is checked by its
backend: fully on the CPU (a ValueError), on the device on CUDA (rows at fault give NaN;
see `sla_tl.routing_check`).
"""

from __future__ import annotations

import torch

from . import spec
from .dispatch import BACKENDS
from .layout import to_bhsd
from .routing import Routing
from .settings import ForwardOutputs, Settings
from .validation import (
    check_choice,
    check_gate,
    check_projection,
    check_qkv,
    check_ratio,
    check_routing,
    check_saved,
    check_settings,
    check_tensors,
)

# The dispatcher leaves out trailing arguments equal to their schema defaults when it calls
# a Python kernel, so only the user-facing operators declare defaults, and their kernels
# repeat them (see _DEFAULTS). Their gate comes last, after the settings, so that calls
# written before it existed keep their meaning.
_SETTINGS_SCHEMA = (
    "int block_q, int block_kv, str feature_map, str linear, float? scale, str layout"
)
_SETTINGS_SCHEMA_WITH_DEFAULTS = (
    f"int block_q={spec.DEFAULT_BLOCK_Q}, int block_kv={spec.DEFAULT_BLOCK_KV}, "
    f'str feature_map="{spec.DEFAULT_FEATURE_MAP}", str linear="{spec.DEFAULT_LINEAR}", '
    f'float? scale=None, str layout="{spec.DEFAULT_LAYOUT}"'
)
_DEFAULTS = Settings(
    spec.DEFAULT_BLOCK_Q, spec.DEFAULT_BLOCK_KV, spec.DEFAULT_FEATURE_MAP, spec.DEFAULT_LINEAR,
    None, spec.DEFAULT_LAYOUT,
)
_ROUTING_SCHEMA = "Tensor lut, Tensor lut_count, Tensor neg_lut, Tensor neg_count"
_PROJECTION_SCHEMA = "Tensor proj_weight, Tensor proj_bias, Tensor? gate"

_lib = torch.library.Library("sla", "DEF")
_lib.define(
    "route(Tensor q, Tensor k, float topk, float k_low, int block_q, int block_kv, str layout)"
    " -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    f"attention_fwd(Tensor q, Tensor k, Tensor v, {_ROUTING_SCHEMA}, {_PROJECTION_SCHEMA},"
    f" {_SETTINGS_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# The last result is d(gate), empty where there is no gate (a schema cannot return None).
_lib.define(
    f"attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
    f" Tensor o_lin, Tensor h_rows, Tensor z_rows,"
    f" {_ROUTING_SCHEMA}, {_PROJECTION_SCHEMA}, {_SETTINGS_SCHEMA})"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    f"attention_lut(Tensor q, Tensor k, Tensor v, {_ROUTING_SCHEMA}, Tensor proj_weight,"
    f" Tensor proj_bias, {_SETTINGS_SCHEMA_WITH_DEFAULTS}, Tensor? gate=None) -> Tensor"
)
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor proj_weight, Tensor proj_bias,"
    f" float topk={spec.DEFAULT_TOPK}, float k_low={spec.DEFAULT_K_LOW},"
    f" {_SETTINGS_SCHEMA_WITH_DEFAULTS}, Tensor? gate=None) -> Tensor"
)


def _settings(given: tuple) -> Settings:
    """Settings from a kernel's trailing arguments, the omitted ones taking their defaults."""
    return Settings(*given, *_DEFAULTS[len(given):])


def _settings_and_gate(given: tuple) -> tuple[Settings, torch.Tensor | None]:
    """A user-facing kernel's trailing arguments: the settings, then the gate (if given)."""
    n = len(Settings._fields)
    return _settings(given[:n]), (given[n] if len(given) > n else None)


def _no_gate_grad(q: torch.Tensor) -> torch.Tensor:
    """attention_bwd's d(gate) result for a call without a gate."""
    return q.new_empty((0,), dtype=torch.float32)


# ---------------------------------------------------------------- checks and shapes


def _check_call(q, k, v, proj_weight, proj_bias, gate, s: Settings) -> None:
    check_qkv(q, k, v, s.layout)
    check_settings(s.block_q, s.block_kv, s.feature_map, s.linear, s.scale)
    check_projection(proj_weight, proj_bias, q)
    check_gate(gate, q, s.layout)


def _check_backward(grad_out, q, k, v, saved: ForwardOutputs, routing: Routing, proj_weight,
                    proj_bias, gate, s: Settings) -> None:
    _check_call(q, k, v, proj_weight, proj_bias, gate, s)
    check_routing(routing, q, k, s.block_q, s.block_kv, s.layout)
    check_saved(grad_out, saved, q, s)


def _check_route(q, k, topk, k_low, block_q, block_kv, layout) -> None:
    check_choice("layout", layout, spec.LAYOUTS)
    check_qkv(q, k, k, layout)
    check_ratio("topk", topk)
    check_ratio("k_low", k_low)
    check_settings(block_q, block_kv, spec.DEFAULT_FEATURE_MAP, spec.DEFAULT_LINEAR, None)


def _empty_like_input(x: torch.Tensor) -> torch.Tensor:
    """An input-shaped result as the device kernels return it: contiguous in the user's layout."""
    return x.new_empty(x.shape)


def forward_outputs_like(q: torch.Tensor, s: Settings) -> ForwardOutputs:
    """Empty tensors shaped as `sla::attention_fwd` returns them for q (fake kernels)."""
    b, h, lq, d = to_bhsd(q, s.layout).shape
    n_rows = spec.linear_state_rows(lq, s.block_q, s.linear)
    return ForwardOutputs(_empty_like_input(q), q.new_empty((b, h, lq), dtype=torch.float32),
                          _empty_like_input(q), q.new_empty((b, h, n_rows, d, d)),
                          q.new_empty((b, h, n_rows, d), dtype=torch.float32))


def gradients_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                   proj_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Empty tensors shaped as `sla::attention_bwd` returns them (fake kernels)."""
    return (
        _empty_like_input(q),
        _empty_like_input(k),
        _empty_like_input(v),
        torch.empty_like(proj_weight, memory_format=torch.contiguous_format),
        torch.empty_like(proj_bias, memory_format=torch.contiguous_format),
    )


# ---------------------------------------------------------------- device kernels


def _route(q, k, topk, k_low, block_q, block_kv, layout):
    _check_route(q, k, topk, k_low, block_q, block_kv, layout)
    return tuple(BACKENDS[q.device.type].route(q, k, topk, k_low, block_q, block_kv, layout))


def _attention_fwd(q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias, gate,
                   *settings):
    s = _settings(settings)
    routing = Routing(lut, lut_count, neg_lut, neg_count)
    _check_call(q, k, v, proj_weight, proj_bias, gate, s)
    check_routing(routing, q, k, s.block_q, s.block_kv, s.layout)
    return tuple(BACKENDS[q.device.type].forward(q, k, v, routing, proj_weight, proj_bias, s,
                                                 gate=gate))


def _attention_bwd(grad_out, q, k, v, out, lse, linear, h_rows, z_rows, lut, lut_count, neg_lut,
                   neg_count, proj_weight, proj_bias, gate, *settings):
    s = _settings(settings)
    routing = Routing(lut, lut_count, neg_lut, neg_count)
    saved = ForwardOutputs(out, lse, linear, h_rows, z_rows)
    _check_backward(grad_out, q, k, v, saved, routing, proj_weight, proj_bias, gate, s)
    *grads, d_gate = BACKENDS[q.device.type].backward(
        grad_out, q, k, v, saved, routing, proj_weight, proj_bias, s, gate=gate
    )
    return (*grads, _no_gate_grad(q) if d_gate is None else d_gate)


def _attention_lut(q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias, *rest):
    s, gate = _settings_and_gate(rest)
    outputs = _attention_fwd(q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias,
                             gate, *s)
    return outputs[0]


def _attention(q, k, v, proj_weight, proj_bias, topk=spec.DEFAULT_TOPK, k_low=spec.DEFAULT_K_LOW,
               *rest):
    s, gate = _settings_and_gate(rest)
    _check_call(q, k, v, proj_weight, proj_bias, gate, s)
    routing = _route(q, k, topk, k_low, s.block_q, s.block_kv, s.layout)
    return _attention_lut(q, k, v, *routing, proj_weight, proj_bias, *s, gate)


for _device_key in ("CPU", "CUDA"):
    for _name, _fn in (
        ("route", _route),
        ("attention_fwd", _attention_fwd),
        ("attention_bwd", _attention_bwd),
        ("attention_lut", _attention_lut),
        ("attention", _attention),
    ):
        _lib.impl(_name, _fn, _device_key)


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("sla::route", lib=_lib)
def _route_fake(q, k, topk, k_low, block_q, block_kv, layout):
    _check_route(q, k, topk, k_low, block_q, block_kv, layout)
    b, h, lq, _ = to_bhsd(q, layout).shape
    n_q = spec.num_blocks(lq, block_q)
    n_kv = spec.num_blocks(to_bhsd(k, layout).shape[2], block_kv)
    n_crit = spec.num_critical(topk, n_kv)
    n_neg = spec.num_negligible(k_low, n_kv, n_crit)
    new = q.new_empty
    return (
        new((b, h, n_q, n_crit), dtype=torch.int32),
        new((b, h, n_q), dtype=torch.int32),
        new((b, h, n_q, n_neg), dtype=torch.int32),
        new((b, h, n_q), dtype=torch.int32),
    )


@torch.library.register_fake("sla::attention_fwd", lib=_lib)
def _attention_fwd_fake(q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias, gate,
                        *settings):
    s = _settings(settings)
    _check_call(q, k, v, proj_weight, proj_bias, gate, s)
    check_routing(Routing(lut, lut_count, neg_lut, neg_count), q, k, s.block_q, s.block_kv,
                  s.layout)
    return tuple(forward_outputs_like(q, s))


@torch.library.register_fake("sla::attention_bwd", lib=_lib)
def _attention_bwd_fake(grad_out, q, k, v, out, lse, linear, h_rows, z_rows, lut, lut_count,
                        neg_lut, neg_count, proj_weight, proj_bias, gate, *settings):
    _check_backward(grad_out, q, k, v, ForwardOutputs(out, lse, linear, h_rows, z_rows),
                    Routing(lut, lut_count, neg_lut, neg_count), proj_weight, proj_bias, gate,
                    _settings(settings))
    return (*gradients_like(q, k, v, proj_weight, proj_bias),
            _no_gate_grad(q) if gate is None else _empty_like_input(gate))


@torch.library.register_fake("sla::attention_lut", lib=_lib)
def _attention_lut_fake(q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias,
                        *rest):
    s, gate = _settings_and_gate(rest)
    return _attention_fwd_fake(q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight,
                               proj_bias, gate, *s)[0]


@torch.library.register_fake("sla::attention", lib=_lib)
def _attention_fake(q, k, v, proj_weight, proj_bias, topk=spec.DEFAULT_TOPK,
                    k_low=spec.DEFAULT_K_LOW, *rest):
    s, gate = _settings_and_gate(rest)
    _check_call(q, k, v, proj_weight, proj_bias, gate, s)
    check_ratio("topk", topk)
    check_ratio("k_low", k_low)
    return _empty_like_input(q)


# ---------------------------------------------------------------- autograd


class _SparseLinearAttentionFunction(torch.autograd.Function):
    """Forward through `sla::attention_fwd`, backward through `sla::attention_bwd`."""

    @staticmethod
    def forward(ctx, q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias, gate,
                *settings):
        with torch._C._AutoDispatchBelowAutograd():
            outputs = torch.ops.sla.attention_fwd(
                q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias, gate,
                *settings
            )
        ctx.save_for_backward(q, k, v, *outputs, lut, lut_count, neg_lut, neg_count,
                              proj_weight, proj_bias, gate)
        ctx.settings = settings
        return outputs[0]

    @staticmethod
    def backward(ctx, grad_out):
        *saved, gate = ctx.saved_tensors
        dq, dk, dv, dw, db, d_gate = torch.ops.sla.attention_bwd(grad_out, *saved, gate,
                                                                 *ctx.settings)
        no_grads = (None,) * len(ctx.settings)
        return (dq, dk, dv, None, None, None, None, dw, db,
                None if gate is None else d_gate, *no_grads)


def _wants_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _attention_lut_autograd(q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias,
                            *rest):
    # The dispatcher lets None through a Tensor argument; say which one before using it.
    check_tensors(q=q, k=k, v=v, lut=lut, lut_count=lut_count, neg_lut=neg_lut,
                  neg_count=neg_count, proj_weight=proj_weight, proj_bias=proj_bias)
    s, gate = _settings_and_gate(rest)
    if not _wants_grad(q, k, v, proj_weight, proj_bias, gate):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.sla.attention_lut(
                q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias, *s, gate
            )
    return _SparseLinearAttentionFunction.apply(
        q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias, gate, *s
    )


def _attention_autograd(q, k, v, proj_weight, proj_bias, topk=spec.DEFAULT_TOPK,
                        k_low=spec.DEFAULT_K_LOW, *rest):
    check_tensors(q=q, k=k, v=v, proj_weight=proj_weight, proj_bias=proj_bias)
    s, gate = _settings_and_gate(rest)
    with torch._C._AutoDispatchBelowAutograd():
        if not _wants_grad(q, k, v, proj_weight, proj_bias, gate):
            return torch.ops.sla.attention(q, k, v, proj_weight, proj_bias, topk, k_low, *s,
                                           gate)
        routing = torch.ops.sla.route(q, k, topk, k_low, s.block_q, s.block_kv, s.layout)
    return _SparseLinearAttentionFunction.apply(q, k, v, *routing, proj_weight, proj_bias, gate,
                                                *s)


_lib.impl("attention_lut", _attention_lut_autograd, "Autograd")
_lib.impl("attention", _attention_autograd, "Autograd")
