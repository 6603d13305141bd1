"""The `torch.ops.sla` operators: `torch.library` custom ops with device, fake and autograd
implementations.

User-facing:
  sla::attention       route, then sparse + linear attention (returns the output)
  sla::attention_lut   the same for a precomputed routing (a fixed or learned block selection)
Building blocks (what the autograd formula and `torch.compile` graphs are made of):
  sla::route                 block classification; not differentiable
  sla::attention_fwd         output, and what the backward reuses (see settings.ForwardOutputs)
  sla::routed_attention_fwd  routing then the forward in one call (on CUDA one plan, so
                             kernels can share work across the two): attention_fwd's
                             outputs, then the routing
  sla::attention_bwd         gradients for q, k, v, the projection and the gate

The building blocks are custom ops (`torch.library.custom_op`): each checks its arguments
once (`sla_tl.validation`, metadata only), then runs the backend of the inputs' device
(`sla_tl.dispatch`); its fake implementation checks the same and makes the output shapes;
`attention_fwd` and `routed_attention_fwd` are differentiable in their first output through
`attention_bwd` (`register_autograd`). The user-facing operators are compositions of one
building block each (registered as CompositeImplicitAutograd, so autograd and
`torch.compile` see the building block): a custom op's registered backward sees only the
op's own outputs, and the backward needs more than the one tensor these return. A
composition runs its building block through `_EntryFunction`, an autograd.Function with
the building block's own formula: in eager mode it skips the registered autograd's
per-call pass over the schema, and torch.compile traces it into the same graph of
building blocks.
Their schemas, defaults included, are inferred from the Python signatures below, the one
place the defaults are spelled.

Every attention operator takes an optional `gate` (SALAD's): O = O_s + g * proj(O_l), g of
shape (B, H, Lq) in layout "bhsd", (B, Lq, H) in "bshd"; None means g = 1.

The device implementations run with autocast off (a plan's phases, `sla_tl.phases`; the
reference backend): an autocast region around a call neither casts the operators' inputs
nor changes the dtypes they compute in (their torch steps would otherwise be recast, e.g.
the block scores the selection kernel reads in float32).

None of the device implementations synchronises with the host, so the operators can be
captured in a CUDA graph. A precomputed routing is checked by its backend: fully on the CPU
(a ValueError), on the device on CUDA (rows at fault give NaN; see `sla_tl.routing_check`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import spec
from .dispatch import BACKENDS
from .layout import to_bhsd
from .routing import Routing
from .routing import empty as empty_routing
from .settings import ForwardOutputs, Settings
from .validation import check_attention, check_backward, check_route

# ---------------------------------------------------------------- shapes (fake kernels)


def _empty_like_input(x: Tensor) -> Tensor:
    """An input-shaped result as the device kernels return it: contiguous in the user's layout."""
    return x.new_empty(x.shape)


def forward_outputs_like(q: Tensor, s: Settings) -> ForwardOutputs:
    """Empty tensors shaped as `sla::attention_fwd` returns them for q (fake kernels)."""
    b, h, lq, d = to_bhsd(q, s.layout).shape
    n_rows = spec.linear_state_rows(lq, s.block_q, s.linear)
    return ForwardOutputs(_empty_like_input(q), q.new_empty((b, h, lq), dtype=torch.float32),
                          _empty_like_input(q), q.new_empty((b, h, n_rows, d, d)),
                          q.new_empty((b, h, n_rows, d), dtype=torch.float32))


def gradients_like(q: Tensor, k: Tensor, v: Tensor, proj_weight: Tensor,
                   proj_bias: Tensor) -> tuple[Tensor, ...]:
    """Empty tensors shaped as `sla::attention_bwd` returns them (fake kernels)."""
    return (
        _empty_like_input(q),
        _empty_like_input(k),
        _empty_like_input(v),
        torch.empty_like(proj_weight, memory_format=torch.contiguous_format),
        torch.empty_like(proj_bias, memory_format=torch.contiguous_format),
    )


def routing_like(q: Tensor, k: Tensor, topk: float, k_low: float, block_q: int,
                 block_kv: int, layout: str) -> Routing:
    """Empty tensors shaped as `sla::route` returns them (fake kernels)."""
    b, h, lq, _ = to_bhsd(q, layout).shape
    n_kv = spec.num_blocks(to_bhsd(k, layout).shape[2], block_kv)
    n_crit = spec.num_critical(topk, n_kv)
    widths = (n_crit, spec.num_negligible(k_low, n_kv, n_crit))
    return empty_routing((b, h, spec.num_blocks(lq, block_q)), widths, q.device)


def _no_gate_grad(q: Tensor) -> Tensor:
    """attention_bwd's d(gate) result for a call without a gate (a schema cannot return None)."""
    return q.new_empty((0,), dtype=torch.float32)


# ---------------------------------------------------------------- sla::route


@torch.library.custom_op("sla::route", mutates_args=())
def route(q: Tensor, k: Tensor, topk: float, k_low: float, block_q: int, block_kv: int,
          layout: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block classification (see `sla_tl.route`)."""
    check_route(q, k, topk, k_low, block_q, block_kv, layout)
    return tuple(BACKENDS[q.device.type].route(q, k, topk, k_low, block_q, block_kv, layout))


@route.register_fake
def _route_fake(q, k, topk, k_low, block_q, block_kv, layout):
    check_route(q, k, topk, k_low, block_q, block_kv, layout)
    return tuple(routing_like(q, k, topk, k_low, block_q, block_kv, layout))


# ---------------------------------------------------------------- sla::attention_fwd


@torch.library.custom_op("sla::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, lut: Tensor, lut_count: Tensor,
                  neg_lut: Tensor, neg_count: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                  gate: Tensor | None, block_q: int, block_kv: int, feature_map: str,
                  linear: str, scale: float | None, layout: str,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward for a given routing: (out, lse, o_lin, h_rows, z_rows)."""
    s = Settings.from_op_args(block_q, block_kv, feature_map, linear, scale, layout)
    routing = Routing(lut, lut_count, neg_lut, neg_count)
    check_attention(q, k, v, proj_weight, proj_bias, gate, s, routing=routing)
    return tuple(BACKENDS[q.device.type].forward(q, k, v, routing, proj_weight, proj_bias, s,
                                                 gate=gate))


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias,
                        gate, *settings):
    s = Settings.from_op_args(*settings)
    check_attention(q, k, v, proj_weight, proj_bias, gate, s,
                    routing=Routing(lut, lut_count, neg_lut, neg_count))
    return tuple(forward_outputs_like(q, s))


# ---------------------------------------------------------------- sla::routed_attention_fwd


@torch.library.custom_op("sla::routed_attention_fwd", mutates_args=())
def routed_attention_fwd(q: Tensor, k: Tensor, v: Tensor, proj_weight: Tensor,
                         proj_bias: Tensor, topk: float, k_low: float, block_q: int,
                         block_kv: int, feature_map: str, linear: str, scale: float | None,
                         layout: str, gate: Tensor | None,
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                    Tensor, Tensor]:
    """Routing then the forward: (out, lse, o_lin, h_rows, z_rows, lut, lut_count, neg_lut,
    neg_count)."""
    s = Settings.from_op_args(block_q, block_kv, feature_map, linear, scale, layout)
    check_attention(q, k, v, proj_weight, proj_bias, gate, s, ratios=(topk, k_low))
    outputs, routing = BACKENDS[q.device.type].routed_forward(q, k, v, proj_weight, proj_bias,
                                                              topk, k_low, s, gate=gate)
    return (*outputs, *routing)


@routed_attention_fwd.register_fake
def _routed_attention_fwd_fake(q, k, v, proj_weight, proj_bias, topk, k_low, block_q,
                               block_kv, feature_map, linear, scale, layout, gate):
    s = Settings.from_op_args(block_q, block_kv, feature_map, linear, scale, layout)
    check_attention(q, k, v, proj_weight, proj_bias, gate, s, ratios=(topk, k_low))
    return (*forward_outputs_like(q, s),
            *routing_like(q, k, topk, k_low, block_q, block_kv, layout))


# ---------------------------------------------------------------- sla::attention_bwd

# The last result is d(gate), empty where there is no gate (a schema cannot return None).


@torch.library.custom_op("sla::attention_bwd", mutates_args=())
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  o_lin: Tensor, h_rows: Tensor, z_rows: Tensor, lut: Tensor, lut_count: Tensor,
                  neg_lut: Tensor, neg_count: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                  gate: Tensor | None, block_q: int, block_kv: int, feature_map: str,
                  linear: str, scale: float | None, layout: str,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, d_weight, d_bias, d_gate) from the forward's outputs."""
    s = Settings.from_op_args(block_q, block_kv, feature_map, linear, scale, layout)
    routing = Routing(lut, lut_count, neg_lut, neg_count)
    saved = ForwardOutputs(out, lse, o_lin, h_rows, z_rows)
    check_backward(grad_out, q, k, v, saved, routing, proj_weight, proj_bias, gate, s)
    *grads, d_gate = BACKENDS[q.device.type].backward(
        grad_out, q, k, v, saved, routing, proj_weight, proj_bias, s, gate=gate)
    return (*grads, _no_gate_grad(q) if d_gate is None else d_gate)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, o_lin, h_rows, z_rows, lut, lut_count,
                        neg_lut, neg_count, proj_weight, proj_bias, gate, *settings):
    check_backward(grad_out, q, k, v, ForwardOutputs(out, lse, o_lin, h_rows, z_rows),
                   Routing(lut, lut_count, neg_lut, neg_count), proj_weight, proj_bias, gate,
                   Settings.from_op_args(*settings))
    return (*gradients_like(q, k, v, proj_weight, proj_bias),
            _no_gate_grad(q) if gate is None else _empty_like_input(gate))


# ---------------------------------------------------------------- autograd


def _save(ctx, q, k, v, outputs, routing, proj_weight, proj_bias, gate, settings) -> None:
    ctx.save_for_backward(q, k, v, *outputs, *routing, proj_weight, proj_bias, gate)
    ctx.settings = settings
    if not isinstance(ctx, _EntryFunction):  # the building block's outputs past the first
        ctx.mark_non_differentiable(*outputs[1:], *routing)


def _gradients(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """(dq, dk, dv, d_weight, d_bias, d_gate or None) through sla::attention_bwd."""
    q, k, v, *saved = ctx.saved_tensors
    *saved, gate = saved
    dq, dk, dv, dw, db, d_gate = torch.ops.sla.attention_bwd(grad_out, q, k, v, *saved, gate,
                                                             *ctx.settings)
    return dq, dk, dv, dw, db, None if gate is None else d_gate


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, lut, lut_count, neg_lut, neg_count, proj_weight, proj_bias, gate, *settings = inputs
    _save(ctx, q, k, v, output, (lut, lut_count, neg_lut, neg_count), proj_weight, proj_bias,
          gate, settings)


def _fwd_backward(ctx, grad_out, *_other_output_grads):
    dq, dk, dv, dw, db, d_gate = _gradients(ctx, grad_out)
    return (dq, dk, dv, None, None, None, None, dw, db, d_gate, *(None,) * len(ctx.settings))


attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _routed_setup_context(ctx, inputs, output) -> None:
    q, k, v, proj_weight, proj_bias, _topk, _k_low, *settings, gate = inputs
    _save(ctx, q, k, v, output[:5], output[5:], proj_weight, proj_bias, gate, settings)


def _routed_backward(ctx, grad_out, *_other_output_grads):
    dq, dk, dv, dw, db, d_gate = _gradients(ctx, grad_out)
    return (dq, dk, dv, dw, db, None, None, *(None,) * len(ctx.settings), d_gate)


routed_attention_fwd.register_autograd(_routed_backward, setup_context=_routed_setup_context)


class _EntryFunction(torch.autograd.Function):
    """The autograd of a user-facing operator: its building block runs below autograd,
    with the building block's own formula (`_FORMULAS`).

    The building blocks' registered autograd (what a direct call of a building block uses)
    costs about 70 us a call on the host in torch 2.13: before `setup_context` it fills in
    the schema's defaults, reading the 16 arguments' schema through pybind once per
    argument. A call that only needs the first output does the same here without it."""

    @staticmethod
    def forward(ctx, op, *inputs):
        outputs = op(*inputs)  # autograd is off in here: the op's own formula is not run
        ctx.op = op
        _FORMULAS[op][0](ctx, inputs, outputs)
        return outputs[0]

    @staticmethod
    def backward(ctx, grad_out):
        return (None, *_FORMULAS[ctx.op][1](ctx, grad_out))


_FORMULAS = {
    torch.ops.sla.attention_fwd.default: (_fwd_setup_context, _fwd_backward),
    torch.ops.sla.routed_attention_fwd.default: (_routed_setup_context, _routed_backward),
}
"""A building block's (setup_context, backward)."""


def _entry(op, *inputs) -> Tensor:
    """The first output of a building block, differentiable."""
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad
                                       for x in inputs):
        return _EntryFunction.apply(op, *inputs)
    return op(*inputs)[0]


# ---------------------------------------------------------------- the user-facing operators


def attention(q: Tensor, k: Tensor, v: Tensor, proj_weight: Tensor, proj_bias: Tensor,
              topk: float = spec.DEFAULT_TOPK, k_low: float = spec.DEFAULT_K_LOW,
              block_q: int = spec.DEFAULT_BLOCK_Q, block_kv: int = spec.DEFAULT_BLOCK_KV,
              feature_map: str = spec.DEFAULT_FEATURE_MAP, linear: str = spec.DEFAULT_LINEAR,
              scale: float | None = None, layout: str = spec.DEFAULT_LAYOUT,
              gate: Tensor | None = None) -> Tensor:
    """sla::attention: route, then SLA (see `sla_tl.attention`)."""
    return _entry(torch.ops.sla.routed_attention_fwd.default, q, k, v, proj_weight, proj_bias,
                  topk, k_low, block_q, block_kv, feature_map, linear, scale, layout, gate)


def attention_lut(q: Tensor, k: Tensor, v: Tensor, lut: Tensor, lut_count: Tensor,
                  neg_lut: Tensor, neg_count: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                  block_q: int = spec.DEFAULT_BLOCK_Q, block_kv: int = spec.DEFAULT_BLOCK_KV,
                  feature_map: str = spec.DEFAULT_FEATURE_MAP,
                  linear: str = spec.DEFAULT_LINEAR, scale: float | None = None,
                  layout: str = spec.DEFAULT_LAYOUT, gate: Tensor | None = None) -> Tensor:
    """sla::attention_lut: SLA for a precomputed routing (see `sla_tl.attention_with_routing`)."""
    return _entry(torch.ops.sla.attention_fwd.default, q, k, v, lut, lut_count, neg_lut,
                  neg_count, proj_weight, proj_bias, gate, block_q, block_kv, feature_map,
                  linear, scale, layout)


for _composite in (attention, attention_lut):
    _name = f"sla::{_composite.__name__}"
    torch.library.define(_name, torch.library.infer_schema(_composite, mutates_args=()))
    torch.library.impl(_name, "CompositeImplicitAutograd", _composite)
